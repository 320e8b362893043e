"""Reliability runs against a real server on 127.0.0.1: a soak at 2x capacity, and kill -9 under load.

    python benchmarks/reliability.py soak   [--duration 600] [--up "--prefill 1 --decode 1"] [-- SERVER ARGS]
    python benchmarks/reliability.py faults [--kill decode|prefill] [-- SERVER ARGS]

Both start the server themselves (`duoserve serve`, or `duoserve up` for a deployment), talk to it only
on 127.0.0.1, stop it (and every process it started) at the end, print a report, write it as JSON with
--output, and exit 1 when a criterion fails (each failure is printed). benchmarks/soak.sh and
benchmarks/faults.sh run them with their defaults. Needs psutil (`pip install -e ".[bench]"`).

soak: the server runs with `--max-num-seqs` = `--calibrate-concurrency` (8) and `--max-queued-requests`
(16). First a closed loop of that many streams measures capacity (completed requests/s) and warms the
server up; then Poisson arrivals at `--load-factor` (2) x capacity for `--duration` seconds: the running
batch is full, the queue fills, and the overflow is answered with 429. Criteria: no 5xx; every 200 ends
its stream with a finish_reason (not "abort") and [DONE]; the resident memory of each server and engine
process, sampled every `--sample-interval` s, ends within `--max-rss-drift` of its first sample (taken
after warm-up); KV cache usage back to 0 after the load (on every worker of a deployment).

faults: a deployment (`up`, 1 prefill + 2 decode workers by default) under a closed loop of streamed
requests (long prompts, prefilled remotely, and short ones); one worker is killed with SIGKILL. Reported:
for each request in flight then, whether it completed (a lost prefill worker's requests are prefilled
on their decode worker) or the seconds from the kill to its terminal error; the seconds until the router
took the worker out and until it rejoined (`up` restarts it); what requests started after the kill
got; the survivors' KV usage after the load. Criteria: every stream in flight ends complete or with a
terminal error (none hangs, or ends cut short silently or with finish_reason "abort"), within
`--max-error-seconds` (2 s); the worker rejoins; requests started after the router took it out all
succeed; the survivors' KV usage returns to 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import psutil

# Prompts are random common words (about one token each in any English tokenizer).
_TEXT = """the of and to in is that it was for on are as with his they at be this from have or by one had
not but what all were when we there can an your which their said if do will each about how up out them then
she many some so these would other into has more her two like him see time could no make than first"""
WORDS = _TEXT.split()


# ---------------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """`duoserve serve` or `duoserve up` in its own process group, on 127.0.0.1."""

    args: list[str]
    log_path: str
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def deployment(self) -> bool:
        return self.args[0] == "up"

    def start(self, timeout: float) -> None:
        command = [
            sys.executable,
            "-m",
            "duoserve.cli",
            *self.args,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        print(f"starting: {shlex.join(command)} (log: {self.log_path})", flush=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200 and self._all_workers_up():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server was not ready after {timeout:.0f} s; see {self.log_path}")

    def _all_workers_up(self) -> bool:
        return not self.deployment or all(w["healthy"] for w in self.workers())

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.url}/router/workers", timeout=5).json()["workers"] if self.deployment else []

    def stop(self) -> None:
        """SIGTERM (drain; an offload tier writes what the cache holds), then SIGKILL to the whole process
        group: nothing is left running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def processes(self) -> dict[str, psutil.Process]:
        """Label -> process, for the server and every process below it (engines, workers, router)."""
        root = psutil.Process(self.process.pid)
        found = {}
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                found[_label(proc, root)] = proc
        return found


def _label(proc: psutil.Process, root: psutil.Process) -> str:
    cmdline = proc.cmdline()
    if proc.pid == root.pid:
        return "router" if "up" in cmdline[:4] else "server"
    if "--role" in cmdline:
        role = cmdline[cmdline.index("--role") + 1]
        return f"{role}:{cmdline[cmdline.index('--port') + 1]}"
    parent = proc.parent()
    if parent is not None and any("spawn_main" in part for part in cmdline):
        return f"engine({_label(parent, root)})"  # multiprocessing's spawned engine process
    return f"{proc.name()}:{proc.pid}"  # e.g. multiprocessing's resource tracker


def metrics(url: str) -> dict[str, float]:
    """Unlabelled-enough samples of /metrics: {name: value}, labels dropped (sums over them)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


def kv_idle(server: Server, urls: list[str] | None = None) -> dict[str, dict[str, float]]:
    """KV usage and requests of the server (or of each given worker)."""
    state = {}
    for url in urls or [server.url, *(w["url"] for w in server.workers() if w["healthy"])]:
        try:
            m = metrics(url)
        except httpx.HTTPError as err:
            state[url] = {"error": str(err)}
            continue
        state[url] = {
            "kv_cache_usage_perc": m.get("duoserve:kv_cache_usage_perc", 0.0),
            "num_requests_running": m.get("duoserve:num_requests_running", 0.0),
            "num_requests_waiting": m.get("duoserve:num_requests_waiting", 0.0),
        }
    return state


def _is_idle(state: dict[str, dict[str, float]]) -> bool:
    return all(
        "error" not in s
        and s["kv_cache_usage_perc"] == 0
        and s["num_requests_running"] + s["num_requests_waiting"] == 0
        for s in state.values()
    )


def wait_idle(server: Server, timeout: float, urls: list[str] | None = None) -> dict[str, dict[str, float]]:
    deadline = time.monotonic() + timeout
    state = kv_idle(server, urls)
    while not _is_idle(state) and time.monotonic() < deadline:
        time.sleep(0.5)
        state = kv_idle(server, urls)
    return state


# ---------------------------------------------------------------------- one request


@dataclass
class Outcome:
    started: float
    status: int = 0
    tokens: int = 0  # chunks with text
    finish_reason: str | None = None
    done: bool = False  # [DONE] arrived
    error: str | None = None  # an error event in the stream, the error body, or a transport error
    ended: float = 0.0

    @property
    def complete(self) -> bool:
        """A 200 whose stream ended normally: an "abort" finish is a request cut short without an error."""
        ended = self.finish_reason is not None and self.finish_reason != "abort"
        return self.status == 200 and ended and self.done and self.error is None

    @property
    def kind(self) -> str:
        if self.status == 200:
            return "200"
        if self.status == 429:
            return "429"
        if 500 <= self.status < 600:
            return "5xx"
        return "other"


def make_body(model: str, rng: random.Random, prompt_words: int, max_tokens: int) -> dict:
    return {
        "model": model,
        "prompt": " ".join(rng.choice(WORDS) for _ in range(prompt_words)),
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream": True,
    }


async def stream(client: httpx.AsyncClient, url: str, body: dict, outcome: Outcome | None = None) -> Outcome:
    outcome = outcome or Outcome(started=time.monotonic())
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode(errors="replace")[:300]
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    outcome.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    outcome.error = str(event["error"].get("message"))
                    continue
                for choice in event.get("choices", []):
                    outcome.tokens += bool(choice.get("text"))
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        outcome.error = f"{type(err).__name__}: {err}"
    finally:
        outcome.ended = time.monotonic()
    return outcome


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


# ---------------------------------------------------------------------- soak


class RSSSampler:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, dict[str, int]]] = []

    def sample(self) -> None:
        rss = {}
        for label, proc in self.server.processes().items():
            with contextlib.suppress(psutil.NoSuchProcess):
                rss[label] = proc.memory_info().rss
        self.samples.append((time.monotonic(), rss))

    def report(self) -> dict[str, dict[str, float]]:
        first, last = self.samples[0][1], self.samples[-1][1]
        out = {}
        for label in first:
            series = [s[label] for _, s in self.samples if label in s]
            if label not in last:
                out[label] = {"first_mib": first[label] / 2**20, "gone": True}
                continue
            out[label] = {
                "first_mib": round(first[label] / 2**20, 1),
                "last_mib": round(last[label] / 2**20, 1),
                "max_mib": round(max(series) / 2**20, 1),
                "drift_pct": round(100 * (last[label] - first[label]) / first[label], 2),
                "max_drift_pct": round(100 * max(abs(v - first[label]) for v in series) / first[label], 2),
            }
        return out


async def closed_loop(url: str, body_of, concurrency: int, seconds: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:

        async def user() -> None:
            while time.monotonic() < deadline:
                outcomes.append(await stream(client, url, body_of()))

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return outcomes


async def open_loop(
    url: str,
    body_of,
    rate: float,
    seconds: float,
    sampler: RSSSampler,
    sample_interval: float,
    rng: random.Random,
    drain_timeout: float,
) -> list[Outcome]:
    tasks: list[tuple[Outcome, asyncio.Task]] = []
    start = time.monotonic()
    next_sample = start
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        next_arrival = start
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                await asyncio.to_thread(sampler.sample)
                done = sum(t.done() for _, t in tasks)
                print(f"  t={now - start:5.0f}s sent {len(tasks)} done {done}", flush=True)
                next_sample += sample_interval
            while next_arrival <= now:
                outcome = Outcome(started=time.monotonic())
                tasks.append((outcome, asyncio.create_task(stream(client, url, body_of(), outcome))))
                next_arrival += rng.expovariate(rate)
            await asyncio.sleep(min(next_arrival, next_sample) - time.monotonic())
        # The run stops by itself: a stream still open this long after the last arrival is a hang.
        _, pending = await asyncio.wait([t for _, t in tasks], timeout=drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for outcome, task in tasks:
            if task in pending:
                outcome.error = f"still open {drain_timeout:.0f} s after the last arrival: cancelled"
        return [outcome for outcome, _ in tasks]


def cmd_soak(args: argparse.Namespace) -> int:
    # The running batch holds as many sequences as the calibration runs at once, so that capacity is what
    # the calibration measures, and arrivals past it queue (then get 429) instead of widening the batch.
    bounds = [
        "--max-num-seqs",
        str(args.calibrate_concurrency),
        "--max-queued-requests",
        str(args.max_queued_requests),
    ]
    server = Server(_server_args(args, bounds), args.log)
    server.start(args.ready_timeout)
    failures: list[str] = []
    try:
        model = served_model(server.url)
        rng = random.Random(args.seed)

        def body_of() -> dict:
            return make_body(model, rng, args.prompt_words, args.max_tokens)

        print(
            f"calibrating: closed loop of {args.calibrate_concurrency} for {args.calibrate_seconds:.0f} s",
            flush=True,
        )
        calibration = asyncio.run(
            closed_loop(server.url, body_of, args.calibrate_concurrency, args.calibrate_seconds)
        )
        completed = [o for o in calibration if o.complete]
        if not completed:
            raise SystemExit("no request completed during calibration: is the server working?")
        span = max(o.ended for o in calibration) - min(o.started for o in calibration)
        capacity = len(completed) / span
        rate = args.load_factor * capacity
        print(
            f"capacity {capacity:.2f} req/s; soak at {rate:.2f} req/s for {args.duration:.0f} s", flush=True
        )
        sampler = RSSSampler(server)
        outcomes = asyncio.run(
            open_loop(
                server.url,
                body_of,
                rate,
                args.duration,
                sampler,
                args.sample_interval,
                rng,
                args.drain_timeout,
            )
        )
        kv = wait_idle(server, args.drain_timeout)
        sampler.sample()
        counts = {kind: sum(o.kind == kind for o in outcomes) for kind in ("200", "429", "5xx", "other")}
        incomplete = [o for o in outcomes if o.status == 200 and not o.complete]
        rss = sampler.report()
        report = {
            "mode": "soak",
            "server": server.args,
            "duration_s": args.duration,
            "capacity_req_s": round(capacity, 3),
            "rate_req_s": round(rate, 3),
            "requests": len(outcomes),
            "status_counts": counts,
            "completed_200": counts["200"] - len(incomplete),
            "incomplete_200": len(incomplete),
            "incomplete_examples": [asdict(o) for o in incomplete[:5]],
            "other_examples": [asdict(o) for o in outcomes if o.kind in ("5xx", "other")][:5],
            "rss": rss,
            "rss_samples": len(sampler.samples),
            "kv_after": kv,
        }
        if counts["5xx"]:
            failures.append(f"{counts['5xx']} responses were 5xx")
        if counts["other"]:
            failures.append(f"{counts['other']} responses were neither 200, 429 nor 5xx")
        if incomplete:
            failures.append(f"{len(incomplete)} requests got a 200 but did not complete their stream")
        for label, r in rss.items():
            if r.get("gone"):
                failures.append(f"process {label} is gone")
            elif abs(r["drift_pct"]) > args.max_rss_drift:
                failures.append(f"RSS of {label} drifted {r['drift_pct']}% (> {args.max_rss_drift}%)")
        if not _is_idle(kv):
            failures.append(f"KV usage or requests did not return to 0: {kv}")
        if not counts["429"]:
            print("note: no 429 at all: the load did not exceed the queue (raise --load-factor)", flush=True)
    finally:
        server.stop()
    return _finish(report, failures, args.output)


# ---------------------------------------------------------------------- faults


async def _poll_worker(server: Server, url: str, killed_at: float, timeout: float) -> dict[str, float | None]:
    """Seconds from the kill until the router took the worker out, and until it was back in."""
    out: dict[str, float | None] = {"router_took_out_s": None, "rejoined_s": None}
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() - killed_at < timeout:
            try:
                workers = (await client.get(f"{server.url}/router/workers")).json()["workers"]
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
                continue
            healthy = next(w["healthy"] for w in workers if w["url"] == url)
            now = time.monotonic() - killed_at
            if out["router_took_out_s"] is None and not healthy:
                out["router_took_out_s"] = round(now, 3)
            elif out["router_took_out_s"] is not None and healthy:
                out["rejoined_s"] = round(now, 3)
                return out
            await asyncio.sleep(0.05)
    return out


async def _fault_run(server: Server, args: argparse.Namespace, victim: dict, model: str) -> dict:
    rng = random.Random(args.seed)
    long_words, short_words = args.long_prompt_words, args.prompt_words

    def body_of() -> dict:  # half remote prefill (long prompts), half local
        words = long_words if rng.random() < 0.5 else short_words
        return make_body(model, rng, words, args.max_tokens)

    pid = httpx.get(f"{victim['url']}/internal/info", timeout=10).json()["pid"]
    outcomes: list[Outcome] = []
    in_flight: set[asyncio.Task] = set()
    stop_at: list[float] = [float("inf")]
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10)) as client:

        async def user() -> None:
            while time.monotonic() < stop_at[0]:
                task = asyncio.create_task(stream(client, server.url, body_of()))
                in_flight.add(task)
                try:
                    outcomes.append(await task)
                finally:
                    in_flight.discard(task)

        users = [asyncio.create_task(user()) for _ in range(args.concurrency)]
        await asyncio.sleep(args.warmup)
        at_kill = list(in_flight)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        print(
            f"killed {victim['kind']} worker {victim['url']} (pid {pid}); {len(at_kill)} requests in flight",
            flush=True,
        )
        healing = await _poll_worker(server, victim["url"], killed_at, args.rejoin_timeout)
        stop_at[0] = time.monotonic() + args.after
        await asyncio.wait_for(asyncio.gather(*users), args.after + args.drain_timeout)
    affected = [t.result() for t in at_kill]
    took_out = healing["router_took_out_s"]
    later = [o for o in outcomes if took_out is not None and o.started > killed_at + took_out]
    return {
        "killed_at": killed_at,
        "affected": affected,
        "healing": healing,
        "after_taken_out": later,
        "total": len(outcomes),
    }


def cmd_faults(args: argparse.Namespace) -> int:
    server = Server(_server_args(args, []), args.log)
    if not server.deployment:
        raise SystemExit("faults needs a deployment: --up (default: '--prefill 1 --decode 2')")
    server.start(args.ready_timeout)
    failures: list[str] = []
    try:
        model = served_model(server.url)
        candidates = [w for w in server.workers() if w["kind"] == args.kill]
        if not candidates:
            raise SystemExit(f"the deployment has no {args.kill} worker")
        victim = candidates[0]
        run = asyncio.run(_fault_run(server, args, victim, model))
        survivors = [w["url"] for w in server.workers() if w["url"] != victim["url"]]
        kv = wait_idle(server, args.drain_timeout, urls=[*survivors, victim["url"]])
        killed_at = run["killed_at"]
        errors = sorted(round(o.ended - killed_at, 3) for o in run["affected"] if not o.complete)
        silent = [o for o in run["affected"] if not o.complete and o.error is None and o.status < 500]
        later = run["after_taken_out"]
        report = {
            "mode": "faults",
            "server": server.args,
            "killed": victim,
            "in_flight_at_kill": len(run["affected"]),
            "completed_anyway": sum(o.complete for o in run["affected"]),
            "seconds_from_kill_to_terminal_error": errors,
            "ended_without_terminal_error": [asdict(o) for o in silent],
            "healing": run["healing"],
            "after_taken_out": {
                "requests": len(later),
                "completed": sum(o.complete for o in later),
                "failed_examples": [asdict(o) for o in later if not o.complete][:5],
            },
            "requests_total": run["total"],
            "kv_after": kv,
        }
        if silent:
            failures.append(f"{len(silent)} streams in flight ended without completing or a terminal error")
        late = [e for e in errors if e > args.max_error_seconds]
        if late:
            failures.append(f"{len(late)} terminal errors came later than {args.max_error_seconds} s: {late}")
        if run["healing"]["router_took_out_s"] is None:
            failures.append("the router never took the killed worker out")
        if run["healing"]["rejoined_s"] is None:
            failures.append(f"the worker did not rejoin within {args.rejoin_timeout} s")
        if any(not o.complete for o in later):
            failures.append("requests started after the router took the worker out failed")
        if not _is_idle(kv):
            failures.append(f"KV usage or requests did not return to 0: {kv}")
    finally:
        server.stop()
    return _finish(report, failures, args.output)


# ---------------------------------------------------------------------- common


def _server_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    if args.up is not None:
        return ["up", *shlex.split(args.up), *extra, *args.server_args]
    return ["serve", *extra, *args.server_args]


def _finish(report: dict, failures: list[str], output: str | None) -> int:
    report["failures"] = failures
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    print("PASS" if not failures else "FAILED", flush=True)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("soak", "faults"):
        sub = commands.add_parser(name)
        sub.add_argument(
            "--up", default=None, help="run `duoserve up` with these arguments instead of `serve`"
        )
        sub.add_argument("--log", default=f"{name}-server.log", help="the server's output")
        sub.add_argument("--output", default=None, help="write the report as JSON here")
        sub.add_argument("--prompt-words", type=int, default=32)
        sub.add_argument("--max-tokens", type=int, default=32)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--ready-timeout", type=float, default=600)
        sub.add_argument("--drain-timeout", type=float, default=60, help="seconds for KV to return to 0")
        sub.add_argument("server_args", nargs="*", help="after --: arguments for `duoserve serve`/`up`")
    soak = commands.choices["soak"]
    soak.add_argument("--duration", type=float, default=600, help="seconds of overload (default: 600)")
    soak.add_argument("--load-factor", type=float, default=2.0, help="arrival rate / capacity (default: 2)")
    soak.add_argument("--max-queued-requests", type=int, default=16, help="the server's queue bound")
    soak.add_argument("--calibrate-seconds", type=float, default=30)
    soak.add_argument("--calibrate-concurrency", type=int, default=8)
    soak.add_argument("--sample-interval", type=float, default=10, help="seconds between RSS samples")
    soak.add_argument("--max-rss-drift", type=float, default=5.0, help="percent (default: 5)")
    soak.set_defaults(func=cmd_soak)
    faults = commands.choices["faults"]
    faults.set_defaults(up="--prefill 1 --decode 2", func=cmd_faults)
    faults.add_argument("--kill", choices=("decode", "prefill"), default="decode")
    faults.add_argument("--concurrency", type=int, default=8)
    faults.add_argument("--long-prompt-words", type=int, default=256, help="prompts prefilled remotely")
    faults.add_argument("--warmup", type=float, default=10, help="seconds of load before the kill")
    faults.add_argument("--after", type=float, default=5, help="seconds of load after the worker rejoined")
    faults.add_argument("--rejoin-timeout", type=float, default=300)
    faults.add_argument("--max-error-seconds", type=float, default=2.0)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
