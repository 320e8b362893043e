"""`duoserve env`: what a bug report needs to know about this host: its defaults and why, and versions."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch

from duoserve.hardware import HostDefaults, host_defaults, host_tag

_PACKAGES = ("duoserve", "torch", "transformers", "gguf", "numpy")


def package_versions() -> dict[str, str]:
    """Python's and each package's version ('not installed' where it is absent)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def env_report(host: HostDefaults | None = None) -> str:
    """The startup log line, the capabilities behind it, any measurement, and versions."""
    host = host or host_defaults()
    cpu = host.cpu
    lines = [
        host.describe(),
        "",
        f"cpu: {cpu.model} ({cpu.arch}), table row {cpu.level!r}",
        f"features: {', '.join(sorted(cpu.features)) or 'none of those the table reads'}",
        f"torch kernels' ISA: {cpu.torch_capability}; usable physical cores: {cpu.cores}",
        f"L3 cache: {cpu.l3_bytes >> 20} MiB",
        f"cuda: {torch.cuda.is_available()}",
        f"host tag (measurement cache key): {host_tag(cpu)}",
    ]
    if host.timings:
        cells = ", ".join(f"{key} {seconds * 1e3:.2f} ms" for key, seconds in host.timings.items())
        lines.append(f"measured {host.measured_on}: {cells}")
    lines.append("")
    lines += [f"{name}: {version}" for name, version in package_versions().items()]
    lines.append(f"platform: {platform.platform()}; executable {sys.executable}")
    return "\n".join(lines)
