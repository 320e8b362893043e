"""Engine configuration: one dataclass, from which the CLI's engine arguments are derived."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

import torch

from duoserve.hardware import host_defaults
from duoserve.kv.quant import QUANTIZED_KV_DTYPES
from duoserve.lora.request import LoRARequest

# What --kv-scales-path and `duoserve kv-scales` (static scales, calibrated at start) now answer.
KV_SCALES_GONE = (
    "kv_scales_path: quantized KV caches now keep a float16 scale per (token, KV head), set as each token's "
    "K/V is written (duoserve/kv/quant.py): there are no static scales to calibrate or read; drop the flag"
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --kv-cache-dtype's choices besides auto (vLLM's names): the model dtypes, then one-byte quantized ones.
_KV_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    **QUANTIZED_KV_DTYPES,
}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def parse_kv_cache_dtype(name: str) -> torch.dtype:
    """A KV cache storage dtype by --kv-cache-dtype's name (not auto)."""
    if name not in _KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(_KV_DTYPES)}, got {name!r}")
    return _KV_DTYPES[name]


def _arg(help_text: str, **extra) -> dict:
    return {"help": help_text, **extra}


@dataclass
class EngineConfig:
    """Everything that shapes an engine. Each field is also a `--kebab-case` CLI flag."""

    model: str | None = field(
        default=None, metadata=_arg("HF model directory or .gguf file; None: SmolLM2-135M-Instruct Q4_1")
    )
    device: str = field(default="auto", metadata=_arg("cpu, cuda, cuda:N, or auto (cuda when available)"))
    dtype: str = field(
        default="auto",
        metadata=_arg(
            "auto (bfloat16 on CUDA; on CPU what the host runs fastest: `duoserve env` says which and "
            "why), float32, bfloat16, float16"
        ),
    )
    quantization: str = field(
        default="auto",
        metadata=_arg(
            "auto: GGUF-quantized weights stay quantized (4 or 8-bit) where a kernel exists "
            "(CPU: bfloat16 or float32); none: dequantized weights only"
        ),
    )
    quantized_max_rows: int | None = field(
        default=None,
        metadata=_arg(
            "steps of up to this many rows read the 4/8-bit codes, larger ones dequantized tiles "
            "(default: per host and dtype, measured once; 0: never, the weights are dequantized at load)"
        ),
    )
    quantized_activations: str = field(
        default="auto",
        metadata=_arg(
            "how float32 models' 4/8-bit kernels round activations for their integer products: int16 "
            "(within 1e-4 of transformers), int8 (llama.cpp's q8 blocks: faster where integer multiplies "
            "bound a decode step, KL divergence measured in BENCHMARKS.md), or auto (the host's choice: "
            "`duoserve env` says which and why)"
        ),
    )
    attention_backend: str = field(
        default="auto",
        metadata=_arg(
            "auto (triton on CUDA; on CPU: cpu where its kernel builds, else torch), torch (SDPA over "
            "gathered blocks), cpu (paged C++ decode kernel, built on first use), or triton (paged Triton "
            "kernels, and the layers' norms, RoPE and MLP activation fused in Triton too: CUDA, or the CPU "
            "under TRITON_INTERPRET=1 for tests)"
        ),
    )
    enforce_eager: bool = field(
        default=False,
        metadata=_arg(
            "CUDA: run decode steps eagerly too (no CUDA graphs, which are captured per batch size)"
        ),
    )
    async_scheduling: bool | None = field(
        default=None,
        metadata=_arg(
            "schedule step n+1 while step n runs, feeding it step n's tokens from the device (vLLM's "
            "--async-scheduling); steps with requests whose sampling needs their last token on the host "
            "(logprobs, penalties, min_tokens, structured outputs, drafts) run synchronously. Default: on "
            "for CUDA, where it hides the host's scheduling behind the GPU's step; off on a CPU, where the "
            "forward itself runs on the host and it only delays each token by a step"
        ),
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata=_arg(
            "KV cache storage: auto (= dtype), bfloat16, float16, float32, or one byte a value with "
            "a float16 scale per (token, KV head): fp8_e4m3, fp8_e5m2, int8 (1.94x the tokens of bfloat16 "
            "in the same memory at head size 64; accuracy in benchmarks/kv_accuracy.py)"
        ),
    )
    kv_scales_path: str | None = field(
        default=None,
        metadata=_arg(
            "no longer used: quantized KV caches scale each (token, KV head) as it is written, so there "
            "are no static scales to read (setting it is an error that says so)"
        ),
    )
    block_size: int = field(default=16, metadata=_arg("tokens per KV cache block"))
    kv_cache_memory: int | None = field(
        default=None, metadata=_arg("KV cache size in bytes (overrides --kv-cache-memory-fraction)")
    )
    kv_cache_memory_fraction: float = field(
        default=0.2, metadata=_arg("fraction of free device memory given to the KV cache")
    )
    num_kv_blocks: int | None = field(default=None, metadata=_arg("exact number of KV blocks (testing)"))
    max_num_batched_tokens: int = field(default=512, metadata=_arg("token budget per engine step"))
    max_num_seqs: int = field(default=128, metadata=_arg("most requests running at once"))
    max_model_len: int | None = field(
        default=None, metadata=_arg("context length limit (default: the model's)")
    )
    enable_prefix_caching: bool = field(default=True, metadata=_arg("reuse KV blocks of shared prefixes"))
    seed: int | None = field(default=0, metadata=_arg("seed of the sampler for unseeded requests"))
    step_trace: str | None = field(
        default=None,
        metadata=_arg(
            "write a JSON line per engine step (shape, batch, time) to this file, for `duoserve plan "
            "profile --from-trace`; `{pid}` and `{role}` in it are replaced by the engine process's id and "
            "the worker's --role (a file per worker; `duoserve up` gives each worker its own)"
        ),
    )
    num_threads: int | None = field(
        default=None,
        metadata=_arg("CPU threads for torch (default: the physical cores this process may use)"),
    )
    # Speculative decoding (duoserve/engine/spec): proposals verified by the target in one forward pass.
    speculative: str | None = field(
        default=None, metadata=_arg("speculative decoding: ngram (prompt lookup) or draft (a draft model)")
    )
    num_speculative_tokens: int = field(default=4, metadata=_arg("most draft tokens per request per step"))
    draft_model: str | None = field(
        default=None, metadata=_arg("draft model (same tokenizer) for --speculative draft; None: the target")
    )
    draft_num_layers: int | None = field(
        default=None, metadata=_arg("run only the draft's first N layers (a self-speculative draft)")
    )
    ngram_min: int = field(default=2, metadata=_arg("shortest n-gram that prompt lookup matches"))
    ngram_max: int = field(default=5, metadata=_arg("longest n-gram that prompt lookup matches"))
    speculative_max_num_seqs: int = field(
        default=16,
        metadata=_arg("speculate only while at most this many requests decode (larger: compute-bound)"),
    )
    speculative_rate_backoff: bool = field(
        default=True,
        metadata=_arg("stop drafting at batch sizes where decode tok/s measured slower with drafts"),
    )
    speculative_min_acceptance: float = field(
        default=0.3,
        metadata=_arg("a request whose draft acceptance rate falls below this pauses speculating"),
    )
    # KV offload (duoserve/kv/offload): prefix blocks evicted from the KV cache go to more tiers, and back.
    kv_offload_dir: str | None = field(
        default=None,
        metadata=_arg(
            "directory of a disk tier keeping prefix blocks evicted from the KV cache (and found again "
            "after a restart); each worker needs its own"
        ),
    )
    kv_offload_max_bytes: int | None = field(
        default=None,
        metadata=_arg("byte limit of the disk tier (default: half its filesystem's free space at start)"),
    )
    kv_offload_cpu_bytes: int = field(
        default=0,
        metadata=_arg("bytes of pinned host RAM keeping blocks evicted from a GPU's KV cache (0: none)"),
    )

    # LoRA adapters (duoserve/lora): PEFT safetensors adapters served beside the base model.
    enable_lora: bool = field(default=False, metadata=_arg("serve LoRA adapters (PEFT safetensors)"))
    lora_modules: list[str] = field(
        default_factory=list,
        metadata=_arg("an adapter to load at start, as name=path (repeatable; needs --enable-lora)"),
    )
    max_loras: int = field(default=1, metadata=_arg("most LoRA adapters in one batch"))
    max_lora_rank: int = field(default=16, metadata=_arg("largest LoRA rank served"))

    def __post_init__(self) -> None:
        self._check_lora()
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        self._check_speculative()
        self._check_kv_offload()
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.kv_cache_dtype != "auto":
            parse_kv_cache_dtype(self.kv_cache_dtype)
        if self.kv_scales_path is not None:
            raise ValueError(KV_SCALES_GONE)
        if self.attention_backend not in ("auto", "torch", "cpu", "triton"):
            raise ValueError(
                f"attention_backend must be auto, torch, cpu or triton, got {self.attention_backend!r}"
            )
        if self.quantized_max_rows is not None and self.quantized_max_rows < 0:
            raise ValueError(f"quantized_max_rows must be >= 0, got {self.quantized_max_rows}")
        if self.quantized_activations not in ("auto", "int16", "int8"):
            raise ValueError(
                f"quantized_activations must be auto, int16 or int8, got {self.quantized_activations!r}"
            )
        if self.quantization not in ("auto", "none"):
            raise ValueError(f"quantization must be auto or none, got {self.quantization!r}")

    def _check_lora(self) -> None:
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules needs enable_lora (--enable-lora)")
        self.lora_requests()  # each entry parses

    def lora_requests(self) -> list[LoRARequest]:
        """The adapters of --lora-modules (name=path), with ids 1, 2, ... in order (vLLM's)."""
        requests = []
        for index, entry in enumerate(self.lora_modules, start=1):
            name, sep, path = entry.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"lora_modules entries are name=path, got {entry!r}")
            if any(r.lora_name == name for r in requests):
                raise ValueError(f"lora_modules names the adapter {name!r} twice")
            requests.append(LoRARequest(name, index, path))
        return requests

    def _check_speculative(self) -> None:
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative must be ngram or draft, got {self.speculative!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.draft_num_layers is not None and self.draft_num_layers < 1:
            raise ValueError(f"draft_num_layers must be >= 1, got {self.draft_num_layers}")
        if not 0 <= self.speculative_min_acceptance <= 1:
            raise ValueError(
                f"speculative_min_acceptance must be in [0, 1], got {self.speculative_min_acceptance}"
            )

    def _check_kv_offload(self) -> None:
        if self.kv_offload_dir == "":
            raise ValueError("kv_offload_dir must be a directory, got an empty string")
        if self.kv_offload_max_bytes is not None:
            if self.kv_offload_dir is None:
                raise ValueError("kv_offload_max_bytes limits the disk tier: it needs kv_offload_dir")
            if self.kv_offload_max_bytes < 1:
                raise ValueError(f"kv_offload_max_bytes must be >= 1, got {self.kv_offload_max_bytes}")
        if self.kv_offload_cpu_bytes < 0:
            raise ValueError(f"kv_offload_cpu_bytes must be >= 0, got {self.kv_offload_cpu_bytes}")
        if (self.kv_offload_dir or self.kv_offload_cpu_bytes) and not self.enable_prefix_caching:
            raise ValueError("KV offload keeps prefix-cache blocks: it needs enable_prefix_caching")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.resolved_device().type == "cuda"

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        if self.resolved_device().type == "cuda":
            return torch.bfloat16
        # bfloat16 runs 2-5x faster than float32 on some CPUs and 3-8x slower on others: the host's
        # capabilities (and where they leave it open, a measurement) decide. See duoserve/hardware.py.
        return host_defaults().dtype

    def resolved_quantized_max_rows(self) -> int:
        """Rows up to which quantized linears read their codes (CPU only: bfloat16 with torch's kernels,
        float32 with duoserve's); the host's threshold for the model's dtype unless given."""
        if self.quantized_max_rows is not None:
            return self.quantized_max_rows
        if self.resolved_device().type != "cpu":
            return 0
        return host_defaults().quantized_max_rows_for(self.resolved_dtype())

    def resolved_quantized_activations(self) -> str:
        """int16 or int8: how float32 models' quantized kernels round x (bfloat16 models' ignore it)."""
        if self.quantized_activations != "auto":
            return self.quantized_activations
        if self.resolved_device().type != "cpu":
            return "int16"
        return host_defaults().quantized_activations

    def resolved_kv_dtype(self) -> torch.dtype:
        """The KV cache's storage dtype: the model's for auto (vLLM's convention)."""
        if self.kv_cache_dtype == "auto":
            return self.resolved_dtype()
        return parse_kv_cache_dtype(self.kv_cache_dtype)


def add_engine_args(parser: argparse.ArgumentParser, *, positional_model: bool = False) -> None:
    """Add one flag per EngineConfig field (the model may be positional)."""
    group = parser.add_argument_group("engine")
    for f in fields(EngineConfig):
        default = _default(f)
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.name == "model" and positional_model:
            group.add_argument("model", nargs="?", default=None, help=help_text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool, "bool | None"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif str(f.type).startswith("list"):  # repeatable
            group.add_argument(flag, action="append", default=None, help=help_text)
        else:
            group.add_argument(flag, type=_field_type(f), default=default, help=help_text)


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _field_type(f: dataclasses.Field) -> type:
    kind = str(f.type)
    if "int" in kind:
        return int
    if "float" in kind:
        return float
    return str


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig)}
    values["lora_modules"] = values["lora_modules"] or []  # an append flag given no times is None
    return EngineConfig(**values)


def engine_flags(config: EngineConfig, skip: tuple[str, ...] = ("model",)) -> list[str]:
    """The command-line flags that rebuild `config` (those differing from the defaults)."""
    flags = []
    for f in fields(EngineConfig):
        value = getattr(config, f.name)
        if f.name in skip or value == _default(f):
            continue
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, list):
            flags += [part for item in value for part in (f"--{flag}", str(item))]
        else:
            flags += [f"--{flag}", str(value)]
    return flags
