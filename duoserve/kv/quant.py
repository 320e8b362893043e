"""Quantized KV cache: storage dtypes, static per-(layer, KV head) scales, quantize and dequantize.

`--kv-cache-dtype fp8_e4m3 | fp8_e5m2 | int8` stores each K/V value in one byte (vLLM's names; `auto` is
the model's dtype). A stored value means `stored.to(float32) * scale[head]`, with one float32 scale per
layer, K or V, and KV head. Writing (`quantize`):

    int8:  round(clamp(x / scale, -127, 127))            (symmetric: -128 is never written)
    fp8:   (x / scale).clamp(-max_finite, max_finite).to(fp8)     (448 for E4M3, 57344 for E5M2)

Scales are static, decided once per engine (duoserve/kv/calibrate.py: calibrated at start from a fixed
text, or read from a `--kv-scales-path` JSON file), so that any two holders of blocks (a P/D pair, the
offload tiers) can check they mean the same thing by comparing a digest (`KVScales.digest`, part of
`KVLayout`). Per-token or per-block dynamic scales would have to be stored and moved with the blocks and
read by the kernels; the measured cost of static ones (SmolLM2: KL divergence 0.002 for int8, 0.006 for
E4M3, 0.02 for E5M2) is in duoserve/kv/calibrate.py.

Scales are rounded up to a grid of 2^(1/16) steps (4.4%): two workers that calibrate the same model on
the same text get the same scales even if their floating-point sums differ in the last bits (other
thread counts), so their layouts agree. It costs at most 0.06 bits of int8 resolution.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch

# --kv-cache-dtype's quantized choices -> storage dtype.
QUANTIZED_KV_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
}
_NAMES = {dtype: name for name, dtype in QUANTIZED_KV_DTYPES.items()}
# Steps per octave of the scale grid (see the module docstring).
_GRID = 16


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in _NAMES


def kv_dtype_name(dtype: torch.dtype) -> str:
    """--kv-cache-dtype's name of a storage dtype (e.g. "fp8_e4m3"); torch's for the unquantized ones."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def max_code(dtype: torch.dtype) -> float:
    """The largest magnitude a stored value may have: what a scale maps the calibrated amax (x margin) to."""
    return 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [tokens, kv_heads, dim] (any float dtype) -> stored values of `dtype`; scale [kv_heads] float32."""
    y = x.float() / scale[:, None]
    if dtype == torch.int8:
        return y.round_().clamp_(-127, 127).to(torch.int8)
    limit = max_code(dtype)
    return y.clamp_(-limit, limit).to(dtype)


def dequantize(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored values [..., kv_heads, dim] -> `dtype`, each head times its scale (in float32)."""
    return (stored.float() * scale[:, None]).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-byte tensor seen as uint8: copies and index ops on it then need no fp8 kernel of their own."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def round_scale(scale: float) -> float:
    """Up to the next step of the 2^(1/16) grid (the smallest positive normal float32 at least)."""
    scale = max(scale, torch.finfo(torch.float32).tiny)
    return 2.0 ** (math.ceil(math.log2(scale) * _GRID - 1e-9) / _GRID)


@dataclass(frozen=True)
class KVScales:
    """One float32 scale per layer and KV head, for K and for V (immutable: part of a KVCacheSpec)."""

    k: tuple[tuple[float, ...], ...]  # [num_layers][num_kv_heads]
    v: tuple[tuple[float, ...], ...]

    @classmethod
    def from_amax(
        cls, k_amax: torch.Tensor, v_amax: torch.Tensor, dtype: torch.dtype, margin: float
    ) -> KVScales:
        """Scales mapping amax x margin ([num_layers, kv_heads] each) to the dtype's largest value."""

        def scales(amax: torch.Tensor) -> tuple[tuple[float, ...], ...]:
            top = max_code(dtype)
            return tuple(tuple(round_scale(a * margin / top) for a in row) for row in amax.double().tolist())

        return cls(scales(k_amax), scales(v_amax))

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_kv_heads(self) -> int:
        return len(self.k[0]) if self.k else 0

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scales, v_scales), each float32 [num_layers, kv_heads] on `device`."""
        return (
            torch.tensor(self.k, dtype=torch.float32, device=device),
            torch.tensor(self.v, dtype=torch.float32, device=device),
        )

    @property
    def digest(self) -> str:
        """16 hex digits naming these exact values (their float32 bytes): what KVLayout compares."""
        k, v = self.tensors(torch.device("cpu"))
        data = k.numpy().tobytes() + v.numpy().tobytes()
        return hashlib.blake2b(data, digest_size=8).hexdigest()

    def to_json(self, kv_cache_dtype: str, **about) -> str:
        """The file `--kv-scales-path` reads: the dtype the scales are for, the scales, and `about`
        (how they were made: model, text, margin), which is not read back."""
        body = {"kv_cache_dtype": kv_cache_dtype, "k_scale": self.k, "v_scale": self.v, "about": about}
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(
        cls, text: str, kv_cache_dtype: str, num_layers: int, num_kv_heads: int, what: str = "KV scales"
    ) -> KVScales:
        """Scales from `to_json`'s text; ValueError unless they are for this dtype and cache shape."""
        try:
            body = json.loads(text)
            dtype = body["kv_cache_dtype"]
            k = tuple(tuple(float(s) for s in row) for row in body["k_scale"])
            v = tuple(tuple(float(s) for s in row) for row in body["v_scale"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{what}: not a KV scales file ({err})") from None
        if dtype != kv_cache_dtype:
            raise ValueError(f"{what} are for kv_cache_dtype {dtype}, not {kv_cache_dtype}")
        for name, table in (("k_scale", k), ("v_scale", v)):
            if len(table) != num_layers or any(len(row) != num_kv_heads for row in table):
                raise ValueError(
                    f"{what}: {name} must be {num_layers} layers x {num_kv_heads} KV heads (this model's)"
                )
            if not all(math.isfinite(s) and s > 0 for row in table for s in row):
                raise ValueError(f"{what}: {name} must be finite and positive")
        return cls(k, v)
