"""The quantized KV cache's static scales: calibrated at engine start on a fixed text, or read from a file.

Default: calibrated at start. One unquantized forward pass of the model over `calibration.txt` (a short
mixed text shipped with duoserve: prose, numbers, a Q&A, code, JSON; ~512 tokens, well under a second for
SmolLM2-135M on a CPU) fills a temporary cache in the model's dtype; each (layer, K or V, KV head) scale
maps that head's largest |value| times a margin to the storage dtype's largest code (127 for int8, 448 for
E4M3, 57344 for E5M2). Calibrating needs nothing but the model, so every worker serving the same model
gets the same scales (and a P/D pair's layouts agree); `--kv-scales-path` reads scales written once by
`duoserve kv-scales` instead (the same computation, or scales made elsewhere), for a fleet that wants them
pinned in a file.

Margins (`MARGINS`), measured with SmolLM2-135M in float32, teacher-forced over benchmarks/kv_accuracy.txt
(582 tokens), mean KL divergence from the float32 cache (busy shared 2-core machine; times not measured):

    int8      margin 0.8: 0.0051   1.0: 0.0022 (p99 0.014)   1.25: 0.0039    -> 1.0
    fp8_e4m3  margin 1.0: 0.0057   2.0: 0.0056 (p99 0.035)   4.0:  0.0056    -> 2.0
    fp8_e5m2  margin 2.0: 0.021 (p99 0.12)

Values past the calibrated amax x margin are clipped, values below it lose resolution as the margin grows:
int8's steps are uniform, so its margin is a trade (1.0 measured best: the calibration text's amax already
covers unseen text); E4M3 and E5M2 keep about the same relative precision over their whole range, so
their margin hardly matters (2.0: headroom for outliers at no measured cost). Calibrating in pieces of 32
tokens rather than one 512-token sequence changed int8's KLD by noise (0.0024 vs 0.0022; 128: 0.0021).

Are static per-(layer, KV head) scales good enough? int8 at 0.0022-0.0024 and E4M3 at 0.0056 are 2-6x
llama.cpp's q8_0 KV (~0.001, which stores a scale per 32 values); E5M2 (2 mantissa bits) is ~20x. Finer
scales (per block, per token or per channel) would have to be stored and moved with the blocks and read
by the kernels; they were not measured here and are the next step if int8's 0.002 is too much.
"""

from __future__ import annotations

import logging
from importlib import resources

import torch

from duoserve.engine.model_runner import SeqChunk, layout_batch
from duoserve.kv.cache import KVCache, KVCacheSpec
from duoserve.kv.quant import KVScales, kv_dtype_name

logger = logging.getLogger(__name__)

# Most tokens of the calibration text run through the model (the whole text is ~520 SmolLM2 tokens), as
# separate sequences of CALIBRATION_PIECE tokens: the scales then do not depend on how long a context the
# engine's KV cache allows (any engine of at least that context calibrates the same ones).
CALIBRATION_TOKENS = 512
CALIBRATION_PIECE = 32
# Calibrated amax x margin is what the largest code stands for (see the module docstring).
MARGINS: dict[torch.dtype, float] = {
    torch.int8: 1.0,
    torch.float8_e4m3fn: 2.0,
    torch.float8_e5m2: 2.0,
}
# A tokenizer that leaves fewer distinct tokens than this in the text does not know its words (the tests'
# word-level vocabularies): fixed pseudo-random ids over the vocabulary calibrate instead.
_MIN_DISTINCT_TOKENS = 16


def calibration_text() -> str:
    return resources.files("duoserve.kv").joinpath("calibration.txt").read_text(encoding="utf-8")


def calibration_token_ids(tokenizer, vocab_size: int, max_tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """The calibration text's first `max_tokens` tokens (`tokenizer`: duoserve's, or None)."""
    ids = [] if tokenizer is None else tokenizer.encode(calibration_text())
    if len(set(ids)) < _MIN_DISTINCT_TOKENS:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (max_tokens,), generator=generator).tolist()
    return [t for t in ids if 0 <= t < vocab_size][:max_tokens]


@torch.inference_mode()
def measure_amax(
    model, token_ids: list[int], piece: int = CALIBRATION_PIECE, block_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest |K| and |V| per (layer, KV head) of `model` (a LlamaModel) over `token_ids` cut into
    sequences of `piece` tokens, as float32 [num_layers, kv_heads] each: one forward pass (all pieces in
    one batch) into a temporary cache of the model's dtype."""
    spec = KVCacheSpec.for_model(model.config, block_size, model.dtype)
    chunks, num_blocks = [], 0
    for start in range(0, len(token_ids), piece):
        tokens = list(token_ids[start : start + piece])
        blocks = -(-len(tokens) // block_size)
        chunks.append(SeqChunk(tokens, 0, list(range(num_blocks, num_blocks + blocks))))
        num_blocks += blocks
    cache = KVCache(spec, num_blocks, model.device)
    layout = layout_batch(chunks, block_size, model.device)
    model.forward(layout.input_ids, layout.positions, cache, layout.meta)
    amax = cache.data.abs().amax(dim=(2, 3, 5)).float().cpu()  # [layers, 2, kv_heads]
    return amax[:, 0].contiguous(), amax[:, 1].contiguous()


def calibrate(
    model,
    token_ids: list[int],
    dtype: torch.dtype,
    margin: float | None = None,
    piece: int = CALIBRATION_PIECE,
) -> KVScales:
    """Static scales for a `dtype` cache of `model`, from its K/V over `token_ids` (in `piece`s)."""
    k_amax, v_amax = measure_amax(model, token_ids, piece)
    return KVScales.from_amax(k_amax, v_amax, dtype, MARGINS[dtype] if margin is None else margin)


def read_scales(path: str, dtype: torch.dtype, num_layers: int, num_kv_heads: int) -> KVScales:
    """Scales from a `--kv-scales-path` file; ValueError naming the file when they do not fit."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"kv_scales_path: cannot read {path!r}: {err.strerror}") from None
    return KVScales.from_json(
        text, kv_dtype_name(dtype), num_layers, num_kv_heads, what=f"the KV scales of {path!r}"
    )


def kv_scales_for(
    model, spec: KVCacheSpec, tokenizer, scales_path: str | None, max_model_len: int
) -> KVScales:
    """The scales a quantized `spec` cache of `model` runs with: read from `scales_path`, or calibrated on
    the calibration text (`tokenizer`: the model's, None if it has none) in pieces that fit the engine's
    context (`max_model_len`)."""
    if scales_path is not None:
        return read_scales(scales_path, spec.dtype, spec.num_layers, spec.num_kv_heads)
    token_ids = calibration_token_ids(tokenizer, model.config.vocab_size)
    piece = min(CALIBRATION_PIECE, max_model_len)
    scales = calibrate(model, token_ids, spec.dtype, piece=piece)
    logger.info(
        "KV cache %s: scales calibrated on %d tokens in pieces of %d (margin %.2f), digest %s",
        kv_dtype_name(spec.dtype),
        len(token_ids),
        piece,
        MARGINS[spec.dtype],
        scales.digest,
    )
    return scales
