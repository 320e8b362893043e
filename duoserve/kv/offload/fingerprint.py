"""The fingerprint every offloaded block carries: which model, KV layout and numerics made its bytes.

A block is only ever served to a worker whose fingerprint is the same: another model, another layout
(layers, heads, head size, block size, dtype) or other numerics (compute dtype, quantized kernels or
dense weights) would read KV that is wrong without anything failing. The disk tier keeps each
fingerprint's blocks in their own subdirectory, so workers of several models can share a root.

The model's part comes from its files, not their path or mtime: a pod that downloads the same weights
again, elsewhere, finds its blocks. Reading each file's size and first and last MiB is cheap at start
(a few ms) and tells apart any two checkpoints that differ in size, config.json (read whole), a GGUF's
header or their first or last tensors; a fine-tune that changed only middle tensors in place, keeping
the size, would not be: give each checkpoint its own file name or --kv-offload-dir.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import msgspec

from duoserve.kv.layout import KVLayout

DIGEST_BYTES = 16
_SAMPLE_BYTES = 1 << 20
# Files of a Hugging Face directory that decide the model's KV (tokenizer files do not).
_HF_SUFFIXES = (".safetensors", "config.json")


@dataclass(frozen=True)
class KVFingerprint:
    digest: bytes
    # What the digest was made of, written next to the blocks for people (not read back).
    description: dict

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def of(cls, model_source: str, layout: KVLayout, numerics: str) -> KVFingerprint:
        """`numerics`: how the model computes (e.g. "float32 quantization=auto"), which changes KV bits."""
        made_of = {
            "model_files": model_identity(model_source),
            "layout": msgspec.to_builtins(layout),
            "numerics": numerics,
        }
        text = json.dumps(made_of, sort_keys=True).encode()
        digest = hashlib.blake2b(text, digest_size=DIGEST_BYTES).digest()
        return cls(digest, {"model": model_source, **made_of})


def model_identity(source: str) -> list[str]:
    """One line per file that shapes the model: name, size and a digest of its first and last MiB."""
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.endswith(_HF_SUFFIXES))
        paths = [os.path.join(source, n) for n in names]
    else:
        paths = [source]
    return [_file_identity(p) for p in paths]


def _file_identity(path: str) -> str:
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(f.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            f.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            digest.update(f.read(_SAMPLE_BYTES))
    return f"{os.path.basename(path)}:{size}:{digest.hexdigest()}"
