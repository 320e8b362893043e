"""The OpenMP environment the engine process starts with: its threads sleep when they wait.

torch's CPU wheels run their parallel regions (and duoserve's kernels') on GNU OpenMP, whose idle
threads busy-wait GOMP_SPINCOUNT = 300,000 pause loops after each region before they sleep: about 9 ms
on the 2-core Zen 1 host this was measured on (29 ns per loop). Offline that costs nothing: no other
thread wants the cores. Served, it does: the API process (HTTP, detokenizing, SSE) and the client run
on the same cores, so a spinning engine thread either takes a core from them or is descheduled
itself, and then every barrier of the forward waits for it. Measured engine-only (decode steps, 2
threads, on that host while other jobs loaded it to ~6 runnable threads), spinning vs sleeping:
batch 32 took 2550-2740 ms and 1400-1690 CPU ms per step vs 916 and 495; batch 1 551 ms (541 CPU)
vs 138 ms (59 CPU); a short spin (GOMP_SPINCOUNT=3000) 173 ms (101 CPU).

So the engine process of `duoserve serve` starts with OMP_WAIT_POLICY=PASSIVE, unless the user chose
a wait behaviour themselves (any of the variables below is set): e.g. `GOMP_SPINCOUNT=300000` gives
back libgomp's default. The API process's own torch is unaffected (libgomp reads these once, at load).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

# Variables that set how OpenMP threads wait: libgomp's, and Intel OpenMP's (a torch built with it).
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
ENGINE_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


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
