"""The OpenMP environment the engine process starts with: its threads spin briefly, then sleep.

torch's CPU wheels run their parallel regions (and duoserve's kernels') on GNU OpenMP, whose idle
threads busy-wait GOMP_SPINCOUNT = 300,000 pause loops after each region before they sleep: about 9 ms
on the 2-core Zen 1 host this was first measured on (29 ns per loop). Offline that costs nothing: no
other thread wants the cores. Served, it can: the API process (HTTP, detokenizing, SSE) and the client
run on the same cores, so a long-spinning engine thread either takes a core from them or is descheduled
itself, and then every barrier of the forward waits for it. Sleeping at once (OMP_WAIT_POLICY=PASSIVE)
costs the other way: a forward is hundreds of short parallel regions, and each one then wakes its
threads through the kernel.

Measured, `python benchmarks/serving_overhead.py --concurrency C --input-len 128 --output-len 64`
(default model and arguments), the engine's GOMP_SPINCOUNT back to back in one run:

| host (lscpu), load                 | C  | passive (0) | 1,000 | 3,000     | 10,000 | 300,000 (libgomp) |
|------------------------------------|----|-------------|-------|-----------|--------|-------------------|
| Zen 5 *, quiet: tok/s              | 1  | 37.2        | 52.8  | **65.1**  | 61.1   | 62.1              |
| Zen 5 *, quiet: tok/s              | 32 | 102.9       | 131.2 | **191.5** | 189.0  | 188.4             |
| Zen 1 (2 vCPUs), ~6 runnable threads: batch-1 ms | | 138 | | 173 | | 551       |

(* 2 vCPUs of an AMD EPYC family 26 model 2: AVX-512F/BW/VL/VNNI and AVX512-BF16, no AMX. The Zen 1 row:
2 vCPUs of an AMD EPYC family 23 model 1, AVX2 only, engine-only decode steps on a machine other jobs
loaded; a quiet Zen 1 and an Intel host with AMX are not measured yet.) The engine also spent less
CPU per token at 3,000 than passive (Zen 5, C=32: 8.8 against 12.1 ms): waking through futexes costs
CPU too. So the engine process of `duoserve serve` starts with GOMP_SPINCOUNT=3000 (about 0.1 ms of
spinning), unless the user chose a wait behaviour themselves (any of the variables below is set): e.g.
`OMP_WAIT_POLICY=PASSIVE` for a host crowded by other work, `GOMP_SPINCOUNT=300000` for libgomp's
default. The API process's own torch is unaffected (libgomp reads these once, at load).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

# Variables that set how OpenMP threads wait: libgomp's, and Intel OpenMP's (a torch built with it).
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
ENGINE_DEFAULTS = {"GOMP_SPINCOUNT": "3000"}


def engine_env_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` for the engine process (none if the user set a wait policy)."""
    if any(name in environ for name in WAIT_VARS):
        return {}
    return dict(ENGINE_DEFAULTS)


@contextlib.contextmanager
def engine_environment() -> Iterator[dict[str, str]]:
    """os.environ with the engine's defaults while a process is spawned in it; restored after."""
    added = engine_env_defaults(os.environ)
    os.environ.update(added)
    try:
        yield added
    finally:
        for name in added:
            os.environ.pop(name, None)
