"""The GPU path in one run (issue 17): bandwidth, decode step vs roofline, throughput vs transformers,
and the Triton backend's correctness against the torch backend, on the GPU it runs on.

    python benchmarks/gpu_suite.py            # an H100/H200: a few minutes
    python benchmarks/gpu_suite.py --smoke    # tiny sizes; on a CPU under Triton's interpreter

1. Device copy bandwidth: a large device-to-device copy, bytes read + written over the median time.
2. Correctness: the Triton backend against the torch backend on paged inputs of the model's shapes
   (decodes over long contexts, split over programs, and a mixed decode + prefill step), then one decode
   step of the whole model on both backends, each against a float32 engine on the same weights and cache.
3. Decode step of a 1B-class Llama (Llama 3.2 1B's shape, random bf16 weights) at each --batches size with
   --context-token contexts: the model forward replayed from its CUDA graph (and eager), plus the logits
   and argmax, timed with CUDA events (median). Roofline: (weight bytes + KV bytes read) / bandwidth.
   A/B of each of the engine's GPU switches, same model, same shapes, same run, each way with its own
   graphs (VARIANTS: `*_unfused` columns: torch's ops instead of the fused Triton norms, RoPE and
   act(gate) * up of duoserve/models/triton_ops.py; `*_cublas`: 1-2 rows of every projection through
   cuBLAS instead of the Triton GEMV; `*_split_kernel`, `*_store_kernel`: split decodes reduced, and the
   KV stored, in launches of their own); and the logits of one
   decode step with the fused ops and with the GEMV switched off and on.
4. Where a graph-replayed decode step's time goes, kernel by kernel (torch.profiler), at batch 1 and 64,
   and at batch 1 with cuBLAS for every projection.
5. Prefill steps (eager) of 1 x 1024, 8 x 1024 and 64 x 128 new tokens against transformers' forward on
   the same tokens and against the measured bf16 matmul rate (FLOPs of the step / that rate).
6. Host time per engine decode step, by phase (benchmarks/engine_phases.py), synchronous and async.
7. Offline throughput: --num-prompts random prompts of --input-len tokens, --output-len greedy tokens
   each, through duoserve's engine and through transformers `generate` (one static batch, no padding
   needed: equal lengths), same weights, same GPU. duoserve runs twice: steps synchronous, then with async
   scheduling (CUDA's default: the host schedules step n+1 while the GPU runs step n); the greedy tokens of
   both runs must be equal.
8. The same run with presence and frequency penalties (the engine alone, synchronous against async: such
   requests overlap steps now, their penalties counting the tokens in flight on the device); equal tokens.

Prints a markdown table of each part; with $OUT set (or --out), writes everything to gpu_suite.json there,
after each part. A part that fails records its error and the next one runs; `--parts` picks some.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

# Without a GPU, --smoke runs the kernels in Triton's interpreter: set before they are defined (imported).
if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.engine_phases import engine_phases  # noqa: E402
from duoserve.attention import triton_kernels  # noqa: E402
from duoserve.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from duoserve.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from duoserve.config import EngineConfig  # noqa: E402
from duoserve.engine.core import EngineCore  # noqa: E402
from duoserve.engine.model_runner import DecodeGraphs, SeqChunk, layout_batch  # noqa: E402
from duoserve.engine.sampler import argmax  # noqa: E402
from duoserve.models.config import ModelConfig  # noqa: E402
from duoserve.models.loader import LoadedModel  # noqa: E402
from duoserve.sampling_params import SamplingParams  # noqa: E402

# Llama 3.2 1B (plain RoPE: the scaling does not change what a step reads).
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)


PARTS = (
    "kernels",
    "model_check",
    "fused_check",
    "gemv_check",
    "decode",
    "profile",
    "prefill",
    "engine_phases",
    "throughput",
    "throughput_penalised",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: Triton's interpreter)")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    parser.add_argument(
        "--tiles",
        help="a JSON of the Triton kernels' Tiles to use instead of the default (triton_attention_sweep.py's "
        "best_<kind>_tiles.json): to measure a candidate whole before it becomes the default",
    )
    parser.add_argument(
        "--gemv-tiles",
        help="a GEMV sweep's JSON (triton_gemv_sweep.py's gemv_sweep.json): the Triton GEMV variants take "
        "each shape's fastest tiles there",
    )
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_suite.json")
    args = parser.parse_args()
    full = dict(batches=[1, 64, 256], context=1024, num_prompts=128, input_len=128, output_len=128, iters=20)
    smoke = dict(batches=[1, 3], context=40, num_prompts=3, input_len=8, output_len=4, iters=2)
    for name, value in (smoke if args.smoke else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median time of fn() (device time, with CUDA events, on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, num_bytes: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy, read + write counted (2 * size per copy)."""
    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * num_bytes / median_seconds(lambda: dst.copy_(src), device, iters)


# ------------------------------------------------------------------ the model


def build_engine(
    args, device: torch.device, hf_model, backend: str, max_len: int, dtype: str | None = None
) -> EngineCore:
    """An engine over the transformers model's own tensors (no copy of the weights, but fused qkv/gate_up;
    a copy where `dtype` differs from the model's)."""
    shape = TINY if args.smoke else LLAMA_1B
    config = ModelConfig(architecture="llama", max_position_embeddings=max_len, **shape)
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    weights = {name: t.to(getattr(torch, dtype)) for name, t in hf_model.state_dict().items()}
    block_size = 16
    blocks_needed = max(
        max(args.batches) * -(-(args.context + 1) // block_size),
        args.num_prompts * -(-(args.input_len + args.output_len) // block_size),
    )
    engine_config = EngineConfig(
        device=device.type,
        dtype=dtype,
        attention_backend=backend,
        block_size=block_size,
        num_kv_blocks=blocks_needed + 8,
        max_num_seqs=max(max(args.batches), args.num_prompts),
        max_num_batched_tokens=8192 if not args.smoke else 64,
        max_model_len=max_len,
        seed=0,
        enable_prefix_caching=False,  # the warm-up runs the same prompts: no hits in the timed run
    )
    return EngineCore(engine_config, LoadedModel(config, weights, "random", None))


def build_hf_model(args, device: torch.device, max_len: int):
    import transformers

    shape = TINY if args.smoke else LLAMA_1B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = transformers.LlamaConfig(max_position_embeddings=max_len, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # wider than the default init: logits with clear margins, as real models have
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.05)
    return model.eval()


def weight_bytes(core: EngineCore) -> int:
    """Weight bytes a decode step reads: every matrix and norm once (of the embedding, a row per token)."""
    model = core.model
    linears, tensors = [model.lm_head], [model.norm.weight]
    for layer in model.layers:
        linears += layer.linears()
        tensors += layer.norms()
    return sum(t.numel() * t.element_size() for t in tensors) + sum(linear.nbytes for linear in linears)


def decode_layout(core: EngineCore, batch: int, context: int):
    """A pure decode step of `batch` sequences at position context - 1, each over its own blocks."""
    bs = core.config.block_size
    per_seq = -(-context // bs)
    gen = torch.Generator().manual_seed(batch)
    chunks = [
        SeqChunk(
            [int(torch.randint(3, core.model_config.vocab_size, (), generator=gen))],
            context - 1,
            list(range(i * per_seq, (i + 1) * per_seq)),
        )
        for i in range(batch)
    ]
    return layout_batch(chunks, bs, core.device)


def decode_step(core: EngineCore, layout, graphs: DecodeGraphs | None):
    """One decode step (forward + logits + argmax): replayed from `graphs`, or eager where None."""

    def step():
        if graphs is not None:
            hidden = graphs.run(layout.input_ids, layout.positions, layout.meta)
        else:
            hidden = core.model.forward(layout.input_ids, layout.positions, core.kv_cache, layout.meta)
        return argmax(core.model.compute_logits(hidden))  # the engine's greedy sampling

    return step


# ------------------------------------------------------------------ parts


def check_kernels(device: torch.device, shape: dict, dtype: torch.dtype, smoke: bool) -> list[dict]:
    """Triton vs torch backend on random paged inputs: long decodes (split) and a mixed step."""
    results = []
    heads, kv_heads, dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    for head_dim in sorted({dim, 128}):
        for block_size in (16, 5):
            gen = torch.Generator(device=device).manual_seed(head_dim + block_size)
            long_ctx = 80 if smoke else 3000
            shapes = [
                (long_ctx - 1, 1),
                (block_size * 3, 1),
                (37, 1),
                (0, 12 if smoke else 300),
                (2 * block_size + 2, 9 if smoke else 200),
            ]
            num_blocks = sum(-(-(s + n) // block_size) for s, n in shapes) + 2
            perm = torch.randperm(num_blocks).tolist()
            chunks = []
            for start, n in shapes:
                count = -(-(start + n) // block_size)
                chunks.append(SeqChunk([0] * n, start, perm[:count]))
                perm = perm[count:]
            layout = layout_batch(chunks, block_size, device)
            tokens = layout.input_ids.shape[0]
            pools = [
                torch.randn(
                    num_blocks, block_size, kv_heads, head_dim, device=device, generator=gen, dtype=dtype
                )
                for _ in range(2)
            ]
            q = torch.randn(tokens, heads, head_dim, device=device, generator=gen, dtype=dtype)
            k, v = (
                torch.randn(tokens, kv_heads, head_dim, device=device, generator=gen, dtype=dtype)
                for _ in range(2)
            )
            outs = []
            for backend in (TorchAttentionBackend(), TritonAttentionBackend(device)):
                backend.prepare(layout.meta)
                own = tuple(p.clone() for p in pools)
                outs.append(backend.forward(q, k, v, own, layout.meta, head_dim**-0.5).float())
            err = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
            results.append(
                {
                    "head_dim": head_dim,
                    "block_size": block_size,
                    "rel_err": err,
                    "ok": err < (1e-2 if dtype != torch.float32 else 1e-5),
                }
            )
    return results


def check_model(core_triton: EngineCore, core_torch: EngineCore, reference: EngineCore, context: int) -> dict:
    """One decode step of the whole model on both backends over the same (random) KV cache, each against
    a float32 engine's (torch backend) on the same weights and cache: in bfloat16 the two backends round
    differently, and over 16 layers of a random model that difference alone is a few percent, so the
    test is that Triton's error is no larger than torch's (within 1.5x), not that they agree."""
    for core in (core_torch, reference):
        core.kv_cache.data.copy_(core_triton.kv_cache.data)
    layout = decode_layout(core_triton, 4, context)
    logits = []
    for core in (reference, core_torch, core_triton):
        hidden = core.model.forward(layout.input_ids, layout.positions, core.kv_cache, layout.meta)
        logits.append(core.model.compute_logits(hidden).float())
    want, torch_logits, triton_logits = logits

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    err_triton, err_torch = rel(triton_logits, want), rel(torch_logits, want)
    return {
        "triton_vs_torch": rel(triton_logits, torch_logits),
        "triton_vs_fp32": err_triton,
        "torch_vs_fp32": err_torch,
        "argmax_agreement": (triton_logits.argmax(-1) == torch_logits.argmax(-1)).float().mean().item(),
        "ok": err_triton <= 1.5 * err_torch + 1e-3,
    }


def check_switch(core: EngineCore, context: int, switch: str) -> dict:
    """One decode step of the same model with one of its kernel switches off, then on: `fused_ops` (small
    ops in Triton, or torch's; 4 rows; the same arithmetic, so bit-equal on the H200) or `triton_gemv`
    (projections through the Triton GEMV, or cuBLAS; 2 rows, the most it takes). The logits' relative
    error: the GEMV and cuBLAS sum in different orders, which over 16 random bf16 layers came to 2.2% on
    the H200, the scale of the two attention backends' difference (`model_check`, ~3%); a wrong product
    is far above the 4% bound."""
    layout = decode_layout(core, 2 if switch == "triton_gemv" else 4, context)
    model, was = core.model, getattr(core.model, switch)
    logits = []
    try:
        for on in (False, True):
            setattr(model, switch, on)
            hidden = model.forward(layout.input_ids, layout.positions, core.kv_cache, layout.meta)
            logits.append(model.compute_logits(hidden).float())
    finally:
        setattr(model, switch, was)
    err = ((logits[1] - logits[0]).norm() / logits[0].norm()).item()
    agree = (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean().item()
    return {"logits_rel_err": err, "argmax_agreement": agree, "ok": err < 4e-2}


# Switches a decode step can be timed with, each way its own graphs (a captured graph keeps its kernels):
# name suffix -> (settings, the largest batch it applies to). Settings: LlamaModel.fused_ops (small ops in
# Triton or torch), LlamaModel.triton_gemv (1-2 rows of the projections through models/triton_gemv.py),
# LlamaModel.fused_rope_store (the KV store in RoPE's launch), the Triton backend's fused_split_reduce
# (split decodes reduced in the attention launch). Unset ones keep the engine's defaults. (A decode split
# target of 16 programs an SM instead of 4 was timed too, 2026-12-04: +1.3% at batch 1, +6.7% at 64.)
VARIANTS = {
    "": ({}, None),
    "_unfused": ({"fused_ops": False}, None),
    "_cublas": ({"triton_gemv": False}, 2),
    "_split_kernel": ({"fused_split_reduce": False}, 64),
    "_store_kernel": ({"fused_rope_store": False}, 64),
}
_MODEL_SWITCHES = ("fused_ops", "triton_gemv", "fused_rope_store")
_ENGINE_DEFAULTS: dict[int, dict] = {}  # per engine: its switches as first seen


def switch(core: EngineCore, settings: dict) -> None:
    """The model's and its attention backend's switches to the engine's defaults updated by `settings`."""
    attention = core.model.attention
    defaults = _ENGINE_DEFAULTS.setdefault(
        id(core),
        {
            **{name: getattr(core.model, name) for name in _MODEL_SWITCHES},
            "fused_split_reduce": getattr(attention, "fused_split_reduce", None),
        },
    )
    for name in _MODEL_SWITCHES:
        setattr(core.model, name, settings.get(name, defaults[name]))
    if defaults["fused_split_reduce"] is not None:
        attention.fused_split_reduce = settings.get("fused_split_reduce", defaults["fused_split_reduce"])


def time_decode(core: EngineCore, args, bandwidth: float) -> list[dict]:
    """Per batch size: graph and eager step times with the engine's defaults on CUDA, and with each of
    VARIANTS' switches (`graph_ms_unfused`, `graph_ms_cublas`, ...; graphs of their own) where it applies."""
    spec = core.kv_cache.spec
    kv_per_token = spec.bytes_per_block // spec.block_size
    weights = weight_bytes(core)

    def graphs() -> DecodeGraphs | None:
        if core.decode_graphs is None:
            return None
        return DecodeGraphs(core.model, core.kv_cache, core.config.max_num_seqs, core.max_model_len)

    step_graphs = {suffix: core.decode_graphs if not suffix else graphs() for suffix in VARIANTS}
    rows = []
    try:
        for batch in args.batches:
            layout = decode_layout(core, batch, args.context)
            row = {"batch": batch, "context": args.context}
            for suffix, (settings, most) in VARIANTS.items():
                if most is not None and batch > most:
                    continue
                switch(core, settings)  # graphs are captured on a size's first run, with these switches
                if step_graphs[suffix] is not None:
                    step = decode_step(core, layout, step_graphs[suffix])
                    row["graph_ms" + suffix] = median_seconds(step, core.device, args.iters) * 1e3
                step = decode_step(core, layout, None)
                row["eager_ms" + suffix] = median_seconds(step, core.device, args.iters) * 1e3
            kv_bytes = batch * args.context * kv_per_token
            row["weight_MB"], row["kv_MB"] = weights / 1e6, kv_bytes / 1e6
            row["roofline_ms"] = (weights + kv_bytes) / bandwidth * 1e3
            for suffix in VARIANTS:
                if "eager_ms" + suffix in row:
                    best = row.get("graph_ms" + suffix, row["eager_ms" + suffix])
                    row["ratio" + suffix] = best / row["roofline_ms"]
            row["tok_s"] = batch / row.get("graph_ms", row["eager_ms"]) * 1e3
            rows.append(row)
    finally:
        switch(core, {})
    return rows


def matmul_rate(device: torch.device, size: int, iters: int) -> float:
    """FLOP/s of a square matmul in the model's dtype (the compute ceiling a prefill is held to)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / median_seconds(lambda: a @ a, device, iters)


def time_prefill(core: EngineCore, hf_model, args, rate: float) -> list[dict]:
    """Prefill steps (eager: they are never graphed) of `batch` new sequences of `length` tokens each: the
    forward and the logits of each sequence's last token, against the same through transformers' model
    (its decoder, then lm_head on the last positions: no logits for every position), and against the
    compute ceiling: FLOPs (2 x matmul weights x tokens, causal attention, lm_head per sequence) / the
    measured matmul rate."""
    config = core.model_config
    shapes = [(1, 16), (2, 8)] if args.smoke else [(1, 1024), (8, 1024), (64, 128)]
    layer_weights = sum(m.weight.numel() for layer in core.model.layers for m in layer.linears())
    heads, head_dim = config.num_attention_heads, config.head_dim
    bs = core.config.block_size
    rows = []
    for batch, length in shapes:
        gen = torch.Generator().manual_seed(length)
        per_seq = -(-length // bs)
        chunks = [
            SeqChunk(
                torch.randint(3, config.vocab_size, (length,), generator=gen).tolist(),
                0,
                list(range(i * per_seq, (i + 1) * per_seq)),
            )
            for i in range(batch)
        ]
        layout = layout_batch(chunks, bs, core.device)
        last = torch.tensor([start + length - 1 for start in layout.query_starts], device=core.device)
        ids = torch.tensor([c.token_ids for c in chunks], device=core.device)

        def ours(layout=layout, last=last):
            hidden = core.model.forward(layout.input_ids, layout.positions, core.kv_cache, layout.meta)
            return core.model.compute_logits(hidden.index_select(0, last))

        def theirs(ids=ids):
            with torch.inference_mode():
                hidden = hf_model.model(input_ids=ids).last_hidden_state
                return hf_model.lm_head(hidden[:, -1])

        ms = median_seconds(ours, core.device, args.iters) * 1e3
        hf_ms = median_seconds(theirs, core.device, args.iters) * 1e3
        tokens = batch * length
        attention = config.num_hidden_layers * batch * 4 * heads * head_dim * length * (length + 1) / 2
        flops = 2 * layer_weights * tokens + attention + 2 * config.hidden_size * config.vocab_size * batch
        rows.append(
            {
                "batch": batch,
                "length": length,
                "ms": ms,
                "tok_s": tokens / ms * 1e3,
                "TFLOP_s": flops / ms / 1e9,
                "of_matmul_rate": flops / (ms / 1e3) / rate,
                "transformers_ms": hf_ms,
                "speedup": hf_ms / ms,
            }
        )
    return rows


def throughput(core: EngineCore, hf_model, args, penalties: dict | None = None) -> dict:
    """The offline run against transformers' `generate`; with `penalties` (SamplingParams fields), the
    engine alone, synchronous against async (penalised requests overlap steps since 2026-12-04)."""
    gen = torch.Generator().manual_seed(1)
    vocab = core.model_config.vocab_size
    prompts = torch.randint(3, vocab, (args.num_prompts, args.input_len), generator=gen)
    ids = prompts.to(core.device)

    def ours_run(prefix: str, num_tokens: int) -> dict[str, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True, **(penalties or {}))
        for i, prompt in enumerate(prompts.tolist()):
            core.add_request(f"{prefix}{i}", prompt, params, [])
        tokens: dict[str, list[int]] = {}
        while core.has_unfinished():
            for out in core.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return tokens

    def theirs_run(num_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return hf_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    def ours_timed(prefix: str, async_scheduling: bool) -> tuple[float, dict[str, list[int]]]:
        core.async_scheduling = async_scheduling  # between runs: no step is in flight
        _sync(core.device)
        start = time.perf_counter()
        tokens = ours_run(prefix, args.output_len)
        _sync(core.device)
        return time.perf_counter() - start, tokens

    # Warm-ups: compiles, the decode graph of this batch size, cuBLAS's choices; transformers' too.
    ours_run("w", 3)
    # A/B of async scheduling (the default on CUDA), same engine, same prompts.
    ours_sync, sync_tokens = ours_timed("s", False)
    ours, tokens = ours_timed("t", True)
    same = all(tokens[f"t{i}"] == sync_tokens[f"s{i}"] for i in range(args.num_prompts))
    if penalties:
        return {
            **penalties,
            "prompts": args.num_prompts,
            "duoserve_s": ours,
            "duoserve_sync_s": ours_sync,
            "async_speedup": ours_sync / ours,
            "async_tokens_equal": same,
            "duoserve_tok_s": args.num_prompts * args.output_len / ours,
        }
    theirs_run(3)
    start = time.perf_counter()
    hf_out = theirs_run(args.output_len)
    _sync(core.device)
    theirs = time.perf_counter() - start
    generated = args.num_prompts * args.output_len
    assert all(len(tokens[f"t{i}"]) == args.output_len for i in range(args.num_prompts))
    hf_tokens = hf_out[:, args.input_len :].tolist()
    first_agree = (
        sum(tokens[f"t{i}"][0] == hf_tokens[i][0] for i in range(args.num_prompts)) / args.num_prompts
    )
    return {
        "prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "duoserve_s": ours,
        "duoserve_sync_s": ours_sync,
        "async_speedup": ours_sync / ours,
        "async_tokens_equal": same,
        "transformers_s": theirs,
        "duoserve_tok_s": generated / ours,
        "transformers_tok_s": generated / theirs,
        "speedup": theirs / ours,
        "first_token_agreement": first_agree,
    }


# ------------------------------------------------------------------ report


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_step(
    core: EngineCore, batch: int, context: int, top: int = 12, settings: dict | None = None
) -> dict:
    """Kernel times of one decode step replayed from its graph (torch.profiler, CUDA activity): where a
    step's time goes, kernel by kernel; the top `top` kernels by total time. (On a CPU, --smoke: the
    eager step's ops by self time, to exercise this.) settings: switches (VARIANTS), graphs of their own."""
    cuda = core.device.type == "cuda"
    layout = decode_layout(core, batch, context)
    graphs = core.decode_graphs
    if settings and graphs is not None:
        graphs = DecodeGraphs(core.model, core.kv_cache, core.config.max_num_seqs, core.max_model_len)
    switch(core, settings or {})
    try:
        return _profile(core, decode_step(core, layout, graphs), batch, top, cuda)
    finally:
        switch(core, {})


def _profile(core: EngineCore, step, batch: int, top: int, cuda: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    _sync(core.device)
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
        _sync(core.device)
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == kind:
            us = event.device_time if cuda else event.self_cpu_time_total
            kernels.setdefault(event.name, []).append(us / 1e3)
    rows = sorted(
        ({"kernel": name[:60], "calls": len(t) // reps, "ms": sum(t) / reps} for name, t in kernels.items()),
        key=lambda row: -row["ms"],
    )
    return {
        "batch": batch,
        "kernel_ms": sum(row["ms"] for row in rows),
        "kernels": len(rows),
        "top": rows[:top],
    }


def use_tiles(path: str) -> triton_kernels.Tiles:
    """Every Triton attention backend made from now on takes these tiles (where it reads them)."""
    from duoserve.attention import triton_backend

    with open(path) as f:
        tiles = triton_kernels.Tiles(**json.load(f))
    triton_backend.tiles_for = lambda device: tiles
    print(f"tiles: {tiles}")
    return tiles


def use_gemv_tiles(path: str) -> dict:
    """The Triton GEMV takes, at 1-2 rows, exactly the shapes where a sweep's fastest tiles at one row beat
    cuBLAS (benchmarks/triton_gemv_sweep.py's gemv_sweep.json, "fastest"), with those tiles: the
    module's `gemv_chosen` and `tiles_for` replaced, for this process."""
    from duoserve.models import triton_gemv

    with open(path) as f:
        fastest = json.load(f)["fastest"]["1"]
    table = {
        (t["n"], t["k"]): triton_gemv.GemvTiles(**t["tiles"])
        for t in fastest.values()
        if t["us"] < t["cublas_us"]
    }
    default, applies = triton_gemv.tiles_for, triton_gemv.gemv_applies
    triton_gemv.tiles_for = lambda n, k: table.get((n, k)) or default(n, k)
    triton_gemv.gemv_chosen = lambda x, w: x.shape[0] <= 2 and tuple(w.shape) in table and applies(x, w)
    print(f"GEMV tiles: {table}")
    return {f"{n}x{k}": dataclasses.asdict(t) for (n, k), t in table.items()}


class Report:
    """The suite's results, written to gpu_suite.json after each part: a part that fails records its
    error and the next one runs (one device run has to bring back all it can)."""

    def __init__(self, out: str | None, parts: list[str], **fields) -> None:
        self.out, self.parts, self.data, self.failed = out, parts, dict(fields), []

    def part(self, name: str, fn, title: str, rows=lambda r: r if isinstance(r, list) else [r]):
        if name.split("_b")[0] not in self.parts:  # (profile_b1 -> profile)
            return None
        print(f"\n### {title}", flush=True)
        try:
            result = fn()
        except Exception:  # noqa: BLE001 - recorded, and the suite goes on
            import traceback

            self.failed.append(name)
            self.data[name] = {"error": traceback.format_exc()}
            print(self.data[name]["error"], flush=True)
            result = None
        else:
            self.data[name] = result
            print(table(rows(result)), flush=True)
        self.save()
        return result

    def save(self) -> None:
        if self.out:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "gpu_suite.json"), "w") as f:
                json.dump(self.data, f, indent=1, default=str)


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no GPU: run with --smoke for the tiny CPU version")
    import triton

    tiles = use_tiles(args.tiles) if args.tiles else None
    gemv_tiles = use_gemv_tiles(args.gemv_tiles) if args.gemv_tiles else None
    report = Report(
        args.out,
        args.parts,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        args=vars(args),
        tiles=None if tiles is None else dataclasses.asdict(tiles),
        gemv_tiles=gemv_tiles,
    )
    data = report.data
    t0 = time.perf_counter()
    bandwidth = copy_bandwidth(device, (1 << 31) if device.type == "cuda" else (1 << 24), max(args.iters, 5))
    data["copy_bandwidth_GBs"] = bandwidth / 1e9
    print(f"## {data['device']}: torch {torch.__version__}, triton {triton.__version__}")
    print(f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s", flush=True)

    shape = TINY if args.smoke else LLAMA_1B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report.part(
        "kernels",
        lambda: check_kernels(device, shape, dtype, args.smoke),
        "Triton vs torch backend (paged decode + mixed step)",
    )
    max_len = max(args.context, args.input_len + args.output_len) + 16
    hf_model = build_hf_model(args, device, max_len)
    core = build_engine(args, device, hf_model, "triton", max_len)
    with torch.no_grad():
        core.kv_cache.data.normal_()  # never time on zeros

    def model_check() -> dict:
        torch_core = build_engine(args, device, hf_model, "torch", max_len)
        reference = build_engine(args, device, hf_model, "torch", max_len, dtype="float32")
        try:
            return check_model(core, torch_core, reference, args.context)
        finally:
            del torch_core, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()

    report.part("model_check", model_check, "One decode step of the model, Triton vs torch backend")
    report.part(
        "fused_check",
        lambda: check_switch(core, args.context, "fused_ops"),
        "One decode step, small ops fused (Triton) vs unfused (torch)",
    )
    report.part(
        "gemv_check",
        lambda: check_switch(core, args.context, "triton_gemv"),
        "One decode step, projections through the Triton matrix-vector kernel vs cuBLAS",
    )
    report.part(
        "decode",
        lambda: time_decode(core, args, bandwidth),
        "Decode step (forward + logits + argmax), roofline = (weights + KV read) / copy bandwidth; "
        "the engine's defaults, and each of VARIANTS' switches (suffixes)",
    )
    smallest = min(args.batches)
    for batch, settings in (
        (smallest, {}),
        (64 if not args.smoke else max(args.batches), {}),
        (smallest, {"triton_gemv": False}),
    ):
        label = "".join(f"_{k}" for k in settings)
        report.part(
            f"profile_b{batch}{label}",
            lambda b=batch, s=settings: profile_step(core, b, args.context, settings=s),
            f"Kernels of one graph-replayed decode step, batch {batch} {settings or ''} (ms per step)",
            rows=lambda r: r["top"] + [{"kernel": "all kernels", "ms": r["kernel_ms"]}],
        )

    def prefill() -> list[dict]:
        rate = matmul_rate(device, 256 if args.smoke else 8192, max(args.iters // 2, 2))
        data["matmul_TFLOP_s"] = rate / 1e12
        return time_prefill(core, hf_model, args, rate)

    report.part(
        "prefill",
        prefill,
        "Prefill steps (eager), against transformers' forward and the measured matmul rate",
    )
    report.part(
        "engine_phases",
        lambda: engine_phases(core, args.num_prompts, args.input_len, args.output_len),
        "Host time per engine decode step, by phase (ms; the throughput run's shape)",
    )
    report.part(
        "throughput",
        lambda: throughput(core, hf_model, args),
        "Offline throughput vs transformers generate",
    )
    report.part(
        "throughput_penalised",
        lambda: throughput(core, hf_model, args, {"presence_penalty": 0.5, "frequency_penalty": 0.3}),
        "Offline throughput with presence and frequency penalties, synchronous vs async steps",
    )
    data["seconds"] = time.perf_counter() - t0
    checks = [c for c in ("kernels", "model_check", "fused_check", "gemv_check") if c in data]
    ok = not report.failed and all(
        all(r["ok"] for r in (data[c] if isinstance(data[c], list) else [data[c]])) for c in checks
    )
    data["correct"] = ok and all(
        data.get(part, {}).get("async_tokens_equal", True) for part in ("throughput", "throughput_penalised")
    )
    report.save()
    print(f"\ncorrect: {data['correct']}; failed parts: {report.failed or 'none'}; {data['seconds']:.0f} s")
    if not data["correct"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
