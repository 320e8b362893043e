"""The model's Triton ops (duoserve/models/triton_ops.py) against the torch ops they replace: RMSNorm with
and without the residual add (Llama's weights and Gemma's float32 1 + w, rows with outlier channels, sizes
that pad the block), per-head norms of strided q views, RoPE in place on strided q/k views of a fused QKV
output (GQA, head sizes 64/128, partial rotary), SwiGLU's and GeGLU's act(gate) * up; then whole tiny
models (Llama 3 RoPE, Gemma's norms, Phi-3's partial LongRoPE) whose logits and greedy tokens with the ops
on equal those with them off.

Without a GPU these run in Triton's interpreter (tests/models/conftest.py sets TRITON_INTERPRET), slowly:
the shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from duoserve.attention.torch_backend import TorchAttentionBackend
from duoserve.engine.model_runner import SeqChunk, layout_batch
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.models.config import ModelConfig
from duoserve.models.llama import LlamaModel, RMSNorm, SmallOps, _rope, _rope_qk

pytest.importorskip("triton")
ops = pytest.importorskip("duoserve.models.triton_ops")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not ops.INTERPRETED:
    pytest.skip(
        "triton's kernels were defined outside its interpreter: no GPU to run them", allow_module_level=True
    )
pytestmark = pytest.mark.usefixtures("single_torch_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One step of each dtype at its coarsest (relative spacing 2^-7 for bfloat16's 8 bits, 2^-10 for float16).
STEP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
TRITON = SmallOps(triton=True)


def torch_norm(x: torch.Tensor, weight: torch.Tensor, plus_one: bool, eps: float) -> torch.Tensor:
    """llama.py's RMSNorm in torch ops (what runs where no kernel applies)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * weight).to(x.dtype) if plus_one else normed.to(x.dtype) * weight


def assert_rounded_alike(ours: torch.Tensor, want: torch.Tensor) -> None:
    """float32: a few ulps (sums of squares in another order). 16-bit: equal but for values on a rounding
    boundary, a step away, and few of those."""
    assert ours.dtype == want.dtype and ours.shape == want.shape
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
        return
    diff = (ours.float() - want.float()).abs() / want.float().abs().clamp(min=1e-3)
    assert diff.max() <= STEP[ours.dtype] and (diff > 0).float().mean() < 2e-2


def outlier_rows(rows: int, hidden: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows with a large channel, as SmolLM2's residual stream has: a careless float32 sum loses them."""
    x = torch.randn(rows, hidden, generator=gen)
    x[:, 7] *= 300.0
    return x.to(dtype).to(DEVICE)


# ------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("hidden", [64, 96, 576])  # a power of two, and rows that pad the block
@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_add_norm_match_torch(dtype, plus_one, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x, delta = outlier_rows(5, hidden, dtype, gen), outlier_rows(5, hidden, dtype, gen)
    raw = torch.randn(hidden, generator=gen)
    weight = (1.0 + raw if plus_one else raw.to(dtype)).to(DEVICE)  # Gemma's 1 + w stays float32
    norm = RMSNorm(weight, 1e-6, plus_one, TRITON)
    assert ops.norm_applies(x, weight, plus_one) and ops.add_norm_applies(x, delta, weight, plus_one)
    assert_rounded_alike(norm(x), torch_norm(x, weight, plus_one, 1e-6))
    total, normed = norm.add(x, delta)
    assert torch.equal(total, x + delta)  # the residual stream rounds as torch's add
    assert_rounded_alike(normed, torch_norm(x + delta, weight, plus_one, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_per_head_of_strided_q(dtype):
    """Qwen3/Gemma 3's q/k norms: a [T, heads, dim] view of the fused QKV output, normed per head."""
    gen = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, dim = 3, 6, 2, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    assert not q.is_contiguous()
    weight = torch.randn(dim, generator=gen).to(dtype).to(DEVICE)
    ours = RMSNorm(weight, 1e-6, False, TRITON)(q)
    assert ours.is_contiguous()
    assert_rounded_alike(ours, torch_norm(q, weight, False, 1e-6))


def test_norms_the_kernel_does_not_take_run_torch():
    """A float32 weight on bfloat16 rows without plus_one, or a delta of another dtype: torch's ops."""
    x = torch.randn(3, 64).to(torch.bfloat16).to(DEVICE)
    weight = torch.randn(64, device=DEVICE)
    assert not ops.norm_applies(x, weight, plus_one=False)
    assert ops.norm_applies(x, weight, plus_one=True)
    assert not ops.add_norm_applies(x, x.float(), weight, plus_one=True)
    norm = RMSNorm(weight, 1e-6, False, TRITON)
    assert torch.equal(norm(x), torch_norm(x, weight, False, 1e-6))


# ------------------------------------------------------------------ RoPE


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "rotary"),
    [
        (8, 2, 64, 64),  # GQA group 4
        (6, 1, 128, 128),  # group 6 (heads pad to 8), head size 128
        (4, 4, 64, 32),  # MHA, partial rotary (Phi-3): the rest passes through
        (5, 1, 128, 96),  # 48 rotated pairs: half pads the block
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_matches_rotate_half(dtype, heads, kv_heads, dim, rotary):
    gen = torch.Generator().manual_seed(dim + rotary)
    tokens, max_positions = 7, 40
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    # A table over positions, gathered at the tokens' as the model does (halves differ: a swapped half
    # would show).
    angles = torch.randn(max_positions, rotary, generator=gen) * 3
    table_cos, table_sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    positions = torch.randint(0, max_positions, (tokens,), generator=gen).to(DEVICE)
    cos, sin = table_cos[positions][:, None, :], table_sin[positions][:, None, :]
    want_q, want_k, v_before = _rope(q, cos, sin), _rope(k, cos, sin), v.clone()
    ours_q, ours_k = _rope_qk(q, k, cos, sin, triton=True)
    assert ours_q.data_ptr() == q.data_ptr() and ours_k.data_ptr() == k.data_ptr()  # in place
    if dtype == torch.float32:
        torch.testing.assert_close(ours_q, want_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_k, want_k, rtol=1e-6, atol=1e-6)
    else:  # every product and the sum rounded where torch rounds them
        assert torch.equal(ours_q, want_q) and torch.equal(ours_k, want_k)
    assert torch.equal(v, v_before)


def test_rope_of_no_tokens_and_what_it_does_not_take():
    q, k = torch.empty(0, 4, 16, device=DEVICE), torch.empty(0, 2, 16, device=DEVICE)
    empty = torch.empty(0, 1, 16, device=DEVICE)
    ours_q, ours_k = _rope_qk(q, k, empty, empty, triton=True)
    assert ours_q.shape == q.shape and ours_k.shape == k.shape
    q, k = torch.randn(2, 4, 16, device=DEVICE), torch.randn(2, 2, 16, device=DEVICE)
    cos = torch.randn(2, 1, 16, device=DEVICE)
    assert ops.rope_applies(q, k, cos, cos)
    assert not ops.rope_applies(q, k, cos.double(), cos.double())  # tables of another dtype
    assert not ops.rope_applies(q, k, cos[..., :15], cos[..., :15])  # odd rotary dims
    strided_dims = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not ops.rope_applies(strided_dims, k, cos, cos)  # a head's dims not contiguous


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size"), [(8, 2, 64, 5), (6, 3, 128, 16)])
@pytest.mark.parametrize(("dtype", "pool_dtype"), [*((d, d) for d in DTYPES), (torch.float32, torch.float16)])
def test_rope_store_equals_rope_then_the_backends_store(dtype, pool_dtype, heads, kv_heads, dim, block_size):
    """One launch: q and k rotated in place exactly as rope_qk_ rotates them, and the pools exactly as the
    Triton backend's store_kv leaves them (rotated K, V, cast to the pool's dtype; a padded row, slot -1,
    writes nothing)."""
    from duoserve.attention.triton_kernels import store_kv

    gen = torch.Generator().manual_seed(dim + block_size)
    tokens = 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype).to(DEVICE)
    angles = torch.randn(tokens, 1, dim, generator=gen) * 3
    cos, sin = angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)
    slots = torch.tensor([3, 17, -1, 0, 9, 22], device=DEVICE)  # scattered over blocks; one padded row

    def split(t):
        q, k, v = t.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)

    pools = [
        torch.randn(6, block_size, kv_heads, dim, generator=gen).to(pool_dtype).to(DEVICE) for _ in (0, 1)
    ]
    want_pools = [p.clone() for p in pools]
    want_q, want_k, want_v = split(qkv.clone())
    ops.rope_qk_(want_q, want_k, cos, sin)
    store_kv(want_k, want_v, *want_pools, slots)
    q, k, v = split(qkv)
    write = ops.KVWrite(v, *pools, slots)
    assert ops.rope_store_applies(q, k, cos, sin, write)
    ops.rope_qk_store_(q, k, cos, sin, write)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    for ours, want in zip(pools, want_pools, strict=True):
        assert torch.equal(ours, want)


def test_what_rope_store_does_not_take():
    q, k, v = (torch.randn(2, h, 16, device=DEVICE) for h in (4, 2, 2))
    cos = torch.randn(2, 1, 16, device=DEVICE)
    pools = [torch.zeros(3, 4, 2, 16, device=DEVICE) for _ in (0, 1)]
    slots = torch.tensor([0, 5], device=DEVICE)
    assert ops.rope_store_applies(q, k, cos, cos, ops.KVWrite(v, *pools, slots))
    half = cos[..., :8]
    assert not ops.rope_store_applies(q, k, half, half, ops.KVWrite(v, *pools, slots))  # partial rotary
    int8 = [p.to(torch.int8) for p in pools]
    assert not ops.rope_store_applies(q, k, cos, cos, ops.KVWrite(v, *int8, slots))  # 1-byte: the backend's
    narrower = ops.KVWrite(v, pools[0], pools[1][:, :2], slots)
    assert not ops.rope_store_applies(q, k, cos, cos, narrower)  # pools differ
    assert not ops.rope_store_applies(q, k, cos, cos, ops.KVWrite(v, *pools, slots[:1]))  # a slot a token


def test_model_stores_kv_in_its_rope_launch_on_the_triton_backend(monkeypatch):
    """A model on the Triton backend: RoPE's launch writes the cache (the backend's store launch never
    runs), with the same greedy tokens and bit-identical logits as RoPE then the backend's store."""
    from duoserve.attention import triton_backend
    from duoserve.attention.triton_backend import TritonAttentionBackend

    config = FAMILIES["llama3"]
    model = LlamaModel(
        config, random_weights(config), TritonAttentionBackend(DEVICE), DEVICE, torch.float32, 64
    )
    assert model.fused_ops and model.fused_rope_store
    stores = []
    original = triton_backend.store_kv
    monkeypatch.setattr(triton_backend, "store_kv", lambda *a, **kw: stores.append(1) or original(*a, **kw))
    fused_tokens, fused_logits = greedy(model, config, torch.float32, 3)
    assert not stores
    model.fused_rope_store = False
    plain_tokens, plain_logits = greedy(model, config, torch.float32, 3)
    assert len(stores) == 3 * config.num_hidden_layers
    assert fused_tokens == plain_tokens and torch.equal(fused_logits, plain_logits)


# ------------------------------------------------------------------ the MLP's activation


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("inter", [96, 1500])  # one block of columns, and two (the second one partial)
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_mul_matches_torch(dtype, inter, activation):
    gen = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(3, 2 * inter, generator=gen) * 4).to(dtype).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu if activation == "silu" else (lambda g: F.gelu(g, approximate="tanh"))
    assert ops.act_mul_applies(gate_up, activation)
    ours, want = ops.act_mul(gate_up, activation), act(gate) * up
    if dtype == torch.float32:  # exp's and tanh's last bits differ from torch's (values up to a few hundred)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    else:  # where 1 + tanh cancels (gate below -4) torch's float16 GELU is itself ~1e-7 off: absolute
        torch.testing.assert_close(ours.float(), want.float(), rtol=STEP[dtype], atol=1e-5)
    assert not ops.act_mul_applies(gate_up, "relu")


@pytest.mark.parametrize(
    ("rows", "vocab"),
    [(1, 128256), (5, 4096), (3, 9000), (2, 7)],  # 32 chunks; exactly one; a partial last one; tiny
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_matches_torch_first_index_on_ties(rows, vocab, dtype):
    """torch's argmax, ties to the earliest index: within a chunk's lane, across lanes, across chunks."""
    gen = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=gen).to(dtype)
    x[0, vocab // 3] = x[0, vocab - 1] = 50.0  # a tie across chunks (and lanes), the earlier must win
    if rows > 1:
        x[1] = 0.0  # all equal: index 0
    if rows > 2:
        x[2, :] = float("-inf")  # nothing above -inf: index 0, as torch
    x = x.to(DEVICE)
    assert ops.argmax_applies(x)
    for _ in range(2):  # the counters are back at 0 after a launch
        torch.testing.assert_close(ops.argmax_rows(x), x.argmax(-1), rtol=0, atol=0)
    assert ops.argmax_rows(x[:, :-1]).tolist() == x[:, :-1].argmax(-1).tolist()  # strided rows


def test_argmax_rows_what_it_does_not_take():
    x = torch.zeros(2, 8, device=DEVICE)
    assert not ops.argmax_applies(x.T)  # rows not contiguous
    assert not ops.argmax_applies(x[0])  # 1-D
    assert not ops.argmax_applies(x[:0])  # no rows
    assert not ops.argmax_applies(x.long())
    with pytest.raises(ValueError, match="argmax_rows"):
        ops.argmax_rows(x.T)


# ------------------------------------------------------------------ whole models

FAMILIES = {
    "llama3": ModelConfig(
        architecture="llama",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    # Gemma 2/3's pieces: (1 + w) norms, sandwich norms, q/k norms, GeGLU, scaled embeddings, soft caps, a
    # sliding layer with its own RoPE table.
    "gemma": ModelConfig(
        architecture="gemma2",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        hidden_act="gelu_pytorch_tanh",
        norm_plus_one=True,
        qk_norm=True,
        sandwich_norms=True,
        embedding_scale=128**0.5,
        query_pre_attn_scalar=96,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=30.0,
        rope_local_theta=1e4,
    ),
    # Phi-3's LongRoPE on half of each head (the engine's 64 positions exceed the original 16: long factors).
    "phi3": ModelConfig(
        architecture="phi3",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(16)],
            "long_factor": [1.0 + 0.5 * i for i in range(16)],
            "original_max_position_embeddings": 16,
        },
        max_position_embeddings=64,
        partial_rotary_factor=0.5,
    ),
}


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers' tensor names, random values wide enough that greedy tokens have clear margins."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, dim = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * (1.5 / cols**0.5)

    def norm(size: int) -> torch.Tensor:  # Gemma's files store w of (1 + w)
        return 0.2 * torch.randn(size, generator=gen) + (0.0 if config.norm_plus_one else 1.0)

    w = {"model.embed_tokens.weight": torch.randn(config.vocab_size, hidden, generator=gen)}
    w["model.norm.weight"] = norm(hidden)
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = mat(config.vocab_size, hidden)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}{name}.weight"] = norm(hidden)
        for name, rows in (("q", heads * dim), ("k", kv_heads * dim), ("v", kv_heads * dim)):
            w[f"{p}self_attn.{name}_proj.weight"] = mat(rows, hidden)
        w[f"{p}self_attn.o_proj.weight"] = mat(hidden, heads * dim)
        w[f"{p}mlp.gate_proj.weight"], w[f"{p}mlp.up_proj.weight"] = mat(inter, hidden), mat(inter, hidden)
        w[f"{p}mlp.down_proj.weight"] = mat(hidden, inter)
        if config.qk_norm:
            w[f"{p}self_attn.q_norm.weight"], w[f"{p}self_attn.k_norm.weight"] = norm(dim), norm(dim)
        if config.sandwich_norms:
            for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
                w[f"{p}{name}.weight"] = norm(hidden)
    return w


def greedy(model: LlamaModel, config: ModelConfig, dtype: torch.dtype, steps: int):
    """Two prompts prefilled in one step, then decoded together: (tokens per prompt, logits per step)."""
    block_size = 4
    cache = KVCache(KVCacheSpec.for_model(config, block_size, dtype), 16, DEVICE)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 9)]
    chunks = [SeqChunk(p, 0, list(range(i * 8, i * 8 + 8))) for i, p in enumerate(prompts)]
    tokens: list[list[int]] = [[], []]
    logits = []
    for _ in range(steps):
        layout = layout_batch(chunks, block_size, DEVICE)
        hidden = model.forward(layout.input_ids, layout.positions, cache, layout.meta)
        last = [layout.query_starts[i] + len(c.token_ids) - 1 for i, c in enumerate(chunks)]
        step_logits = model.compute_logits(hidden[last])
        logits.append(step_logits.cpu())
        chosen = step_logits.argmax(-1).tolist()
        for i, token in enumerate(chosen):
            tokens[i].append(token)
        chunks = [
            SeqChunk([t], c.start + len(c.token_ids), c.block_ids)
            for c, t in zip(chunks, chosen, strict=True)
        ]
    return tokens, torch.stack(logits)


def count_calls(monkeypatch) -> dict[str, int]:
    calls = {name: 0 for name in ("rms_norm", "add_rms_norm", "rope_qk_", "act_mul")}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(ops, name, counted)
    return calls


@pytest.mark.parametrize(
    ("family", "dtype", "tolerance"),
    [
        ("llama3", torch.float32, 1e-5),
        ("llama3", torch.bfloat16, 3e-2),
        ("llama3", torch.float16, 5e-3),
        ("gemma", torch.float32, 1e-5),
        ("gemma", torch.bfloat16, 3e-2),
        ("phi3", torch.float32, 1e-5),
        ("phi3", torch.bfloat16, 3e-2),
    ],
)
def test_model_with_fused_ops_equals_without(monkeypatch, family, dtype, tolerance):
    """One model, its ops switched: greedy tokens identical, logits within the dtype's rounding (off, a
    CPU model runs the C++ ops for float32/bfloat16 and torch's for float16)."""
    config = FAMILIES[family]
    model = LlamaModel(config, random_weights(config), TorchAttentionBackend(), DEVICE, dtype, 64)
    assert not model.fused_ops  # the torch attention backend: the ops stay unfused unless asked
    calls = count_calls(monkeypatch)
    plain_tokens, plain_logits = greedy(model, config, dtype, 5)
    assert not any(calls.values())
    model.fused_ops = True
    fused_tokens, fused_logits = greedy(model, config, dtype, 5)
    assert all(calls.values()), calls  # every kernel ran: nothing fell back unseen
    assert fused_tokens == plain_tokens
    err = ((fused_logits - plain_logits).norm() / plain_logits.norm()).item()
    assert err < tolerance


def test_fused_ops_follow_the_attention_backend():
    """On where attention runs Triton's kernels, off elsewhere; on a device the kernels cannot run on,
    asking for them raises."""
    from duoserve.attention.triton_backend import TritonAttentionBackend

    config = FAMILIES["llama3"]
    weights = random_weights(config)
    assert not LlamaModel(config, weights, TorchAttentionBackend(), DEVICE, torch.float32, 64).fused_ops
    model = LlamaModel(config, weights, TritonAttentionBackend(DEVICE), DEVICE, torch.float32, 64)
    assert model.fused_ops
    model.fused_ops = False
    assert not model.fused_ops and not model.layers[0].input_norm.ops.triton
    with pytest.raises(ValueError, match="CUDA"):
        ops.check_device(torch.device("meta"))
