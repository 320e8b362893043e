"""The Triton matrix-vector product (duoserve/models/triton_gemv.py) against torch's, on odd shapes; on CPU
tensors under Triton's interpreter (tests/models/conftest.py sets it), on the GPU where there is one."""

from __future__ import annotations

import pytest
import torch

from duoserve.models import triton_gemv as tg

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not tg.INTERPRETED:
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _case(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 64, 512), (3, 100, 200), (8, 5, 16), (5, 37, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_k", [128, 256])
def test_gemv_matches_torch(rows, n, k, dtype, bias, block_k) -> None:
    """float32 accumulation rounded once to the dtype: within one step of the dtype (its spacing) of the
    float64 product (the interpreter truncates the final float32 -> bfloat16 cast, GPUs round it). Several
    programs and K slices, the last ones partial; at 256 inputs a slice and 5-8 rows the slices' products
    are summed as they come (REDUCE_EACH), otherwise once at the end."""
    x, w, b = _case(rows, n, k, dtype, bias, seed=rows * n + k)
    tiles = tg.GemvTiles(block_n=16, block_k=block_k, num_warps=2)
    ours = tg.gemv(x, w, b, tiles)
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    assert ours.dtype == dtype and ours.shape == (rows, n)
    step = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert ((ours.double() - want).abs() <= step * want.abs() + 1e-5).all()


def test_gemv_reads_strided_rows() -> None:
    """x may be a view with a row stride (a slice of a wider activation), as long as its inputs are
    contiguous."""
    x, w, _ = _case(4, 24, 96, torch.float32, False)
    wide = torch.zeros(4, 200, device=DEVICE)
    wide[:, 50:146] = x
    view = wide[:, 50:146]
    assert tg.gemv_applies(view, w)
    torch.testing.assert_close(tg.gemv(view, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_what_gemv_does_not_take() -> None:
    x, w, _ = _case(2, 8, 32, torch.float32, False)
    assert not tg.gemv_applies(torch.zeros(tg.MAX_ROWS + 1, 32, device=DEVICE), w)  # too many rows
    assert not tg.gemv_applies(torch.zeros(0, 32, device=DEVICE), w)
    assert not tg.gemv_applies(x.to(torch.bfloat16), w)  # dtypes differ
    assert not tg.gemv_applies(x, w.T.contiguous().T)  # a transposed weight
    assert not tg.gemv_applies(x.T.contiguous().T, w)  # inputs not contiguous
    assert not tg.gemv_applies(x[:, :16], w)  # widths differ
    with pytest.raises(ValueError, match="rows"):
        tg.gemv(torch.zeros(tg.MAX_ROWS + 1, 32, device=DEVICE), w)


def test_gemv_chosen_where_it_beat_cublas() -> None:
    """A model's projections take the kernel at 1-2 rows of weights up to 8192 outputs (q/k/v, o, down at
    Llama 1B's shapes), cuBLAS otherwise (gate_up, lm_head; 3+ rows), as measured (module docstring)."""
    x = torch.zeros(tg.CHOSEN_ROWS, 64, device=DEVICE)
    assert tg.gemv_chosen(x, torch.zeros(tg.CHOSEN_OUTPUTS, 64, device=DEVICE))
    assert not tg.gemv_chosen(x, torch.zeros(tg.CHOSEN_OUTPUTS + 1, 64, device=DEVICE))
    assert not tg.gemv_chosen(
        torch.zeros(tg.CHOSEN_ROWS + 1, 64, device=DEVICE), torch.zeros(8, 64, device=DEVICE)
    )
    assert not tg.gemv_chosen(x, torch.zeros(8, 32, device=DEVICE))  # and only where it applies


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_model_with_triton_gemv_equals_without(monkeypatch, dtype, tolerance) -> None:
    """One model, its projections switched: decode steps (2 rows) through the kernel, the prompt's step
    (more rows than it takes) through torch; greedy tokens identical, logits within the dtype's rounding."""
    from duoserve.attention.torch_backend import TorchAttentionBackend
    from duoserve.models.llama import LlamaModel
    from tests.models.test_triton_ops import FAMILIES, greedy, random_weights

    config = FAMILIES["llama3"]
    model = LlamaModel(config, random_weights(config), TorchAttentionBackend(), DEVICE, dtype, 64)
    assert not model.triton_gemv  # off unless asked
    calls = []
    original = tg.gemv
    monkeypatch.setattr(tg, "gemv", lambda *args: calls.append(args[0].shape[0]) or original(*args))
    plain_tokens, plain_logits = greedy(model, config, dtype, 4)
    assert not calls
    model.triton_gemv = True
    assert model.triton_gemv
    gemv_tokens, gemv_logits = greedy(model, config, dtype, 4)
    # 4 projections a layer, on the 3 decode steps of 2 rows; the prompts' step is wider than MAX_ROWS
    assert calls and set(calls) == {2} and len(calls) == 3 * 4 * config.num_hidden_layers
    assert gemv_tokens == plain_tokens
    assert ((gemv_logits - plain_logits).norm() / plain_logits.norm()).item() < tolerance
    model.triton_gemv = False
    assert not model.triton_gemv
