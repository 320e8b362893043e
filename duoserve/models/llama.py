"""One decoder for the Llama family and its relatives, in plain torch, over a flat token batch.

Llama 2/3, Mistral, Qwen2, SmolLM2, and with per-family pieces chosen from the ModelConfig: Qwen3
(q/k norms), Qwen3-MoE and Mixtral (routed experts, `moe.py`), Gemma 2/3 ((1 + w) norms, sandwich
norms, GeGLU, scaled embeddings, soft-capping, sliding layers with their own RoPE base) and Phi-3
(fused checkpoints, LongRoPE, partial rotary).

Every step is one flat batch of tokens from many sequences (no padding, no batch dimension):
positions say where each token sits in its sequence, the attention metadata says which
sequence it belongs to. Projections are fused (QKV, gate+up) so each layer runs few, large
matmuls; norms, RoPE and the MLPs follow transformers' math so logits match it in fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from duoserve.attention.backend import AttentionBackend, AttentionMetadata
from duoserve.kv.cache import KVCache
from duoserve.models.config import SUPPORTED_ACTIVATIONS, ModelConfig, check_rope_scaling, rope_type
from duoserve.models.cpu_decode import DTYPES as CPU_DECODE_DTYPES
from duoserve.models.cpu_decode import CpuDecodeLayers, PlainLayer
from duoserve.models.gguf_quants import GGUFTensor
from duoserve.models.linear import (
    QUANTIZED_MAX_ROWS,
    DenseLinear,
    Weight,
    dense_weight,
    make_embedding,
    make_linear,
    quantized_kernels_available,
)
from duoserve.models.lora_layers import LoRALinear, LoRAMapping, LoRASlots, LoRAState
from duoserve.models.moe import MoE


def rope_inv_freq(
    config: ModelConfig, theta: float, scaling: dict | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """(inverse RoPE frequencies [rotary_dim / 2], attention factor on cos/sin), as transformers."""
    check_rope_scaling(scaling)
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    kind = rope_type(scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "longrope":
        return _longrope(config, theta, exponents, scaling, max_positions)
    if kind == "yarn":
        return _yarn(config, theta, scaling)
    return inv_freq, 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) / factor * scaled + smooth * scaled
    is_medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(is_medium, smoothed, scaled)


def _longrope(
    config: ModelConfig, theta: float, exponents: torch.Tensor, scaling: dict, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: per-frequency divisors, short ones within the pretraining context, long beyond.

    transformers picks the set per forward call from the longest sequence in it, so a cached key
    would keep the set it was computed with while later ones switch. A paged cache needs one set per
    engine: as vLLM and llama.cpp do, the long factors are used when the engine's context
    (max_positions) exceeds original_max_position_embeddings. Logits equal transformers' for every
    sequence whose length falls on the same side of that boundary as the engine's context.
    """
    original = scaling["original_max_position_embeddings"]
    factors = scaling["long_factor"] if max_positions > original else scaling["short_factor"]
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)
    factor = scaling.get("factor") or config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv_freq, attention_factor


def _yarn(config: ModelConfig, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5/Qwen3 long context): extrapolated high frequencies, interpolated low ones with a
    linear ramp between, and cos/sin scaled by 0.1 ln(factor) + 1; transformers' formula and defaults."""
    dim = config.rotary_dim
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = scaling.get("factor") or config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (
        (high + 0.001 if low == high else high) - low
    )
    extrapolation = 1 - torch.clamp(ramp, 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return functools.partial(F.gelu, approximate="tanh")
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}")


@dataclass
class _Rope:
    cos: torch.Tensor  # [max_positions, rotary_dim]
    sin: torch.Tensor

    @classmethod
    def build(
        cls, config: ModelConfig, theta: float, scaling: dict | None, max_positions: int, device, dtype
    ) -> _Rope:
        """cos/sin tables for every position, computed in float32 as transformers does."""
        inv_freq, attention_factor = rope_inv_freq(config, theta, scaling, max_positions)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1).to(device)
        return cls((emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype))


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, Weight],
        attention: AttentionBackend,
        device: torch.device,
        dtype: torch.dtype,
        max_positions: int,
        quantized: dict[str, GGUFTensor] | None = None,
        quantized_max_rows: int = QUANTIZED_MAX_ROWS,
        quantized_activations: str = "int16",
        fused_ops: bool | None = None,
    ) -> None:
        """`weights`: dense tensors, and GGUF-quantized ones as the file stores them (`quantized`, a
        subset). Where fast kernels exist and `quantized` is given, those stay quantized; otherwise each is
        dequantized into `dtype` as its layer is built. Quantized linears run their kernels on steps of up
        to `quantized_max_rows` rows (the host's own threshold: duoserve/hardware.py), float32 ones with
        activations rounded as `quantized_activations` says (int16 or int8: cpu_quant_linear). Norms,
        routers and routed experts are always dense. `fused_ops`: the layers' norms, RoPE and MLP
        activation in Triton kernels (see `fused_ops`); None: where the attention backend runs Triton's."""
        act = _activation(config.hidden_act)
        self.config = config
        self.attention = attention
        self.dtype = dtype
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        q = _Build(
            dtype,
            device,
            bool(quantized) and quantized_kernels_available(device, dtype),
            quantized_max_rows,
            quantized_activations,
        )
        w = {
            n: t if q.quantized and isinstance(t, GGUFTensor) else dense_weight(t, dtype, device)
            for n, t in weights.items()
        }
        self.embed = make_embedding(w["model.embed_tokens.weight"], dtype, device, q.quantized)
        # transformers multiplies by the scale rounded to the model dtype (Gemma's bfloat16 sqrt(2304)).
        self.embedding_scale = (
            None if config.embedding_scale is None else torch.tensor(config.embedding_scale, dtype=dtype)
        )
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self.lm_head = _linear(w, q, [head])
        if config.tie_word_embeddings and hasattr(self.lm_head, "rows"):
            # One copy of a tied table: lookups decode the lm_head's codes (SmolLM2: 30 MB less).
            self.embed = RowsOf(self.lm_head)
        self.ops = SmallOps()  # shared by every norm and layer: `fused_ops` switches them all
        self.norm = RMSNorm.of(_dense(w, q, "model.norm.weight"), config, self.ops)
        ropes = {
            "full": _Rope.build(config, config.rope_theta, config.rope_scaling, max_positions, device, dtype)
        }
        if config.rope_local_theta is not None:
            ropes["local"] = _Rope.build(config, config.rope_local_theta, None, max_positions, device, dtype)
        self.layers = [
            _Layer.from_weights(w, q, i, config, act, ropes, max_positions, self.ops)
            for i in range(config.num_hidden_layers)
        ]
        self.device = device
        self.lora_state: LoRAState | None = None  # set by add_lora_slots
        self.fused_ops = getattr(attention, "runs_triton", False) if fused_ops is None else fused_ops
        self.triton_gemv = self.fused_ops and device.type == "cuda"
        self._cpu_decode: CpuDecodeLayers | None = None
        self._cpu_decode_key: tuple[bool, bool, bool] | None = None  # what _cpu_decode was built for
        self.cpu_decode_layers = True

    @property
    def fused_ops(self) -> bool:
        """Whether the layers' small ops (each RMSNorm with the residual add before it, RoPE of q and k,
        the MLP's act(gate) * up) run as Triton kernels (models/triton_ops.py): one launch each instead of
        up to ~10 torch ops. By default
        where the attention backend runs Triton's kernels (CUDA; the CPU under TRITON_INTERPRET=1, for
        tests); off, the CPU runs its C++ ops and other devices torch's. Settable (an A/B of one model:
        benchmarks/gpu_suite.py); a captured CUDA graph keeps the kernels it was captured with."""
        return self.ops.triton

    @fused_ops.setter
    def fused_ops(self, on: bool) -> None:
        if on:
            _triton_ops().check_device(self.device)
        self.ops.triton = bool(on)

    @property
    def fused_rope_store(self) -> bool:
        """With `fused_ops`: whether RoPE's launch also writes the step's K/V into the cache, where the
        attention backend lets the model store (the Triton backend's float pools), instead of the
        backend's own store launch. On by default; settable (benchmarks/gpu_suite.py times both)."""
        return self.ops.rope_store

    @fused_rope_store.setter
    def fused_rope_store(self, on: bool) -> None:
        self.ops.rope_store = bool(on)

    @property
    def triton_gemv(self) -> bool:
        """Whether the layers' dense projections run the steps where it beat cuBLAS (1-2 rows, weights
        of up to 8192 outputs: `triton_gemv.gemv_chosen`) through duoserve's Triton matrix-vector kernel
        (models/triton_gemv.py) instead of torch's matmul. On by default on CUDA, with `fused_ops`: a
        Llama 1B-shaped batch-1 decode step took 7% less on an H200 (benchmarks/gpu_suite.py's
        `graph_ms_gemv`, BENCHMARKS.md); off elsewhere (under Triton's interpreter only when asked: tests).
        Settable; a captured CUDA graph keeps the kernels it was captured with."""
        return any(linear.few_rows is not None for linear in self._dense_projections())

    @triton_gemv.setter
    def triton_gemv(self, on: bool) -> None:
        module = None
        if on:
            _triton_ops().check_device(self.device)
            from duoserve.models import triton_gemv

            module = triton_gemv
        for linear in self._dense_projections():
            linear.few_rows = module

    @property
    def cpu_decode_layers(self) -> bool:
        """Whether pure decode steps of a CPU model (bfloat16, or float32) run all layers in one C++ call
        (models/cpu_decode.py: the same ops, bit for bit, without ~1.5 ms of Python and dispatch a
        SmolLM2 step) where the model and step qualify. On by default; settable (an A/B, tests)."""
        return self._cpu_decode_on

    @cpu_decode_layers.setter
    def cpu_decode_layers(self, on: bool) -> None:
        self._cpu_decode_on = bool(on)

    def _cpu_decode_loop(self) -> CpuDecodeLayers | None:
        """The one-call decode loop over this model's layers as they are now, or None: built on first
        use and again after a switch it depends on (this one, `fused_ops`, LoRA slots) changed. (The
        dense linears' Triton GEMV, `triton_gemv`, comes only with Triton devices, where it never runs.)"""
        key = (self._cpu_decode_on, self.ops.triton, self.lora_state is None)
        if self._cpu_decode_key != key:
            eligible = (
                self._cpu_decode_on
                and self.device.type == "cpu"
                and self.dtype in CPU_DECODE_DTYPES
                and self.lora_state is None
                and not self.ops.triton
                and _cpu_ops()
            )
            parts = [layer.plain_parts() for layer in self.layers] if eligible else []
            self._cpu_decode = CpuDecodeLayers.of(parts)
            self._cpu_decode_key = key
        return self._cpu_decode

    def _dense_projections(self) -> list[DenseLinear]:
        """The layers' dense matmuls (lm_head left out: cuBLAS reads it at the copy bandwidth)."""
        return [m for layer in self.layers for m in layer.linears() if isinstance(m, DenseLinear)]

    def add_lora_slots(self, max_loras: int, max_rank: int) -> list[dict[str, LoRASlots]]:
        """Give every layer's projections `max_loras` LoRA slots of rank `max_rank` (duoserve/lora);
        returns them per layer, by fused linear (qkv, o, gate_up, down; no MLP ones in MoE layers)."""
        self.lora_state = LoRAState()
        return [
            layer.add_lora(max_loras, max_rank, self.lora_state, self.dtype, self.device)
            for layer in self.layers
        ]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        lora_slots: list[int] | None = None,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] before the final norm. `lora_slots`: each token's LoRA slot
        (-1: none), for a model with add_lora_slots."""
        if lora_slots is None or self.lora_state is None:
            return self._forward(input_ids, positions, kv_cache, meta)
        self.lora_state.mapping = LoRAMapping.of(lora_slots, self.dtype, self.device)
        try:
            return self._forward(input_ids, positions, kv_cache, meta)
        finally:
            self.lora_state.mapping = None

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        self.attention.prepare(meta)
        x = self.embed(input_ids)
        if self.embedding_scale is not None:
            x = x * self.embedding_scale
        rotations: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per table: cos/sin of `positions`
        loop = self._cpu_decode_loop()
        if loop is not None:
            cos, sin = loop.rope.cos[positions][:, None, :], loop.rope.sin[positions][:, None, :]
            if loop.applies(x.shape[0], cos, self.attention, kv_cache, meta):
                return loop(x, cos, sin, kv_cache, meta, self.scale)
            rotations[id(loop.rope)] = (cos, sin)
        delta = None  # the last layer's output, added to x by the next norm (fused with it)
        for index, layer in enumerate(self.layers):
            key = id(layer.rope)
            if key not in rotations:
                rotations[key] = (
                    layer.rope.cos[positions][:, None, :],
                    layer.rope.sin[positions][:, None, :],
                )
            cos, sin = rotations[key]
            x, delta = layer(x, delta, cos, sin, self.attention, kv_cache.layer(index), meta, self.scale)
        return x if delta is None else x + delta

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the given hidden-state rows."""
        logits = self.lm_head(self.norm(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class RowsOf:
    """An embedding read from a quantized linear's codes (`linear.rows(ids)`): a tied table held once."""

    def __init__(self, linear) -> None:
        self.linear = linear

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.linear.rows(unique)[inverse]


@functools.cache
def _cpu_ops() -> bool:
    """duoserve's one-op RMSNorm and RoPE (CPU kernels, models/csrc/decode_ops_cpu.cpp) for float32 and
    bfloat16 CPU models: torch's RMSNorm is 6 small ops and two casts, its RoPE 7 ops per tensor. With
    them (and the backend's K/V store op) a SmolLM2-135M bfloat16 batch-1 layer spends 33 us outside
    its matmuls instead of 80 (one thread, Zen 5, CPU time)."""
    from duoserve.cpu_kernels import cpu_kernels_available

    return cpu_kernels_available()


_CPU_OP_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class SmallOps:
    """Where a model's small per-layer ops run: one object per model, shared by its norms and layers.
    triton: duoserve/models/triton_ops.py's kernels (the GPU path: `LlamaModel.fused_ops`); otherwise
    the CPU's C++ ops where they apply (`_cpu_ops`), torch's elsewhere."""

    triton: bool = False
    # With triton: RoPE writes the step's K/V into the cache too where the attention backend lets it
    # (`model_store_pools`): one launch instead of two a layer (LlamaModel.fused_rope_store).
    rope_store: bool = True


@functools.cache
def _triton_ops():
    """duoserve/models/triton_ops.py, imported on first use: triton is optional, and CPU models never
    need it."""
    try:
        from duoserve.models import triton_ops
    except ImportError as error:
        raise ValueError("fused ops need the triton package (pip install 'duoserve[gpu]')") from error
    return triton_ops


@dataclass
class RMSNorm:
    """transformers' RMSNorm: normalise in float32; Llama scales in the model's dtype, Gemma scales by
    (1 + w) in float32 (`weight` then holds 1 + w, in float32).

    torch's fused rms_norm on bfloat16 input loses too much in its sum of squares: SmolLM2's residual
    stream has outlier channels, and its bfloat16 answers went wrong (greedy "What is the capital of
    France?" gave "L'Etoile, la Marseillaise..." instead of "...Paris.").
    """

    weight: torch.Tensor
    eps: float
    plus_one: bool
    ops: SmallOps = field(default_factory=SmallOps)

    @classmethod
    def of(cls, weight: torch.Tensor, config: ModelConfig, ops: SmallOps | None = None) -> RMSNorm:
        ops = SmallOps() if ops is None else ops
        if config.norm_plus_one:
            return cls(1.0 + weight.float(), config.rms_norm_eps, True, ops)
        return cls(weight, config.rms_norm_eps, False, ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops.triton and _triton_ops().norm_applies(x, self.weight, self.plus_one):
            return _triton_ops().rms_norm(x, self.weight, self.eps)
        if self._in_kernel(x):
            return torch.ops.duoserve_cpu.norm_rows(
                x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps
            ).view(x.shape)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.plus_one:
            return (normed * self.weight).to(x.dtype)
        return normed.to(x.dtype) * self.weight

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, its norm): a residual add and the norm after it, one op in the CPU and Triton
        kernels."""
        if self.ops.triton and _triton_ops().add_norm_applies(x, delta, self.weight, self.plus_one):
            return _triton_ops().add_rms_norm(x, delta, self.weight, self.eps)
        if x.dim() == 2 and delta.dtype == x.dtype and self._in_kernel(x):
            total, normed = torch.ops.duoserve_cpu.add_norm_rows(
                x.contiguous(), delta.contiguous(), self.weight, self.eps
            )
            return total, normed
        x = x + delta
        return x, self(x)

    def _in_kernel(self, x: torch.Tensor) -> bool:
        """Whether the CPU kernel computes this norm as the torch ops below do: float32 rows scaled in
        float32, bfloat16 ones by a bfloat16 weight (rounded normed rows) or a float32 1 + w."""
        if not (x.is_cpu and x.dtype in _CPU_OP_DTYPES and _cpu_ops()):
            return False
        weight_dtype = torch.float32 if self.plus_one or x.dtype == torch.float32 else x.dtype
        return self.weight.dtype == weight_dtype


def _rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, triton: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k (_rope's math), one op in the CPU kernel; with `triton` one in-place launch."""
    if triton and _triton_ops().rope_applies(q, k, cos, sin):
        return _triton_ops().rope_qk_(q, k, cos, sin)
    if q.is_cpu and q.dtype in _CPU_OP_DTYPES and cos.dtype == q.dtype and _cpu_ops():
        q, k = torch.ops.duoserve_cpu.rope_qk(q, k, cos, sin)
        return q, k
    return _rope(q, cos, sin), _rope(k, cos, sin)


def _rope_store(q, k, v, cos, sin, attention: AttentionBackend, kv_cache, meta: AttentionMetadata) -> bool:
    """RoPE of q and k and the store of k and v into the layer's cache in one Triton launch, where the
    backend gives the pools (`model_store_pools`) and the kernel takes the step; whether it ran."""
    pools_of = getattr(attention, "model_store_pools", None)
    pools = None if pools_of is None else pools_of(kv_cache)
    if pools is None:
        return False
    write = _triton_ops().KVWrite(v, *pools, meta.slot_mapping)
    if not _triton_ops().rope_store_applies(q, k, cos, sin, write):
        return False
    _triton_ops().rope_qk_store_(q, k, cos, sin, write)
    return True


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half RoPE on the first r dims: x [T, heads, dim], cos/sin [T, 1, r]."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary: the remaining dims pass through
        return torch.cat((_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = rotary // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


Linear = DenseLinear  # or one of its quantized subclasses


@dataclass
class _DenseMLP:
    gate_up: Linear  # gate rows, then up rows
    down_proj: Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    activation: str = "silu"  # act's name (ModelConfig.hidden_act)
    ops: SmallOps = field(default_factory=SmallOps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if self.ops.triton and _triton_ops().act_mul_applies(gate_up, self.activation):
            return self.down_proj(_triton_ops().act_mul(gate_up, self.activation))
        if self._act_mul_in_kernel(gate_up):
            return self.down_proj(torch.ops.duoserve_cpu.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def _act_mul_in_kernel(self, gate_up: torch.Tensor) -> bool:
        """silu(gate) * up in one CPU op (models/csrc/decode_ops_cpu.cpp: torch's two ops' rounding)."""
        return (
            self.activation == "silu"
            and gate_up.is_cpu
            and gate_up.dtype in _CPU_OP_DTYPES
            and gate_up.dim() == 2
            and gate_up.is_contiguous()
            and _cpu_ops()
        )


@dataclass
class _Layer:
    """One decoder layer's weights, with Q/K/V and gate/up fused into single matmuls."""

    input_norm: RMSNorm
    qkv: Linear
    qkv_sizes: list[int]
    q_norm: RMSNorm | None  # per head, before RoPE (Qwen3, Gemma 3)
    k_norm: RMSNorm | None
    o_proj: Linear
    attn_out_norm: RMSNorm | None  # Gemma: on the attention output, before the residual add
    mlp_norm: RMSNorm  # before the MLP (Llama's post_attention_layernorm, Gemma's pre_feedforward)
    mlp: _DenseMLP | MoE
    mlp_out_norm: RMSNorm | None  # Gemma: on the MLP output, before the residual add
    rope: _Rope
    heads: tuple[int, int, int]  # (query heads, kv heads, head_dim)
    sliding_window: int | None  # None: full attention
    logits_soft_cap: float | None
    ops: SmallOps  # the model's: where the norms and RoPE run

    def __call__(
        self, x, delta, cos, sin, attention: AttentionBackend, kv_cache, meta, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, this layer's output to add to it) from the stream and the last layer's
        output (None for the first layer): each residual add runs in the norm after it."""
        num_heads, num_kv_heads, head_dim = self.heads
        x, h = (x, self.input_norm(x)) if delta is None else self.input_norm.add(x, delta)
        q, k, v = self.qkv(h).split(self.qkv_sizes, dim=-1)
        q, k = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
        v = v.view(-1, num_kv_heads, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        stored = (
            self.ops.triton
            and self.ops.rope_store
            and _rope_store(q, k, v, cos, sin, attention, kv_cache, meta)
        )
        if not stored:
            q, k = _rope_qk(q, k, cos, sin, self.ops.triton)
        attn = attention.forward(
            q,
            k,
            v,
            kv_cache,
            meta,
            scale,
            sliding_window=self.sliding_window,
            logits_soft_cap=self.logits_soft_cap,
            **({"kv_stored": True} if stored else {}),  # (only backends with model_store_pools take it)
        )
        x, h = self.mlp_norm.add(x, _maybe(self.attn_out_norm, self.o_proj(attn.flatten(1))))
        return x, _maybe(self.mlp_out_norm, self.mlp(h))

    def plain_parts(self) -> PlainLayer | None:
        """The layer as models/cpu_decode.py's one-call decode loop runs it, or None where it has a part
        that loop leaves out (q/k norms, sandwich norms, a sliding window, soft-capping, experts, a
        non-SiLU MLP, Gemma's 1 + w norms); its linears are checked there."""
        mlp = self.mlp
        if (
            self.q_norm is not None
            or self.attn_out_norm is not None
            or self.mlp_out_norm is not None
            or self.sliding_window is not None
            or self.logits_soft_cap is not None
            or not isinstance(mlp, _DenseMLP)
            or mlp.activation != "silu"
            or self.input_norm.plus_one
            or self.mlp_norm.plus_one
            or self.input_norm.eps != self.mlp_norm.eps
        ):
            return None
        linears = (self.qkv, self.o_proj, mlp.gate_up, mlp.down_proj)
        return PlainLayer(
            self.input_norm.weight, self.mlp_norm.weight, self.input_norm.eps, linears, self.heads, self.rope
        )

    def linears(self) -> list[Linear]:
        """The dense or quantized matmuls of the layer (routed experts are plain tensors; LoRA slots
        left out)."""
        mlp = [self.mlp.gate_up, self.mlp.down_proj] if isinstance(self.mlp, _DenseMLP) else []
        return [m.base if isinstance(m, LoRALinear) else m for m in (self.qkv, self.o_proj, *mlp)]

    def add_lora(
        self, max_loras: int, max_rank: int, state: LoRAState, dtype: torch.dtype, device: torch.device
    ) -> dict[str, LoRASlots]:
        """Wrap the projections in LoRALinears over new slots; the slots by fused linear."""
        num_heads, num_kv_heads, head_dim = self.heads
        hidden = self.qkv.in_features

        def slots(in_features: int, parts: list[int]) -> LoRASlots:
            return LoRASlots(in_features, parts, max_loras, max_rank, dtype, device)

        sites = {"qkv": slots(hidden, list(self.qkv_sizes)), "o": slots(num_heads * head_dim, [hidden])}
        self.qkv = LoRALinear(self.qkv, sites["qkv"], state)
        self.o_proj = LoRALinear(self.o_proj, sites["o"], state)
        if isinstance(self.mlp, _DenseMLP):
            inter = self.mlp.down_proj.in_features
            sites["gate_up"] = slots(hidden, [inter, inter])
            sites["down"] = slots(inter, [hidden])
            self.mlp.gate_up = LoRALinear(self.mlp.gate_up, sites["gate_up"], state)
            self.mlp.down_proj = LoRALinear(self.mlp.down_proj, sites["down"], state)
        return sites

    def norms(self) -> list[torch.Tensor]:
        norms = (
            self.input_norm,
            self.q_norm,
            self.k_norm,
            self.attn_out_norm,
            self.mlp_norm,
            self.mlp_out_norm,
        )
        return [n.weight for n in norms if n is not None]

    @classmethod
    def from_weights(
        cls,
        w: dict[str, Weight],
        q: _Build,
        index: int,
        config: ModelConfig,
        act: Callable[[torch.Tensor], torch.Tensor],
        ropes: dict[str, _Rope],
        max_positions: int,
        ops: SmallOps,
    ) -> _Layer:
        p = f"model.layers.{index}."
        attn = p + "self_attn."
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        bias = None
        if config.attention_bias:
            bias = torch.cat([w[f"{attn}{n}_proj.bias"] for n in "qkv"])
        qkv_names = (
            [attn + "qkv_proj.weight"]
            if config.fused_projections
            else [f"{attn}{n}_proj.weight" for n in "qkv"]
        )
        window = config.layer_sliding_window(index)
        sliding = config.is_sliding_layer(index)

        def norm(name: str) -> RMSNorm:
            return RMSNorm.of(_dense(w, q, p + name + ".weight"), config, ops)

        return cls(
            input_norm=norm("input_layernorm"),
            qkv=_linear(w, q, qkv_names, bias),
            qkv_sizes=[q_size, kv_size, kv_size],
            q_norm=norm("self_attn.q_norm") if config.qk_norm else None,
            k_norm=norm("self_attn.k_norm") if config.qk_norm else None,
            o_proj=_linear(w, q, [attn + "o_proj.weight"]),
            attn_out_norm=norm("post_attention_layernorm") if config.sandwich_norms else None,
            mlp_norm=norm(
                "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
            ),
            mlp=_mlp(w, q, p + "mlp.", index, config, act, ops),
            mlp_out_norm=norm("post_feedforward_layernorm") if config.sandwich_norms else None,
            rope=ropes["local"] if sliding and "local" in ropes else ropes["full"],
            heads=(config.num_attention_heads, config.num_key_value_heads, config.head_dim),
            # A window as long as the model's context never hides a key: run those layers as full ones.
            sliding_window=window if window is not None and window < max_positions else None,
            logits_soft_cap=config.attn_logit_softcapping,
            ops=ops,
        )


def _mlp(
    w: dict[str, Weight],
    q: _Build,
    prefix: str,
    index: int,
    config: ModelConfig,
    act: Callable[[torch.Tensor], torch.Tensor],
    ops: SmallOps,
) -> _DenseMLP | MoE:
    if config.is_moe_layer(index):
        return MoE(
            router=_dense(w, q, prefix + "gate.weight"),
            gate_up=_dense(w, q, prefix + "experts.gate_up_proj"),
            down=_dense(w, q, prefix + "experts.down_proj"),
            top_k=config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
            act=act,
        )
    gate_up = (
        [prefix + "gate_up_proj.weight"]
        if config.fused_projections
        else [
            prefix + "gate_proj.weight",
            prefix + "up_proj.weight",
        ]
    )
    down = _linear(w, q, [prefix + "down_proj.weight"])
    return _DenseMLP(_linear(w, q, gate_up), down, act, config.hidden_act, ops)


def _maybe(norm: RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


@dataclass(frozen=True)
class _Build:
    """How linears are built: their dtype and device, and whether quantized weights stay quantized."""

    dtype: torch.dtype
    device: torch.device
    quantized: bool
    max_rows: int  # quantized linears run their kernels on steps of up to this many rows
    activations: str = "int16"  # how float32 models' kernels round x (cpu_quant_linear)


def _dense(w: dict[str, Weight], q: _Build, name: str) -> torch.Tensor:
    """Norms, routers and routed experts run dense whatever the file stores (see moe.py)."""
    return dense_weight(w[name], q.dtype, q.device)


def _linear(w: dict[str, Weight], q: _Build, names: list[str], bias: torch.Tensor | None = None) -> Linear:
    """One matmul over the named weights stacked along their outputs."""
    return make_linear([w[n] for n in names], bias, q.dtype, q.device, q.quantized, q.max_rows, q.activations)
