"""LoRARequest: which adapter a request runs with, as vLLM names it (`vllm.lora.request.LoRARequest`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter: `lora_name` identifies it (the `model` a server request names), `lora_int_id`
    is vLLM's positive integer id, `lora_path` the directory holding adapter_config.json and
    adapter_model.safetensors."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if (
            isinstance(self.lora_int_id, bool)
            or not isinstance(self.lora_int_id, int)
            or self.lora_int_id < 1
        ):
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path must be a non-empty string")

    @property
    def cache_key(self) -> str:
        """What prefix-cache blocks computed with this adapter are keyed by: its name and path (a
        name unloaded and loaded again from elsewhere must not meet the old adapter's KV)."""
        return f"{self.lora_name}\0{self.lora_path}"


def prefix_root_hash(lora: LoRARequest | None, base: int) -> int:
    """The parent hash of a sequence's first KV block: `base` (the pool's ROOT_HASH) for the base model,
    one per adapter otherwise, so that blocks computed with different adapters never match.

    sha256, not Python's hash of a str, which is salted per process: a router hashes prompts exactly as
    its workers' prefix caches do (duoserve.disagg.kv_events.prompt_block_hashes).
    """
    if lora is None:
        return base
    digest = hashlib.sha256(lora.cache_key.encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True) or base + 1
