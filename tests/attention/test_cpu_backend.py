"""The paged C++ decode kernel against plain attention over each sequence's context, on every code
path (the AVX-512 specialisations for head sizes 64/128 and GQA groups up to 8, the generic loops
otherwise), with and without a sliding window and soft-capped scores, and the CPU backend against the
torch backend on a mixed decode + prefill step."""

from __future__ import annotations

import shutil

import pytest
import torch

from duoserve.attention.backend import AttentionMetadata, PrefillChunk
from duoserve.attention.cpu_backend import CpuAttentionBackend, paged_decode
from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.cpu_kernels import cpu_kernels_available
from duoserve.kv.layer import LayerKV
from duoserve.kv.quant import as_bytes, quantize
from tests.attention.test_torch_backend import WINDOWS, _reference, poisoned_case, rel_err, run_decode

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the CPU kernel cannot be built", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    assert cpu_kernels_available()  # a compiler is here: the build must work


def _paged_case(heads, kv_heads, dim, block_size, lens, kv_dtype, q_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    width = int((lens.max() + block_size - 1) // block_size)
    num_blocks = width * len(lens) + 3
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(kv_dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(kv_dtype)
    # Distinct, shuffled blocks per sequence; table entries past a context are padding (block 0).
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(((lens + block_size - 1) // block_size).tolist()):
        tables[i, :n] = perm[i * width : i * width + n]
    q = torch.randn(len(lens), heads, dim, generator=gen).to(q_dtype)
    return q, k_pool, v_pool, tables, lens


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [
        (9, 3, 64, 16),  # SmolLM2: AVX-512, group 3
        (8, 1, 128, 16),  # AVX-512, head size 128, group 8
        (4, 4, 64, 5),  # MHA, a block size that splits 16-token chunks
        (2, 2, 64, 40),  # blocks of several 16-token chunks plus a remainder
        (16, 1, 64, 16),  # group 16: generic loops
        (6, 2, 13, 5),  # odd head size: generic loops
    ],
)
@pytest.mark.parametrize(
    ("kv_dtype", "q_dtype", "tolerance"),
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.bfloat16, 1e-2),  # the output is rounded to bfloat16
        (torch.bfloat16, torch.float32, 1e-5),  # a bf16 KV cache under an fp32 model
        (torch.float16, torch.float32, 1e-5),
    ],
)
@pytest.mark.parametrize("num_seqs", ["few", "many"])
def test_paged_decode_matches_per_sequence_attention(
    heads, kv_heads, dim, block_size, kv_dtype, q_dtype, tolerance, num_seqs
) -> None:
    lens = [1, block_size, block_size + 1, 3 * block_size, 7 * block_size - 2, 50, 97]
    # Few sequences: a work item per (sequence, KV head); many: per sequence with all its KV heads.
    lens = lens if num_seqs == "few" else (lens * 6)[:40]
    q, k_pool, v_pool, tables, lens = _paged_case(heads, kv_heads, dim, block_size, lens, kv_dtype, q_dtype)
    out = paged_decode(q, k_pool, v_pool, tables, lens, dim**-0.5)
    assert out.dtype == q.dtype and out.shape == q.shape
    ref = _reference(q.float(), k_pool.float(), v_pool.float(), tables, lens, dim**-0.5)
    assert ((out.float() - ref).norm() / ref.norm()).item() < tolerance


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [
        (9, 3, 64, 16),  # AVX-512, group 3
        (8, 1, 128, 5),  # AVX-512, head size 128, blocks that split 16-token chunks
        (4, 4, 64, 5),  # AVX-512, MHA
        (6, 2, 13, 5),  # generic loops
        (16, 1, 64, 16),  # generic loops, head size 64
    ],
)
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],  # bfloat16: the output is rounded to bfloat16
)
@pytest.mark.parametrize("soft_cap", [None, 2.5])
@pytest.mark.usefixtures("single_torch_thread")
def test_paged_decode_window_and_soft_cap(
    heads, kv_heads, dim, block_size, dtype, tolerance, soft_cap
) -> None:
    """Each walk starts at its window: table entries before it name a NaN block that must not be read."""
    lens = [1, 3, block_size, block_size + 1, 21, 40, 41, 97]
    for window in [None, *WINDOWS]:
        case = poisoned_case(heads, kv_heads, dim, block_size, lens, window, dtype=dtype)
        q, k_pool, v_pool, tables, lens_t = case
        ref = _reference(
            q.float(), k_pool.float(), v_pool.float(), tables, lens_t, dim**-0.5, window, soft_cap
        )
        # All sequences: a work item per sequence; the first three: per (sequence, KV head).
        for num in (len(lens), 3):
            out = paged_decode(
                q[:num], k_pool, v_pool, tables[:num], lens_t[:num], dim**-0.5, window, soft_cap
            )
            assert rel_err(out, ref[:num]) < tolerance, (window, num)


@pytest.fixture(params=[2, 4], ids=lambda n: f"{n}threads")
def torch_threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [
        (9, 3, 64, 16),  # SmolLM2: 3 items a sequence, the grouped kernels
        (8, 1, 128, 5),  # one item a sequence, head size 128
        (16, 1, 64, 16),  # group 16: attend_avx2 (AVX2) / the generic loops (AVX-512)
        (6, 2, 13, 5),  # the generic loops
    ],
)
@pytest.mark.parametrize(
    ("kv_dtype", "q_dtype", "tolerance"),
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.bfloat16, 1e-2),  # the ranges' outputs and the output rounded to bfloat16
        (torch.float16, torch.float32, 1e-5),
    ],
)
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (300, 2.5)])
def test_few_sequences_split_their_contexts_over_the_threads(
    heads, kv_heads, dim, block_size, kv_dtype, q_dtype, tolerance, window, soft_cap, torch_threads
) -> None:
    """Fewer sequences than share evenly over the threads, cut into context ranges of 128+ tokens merged by
    their log-sum-exp (run_split): one sequence on 2 threads in 2 ranges of all its KV heads; three on 4,
    one of them too short for 4 ranges, as (sequence, KV head) items in up to 4 ranges each, the 129-token
    context whole. Table entries before a window name a NaN block: a range must start inside its window."""
    lens = [1000] if torch_threads == 2 else [1000, 700, 129]
    q, k_pool, v_pool, tables, lens_t = poisoned_case(heads, kv_heads, dim, block_size, lens, window)
    k_pool, v_pool, q = k_pool.to(kv_dtype), v_pool.to(kv_dtype), q.to(q_dtype)
    out = paged_decode(q, k_pool, v_pool, tables, lens_t, dim**-0.5, window, soft_cap)
    ref = _reference(q.float(), k_pool.float(), v_pool.float(), tables, lens_t, dim**-0.5, window, soft_cap)
    assert out.dtype == q.dtype and rel_err(out, ref) < tolerance


def test_soft_cap_squashes_large_scores() -> None:
    """Scores far past the cap: capped, the softmax is much flatter than without."""
    q, k_pool, v_pool, tables, lens = poisoned_case(9, 3, 64, 16, [200, 37], 50)
    q = q * 30
    capped = paged_decode(q, k_pool, v_pool, tables, lens, 0.125, 50, 5.0)
    assert rel_err(capped, _reference(q, k_pool, v_pool, tables, lens, 0.125, 50, 5.0)) < 1e-5
    plain = paged_decode(q, k_pool, v_pool, tables, lens, 0.125, 50)
    assert (capped - plain).abs().max() > 0.1


@pytest.mark.parametrize(("window", "soft_cap"), [(7, None), (None, 2.5), (20, 2.5)])
def test_backend_decodes_with_variants_match_torch_backend(window, soft_cap) -> None:
    q, k_pool, v_pool, tables, lens = poisoned_case(9, 3, 64, 5, [1, 7, 20, 33, 70], window)
    outs = [
        run_decode(backend, q, k_pool, v_pool, tables, lens, sliding_window=window, logits_soft_cap=soft_cap)
        for backend in (TorchAttentionBackend(), CpuAttentionBackend())
    ]
    assert rel_err(outs[1], outs[0].double()) < 1e-5


def test_large_scores_do_not_overflow() -> None:
    """Scores far apart (the online softmax's running max must rescale, not overflow)."""
    q, k_pool, v_pool, tables, lens = _paged_case(9, 3, 64, 16, [200, 37], torch.float32, torch.float32)
    q = q * 30
    out = paged_decode(q, k_pool, v_pool, tables, lens, 0.125)
    ref = _reference(q, k_pool, v_pool, tables, lens, 0.125)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_bad_inputs_raise() -> None:
    q, k_pool, v_pool, tables, lens = _paged_case(9, 3, 64, 16, [20], torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="int64"):
        paged_decode(q, k_pool, v_pool, tables.int(), lens, 0.125)
    with pytest.raises(RuntimeError, match="heads"):
        paged_decode(q[:, :8], k_pool, v_pool, tables, lens, 0.125)
    with pytest.raises(RuntimeError, match="context length"):
        paged_decode(q, k_pool, v_pool, tables, lens + 100, 0.125)
    with pytest.raises(RuntimeError, match="sliding_window"):
        paged_decode(q, k_pool, v_pool, tables, lens, 0.125, -1)


def test_backend_step_matches_torch_backend() -> None:
    """A step of three decodes and two prefill chunks (one with cached context) through both backends."""
    heads, kv_heads, dim, block_size = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(1)
    num_blocks = 40
    k_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    decode_lens = torch.tensor([5, 33, 70])
    decode_tables = torch.tensor([[3, 0, 0, 0, 0], [7, 8, 9, 0, 0], [10, 11, 12, 13, 14]])
    prefills = [
        PrefillChunk(query_start=3, query_len=6, context_len=6, block_table=torch.tensor([20])),
        PrefillChunk(query_start=9, query_len=10, context_len=40, block_table=torch.tensor([21, 22, 23])),
    ]
    num_tokens = 19
    slots = [3 * 16 + 4, 9 * 16 + 0, 14 * 16 + 5] + [20 * 16 + i for i in range(6)]
    slots += [23 * 16 - 2 + i for i in range(2)] + [23 * 16 + i for i in range(8)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=3,
        decode_block_tables=decode_tables,
        decode_context_lens=decode_lens,
        prefills=prefills,
        block_size=block_size,
    )
    q = torch.randn(num_tokens, heads, dim, generator=gen)
    k = torch.randn(num_tokens, kv_heads, dim, generator=gen)
    v = torch.randn(num_tokens, kv_heads, dim, generator=gen)
    outs = []
    for backend in (TorchAttentionBackend(), CpuAttentionBackend()):
        pools = (k_pool.clone(), v_pool.clone())
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, pools, meta, dim**-0.5))
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < 1e-5


@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.bfloat16, torch.int8),
        (torch.float32, torch.int8),
        (torch.bfloat16, torch.float8_e4m3fn),
        (torch.bfloat16, torch.float8_e5m2),
    ],
)
def test_pure_decode_step_stores_and_attends_as_torch_backend(dtype, kv_dtype) -> None:
    """A decode-only step takes the backend's direct path (the K/V store op, quantizing into a 1-byte
    pool, and the kernel's output as it is): its pools and output equal the torch backend's, with K/V given
    as views of a fused QKV row."""
    heads, kv_heads, dim, block_size = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(2)
    k_pool = torch.randn(20, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_pool = torch.randn(20, block_size, kv_heads, dim, generator=gen).to(dtype)
    lens = torch.tensor([5, 33])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([3 * 16 + 4, 9 * 16 + 0]),
        num_decode_tokens=2,
        decode_block_tables=torch.tensor([[3, 0, 0], [7, 8, 9]]),
        decode_context_lens=lens,
        prefills=[],
        block_size=block_size,
    )
    qkv = torch.randn(2, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.reshape(2, heads, dim), k.view(2, kv_heads, dim), v.view(2, kv_heads, dim)
    if kv_dtype is not None:
        (k_pool, k_scale), (v_pool, v_scale) = quantize(k_pool, kv_dtype), quantize(v_pool, kv_dtype)
    outs, pools = [], []
    for backend in (TorchAttentionBackend(), CpuAttentionBackend()):
        if kv_dtype is None:
            layer = LayerKV(k_pool.clone(), v_pool.clone())
        else:
            layer = LayerKV(k_pool.clone(), v_pool.clone(), k_scale.clone(), v_scale.clone())
        backend.prepare(meta)
        outs.append(backend.forward(q, k, v, layer, meta, dim**-0.5))
        pools.append(layer)
    for field in ("k", "v", "k_scale", "v_scale"):
        a, b = getattr(pools[0], field), getattr(pools[1], field)
        assert a is None and b is None or torch.equal(as_bytes(a), as_bytes(b)), field
    assert rel_err(outs[1], outs[0].double()) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_a_killed_build_leaves_no_lock_that_blocks_the_next_start(tmp_path):
    """torch's lock file of a build killed midway is cleared; a live holder of the build still excludes."""
    import multiprocessing

    from duoserve.cpu_kernels import exclusive_build

    (tmp_path / "lock").write_text("")  # what a killed torch build leaves behind
    with exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
        # While this process holds the directory, another one cannot take it.
        probe = multiprocessing.get_context("fork").Process(
            target=_try_flock, args=(str(tmp_path / "duoserve.flock"),)
        )
        probe.start()
        probe.join()
        assert probe.exitcode == 1
    probe = multiprocessing.get_context("fork").Process(
        target=_try_flock, args=(str(tmp_path / "duoserve.flock"),)
    )
    probe.start()
    probe.join()
    assert probe.exitcode == 0  # released with the context


def _try_flock(path: str) -> None:
    import fcntl
    import os

    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os._exit(1)
    os._exit(0)
