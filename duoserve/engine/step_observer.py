"""What sees each engine step: its plan and how long it took (e.g. `--step-trace`'s writer).

The engine core calls an observer its caller built, as it uses the KV connector its caller built, so
the engine imports nothing that consumes its steps: the step trace writer lives with the planner that
reads the traces (duoserve/plan/trace.py, `step_trace_observer`), and the engine's callers (the
server's engine process, `LLM`, the CLI) pass it in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from duoserve.engine.core import EngineCore
    from duoserve.engine.scheduler import SchedulerOutput


class StepObserver(Protocol):
    def record(self, plan: SchedulerOutput, start: float, previous_seconds: float) -> None:
        """Called by `EngineCore.step` after `schedule()`, before the step changes any request: `start`
        is the step's `time.perf_counter()` start, `previous_seconds` how long the previous step took."""

    def close(self, last_seconds: float) -> None:
        """Called by `EngineCore.close`: `last_seconds` is how long the last step took."""


# Built from the core once it is whole (its KV pool, limits and model are what a trace's header says).
MakeStepObserver = Callable[["EngineCore"], StepObserver]
