"""Where an engine step's host time goes: wall time per decode step of each phase of `EngineCore.step`.

    PYTHONPATH=. python benchmarks/engine_phases.py --batch-sizes 32 128     # a tiny model on the CPU

Phases: `schedule` (the scheduler's plan), `prepare` (the batch's tensors), `launch` (the model and the
sampling: on a GPU only their launches, with async scheduling), `apply_sampled` (tokens into requests,
outputs); `step` is the whole call. Medians over the decode steps of --num-prompts requests decoding
together. On the CPU a tiny random model (2 layers, hidden 48) makes the forward negligible, so the other
phases are the engine's own per-request cost, the cost a GPU step pays on its host: with async scheduling
the host's phases overlap the device's step, and when their sum exceeds it the host sets the pace
(benchmarks/gpu_suite.py runs `engine_phases` on the GPU's engine in its throughput run's shape).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from duoserve.config import EngineConfig
from duoserve.engine.core import EngineCore
from duoserve.sampling_params import SamplingParams

PHASES = ("schedule", "_prepare", "_launch", "apply_sampled")


def engine_phases(
    core: EngineCore, num_prompts: int, input_len: int, output_len: int, modes=(False, True)
) -> list[dict]:
    """Per async-scheduling mode: median ms per decode step of each phase, for `num_prompts` random
    prompts of `input_len` tokens generating `output_len` greedy tokens each."""
    gen = torch.Generator().manual_seed(2)
    vocab = core.model_config.vocab_size
    prompts = torch.randint(3, vocab, (num_prompts, input_len), generator=gen).tolist()
    owners = {"schedule": core.scheduler, "_prepare": core, "_launch": core, "apply_sampled": core.scheduler}
    rows = []
    for async_scheduling in modes:
        core.async_scheduling = async_scheduling
        params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
        for i, prompt in enumerate(prompts):
            core.add_request(f"phases-{async_scheduling}-{i}", prompt, params, [])
        spent: dict[str, float] = {}

        def timed(name: str, fn, spent=spent):
            def run(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

            return run

        per_step: list[dict[str, float]] = []
        try:
            for name, owner in owners.items():
                setattr(owner, name, timed(name, getattr(owner, name)))
            while core.has_unfinished():
                spent.clear()
                start = time.perf_counter()
                core.step()
                spent["step"] = time.perf_counter() - start
                if core.last_step.num_scheduled_tokens == len(core.scheduler.running) == num_prompts:
                    per_step.append(dict(spent))  # a decode step of the whole batch
        finally:
            for name, owner in owners.items():
                delattr(owner, name)  # the instance's wrapper: the class's method again
        if core.device.type == "cuda":
            torch.cuda.synchronize(core.device)
        row = {"batch": num_prompts, "async": async_scheduling, "decode_steps": len(per_step)}
        for name in ("step", *PHASES):
            row[name.strip("_") + "_ms"] = statistics.median(p.get(name, 0.0) for p in per_step) * 1e3
        row["host_us_per_request"] = (
            sum(row[n.strip("_") + "_ms"] for n in ("schedule", "_prepare", "apply_sampled"))
            * 1e3
            / num_prompts
        )
        rows.append(row)
    core.async_scheduling = core.config.resolved_async_scheduling()
    return rows


def tiny_cpu_engine(max_num_seqs: int) -> EngineCore:
    """A 2-layer random Llama (tests' tiny model, hidden 48) on the CPU, torch attention, float32."""
    from duoserve.engine.llm_engine import LLMEngine
    from tests.helpers import save_tiny_model, tiny_hf_model

    directory = Path(tempfile.mkdtemp(prefix="engine-phases-"))
    path = save_tiny_model(tiny_hf_model("llama_gqa"), directory)
    engine_config = EngineConfig(
        model=path,
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        block_size=16,
        max_num_seqs=max_num_seqs,
        num_kv_blocks=max_num_seqs * 20,
        max_num_batched_tokens=8192,
    )
    return LLMEngine(engine_config).core


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch size (each row printed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    core = tiny_cpu_engine(max(args.batch_sizes))
    keys = None
    for batch in args.batch_sizes:
        for _ in range(args.repeats):
            for row in engine_phases(core, batch, args.input_len, args.output_len, modes=(False,)):
                if keys is None:
                    keys = list(row)
                    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
                cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
