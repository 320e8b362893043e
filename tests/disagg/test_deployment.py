"""`duoserve up` with real processes on 127.0.0.1: a router, prefill and decode workers.

Greedy outputs through the disaggregated deployment equal the offline engine's token for token
(short prompts prefilled locally, long ones over several chunks on the prefill worker, prefix hits on
either side); the router tokenizes once, the decode worker never recomputes the first token, no KV
block leaks when clients abort, a killed worker fails its requests promptly and rejoins, and KV-aware
routing sends requests to the worker that holds their prefix. The prefill/decode deployment runs
with a cluster secret (everything between router and workers authenticated), the replicas without.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import openai
import pytest

from duoserve import LLM, SamplingParams
from duoserve.disagg.auth import HTTP_PURPOSE, Signer, http_auth_header
from duoserve.plan.trace import read_trace
from tests.helpers import random_prompt, wait_for, word
from tests.server.harness import ENGINE_ARGS, ServerProcess, engine_flags

# Small chunks, so a 30-token prompt takes several prefill steps (and several KV sends).
WORKER_ARGS = {**ENGINE_ARGS, "max_num_batched_tokens": 8}
MIN_REMOTE = 12  # prompts with fewer uncached tokens are prefilled on the decode worker
SECRET = "deployment-secret"
# A deadline, not a measure: a restarted worker loads its model and kernel, which crawls on a busy machine.
REJOIN_DEADLINE = 300.0


def start_up(model_dir: str, tmp_path_factory, *args: str) -> ServerProcess:
    log_path = tmp_path_factory.mktemp("up-log") / "up.log"
    flags = [*engine_flags(**WORKER_ARGS), "--remote-prefill-min-tokens", str(MIN_REMOTE), *args]
    flags.remove("--num-threads")  # `up` gives each worker its share of the cores
    flags.remove("1")
    return ServerProcess(model_dir, log_path, flags, subcommand="up").start()


def workers(router: ServerProcess) -> list[dict]:
    return httpx.get(f"{router.base_url}/router/workers", timeout=10).json()["workers"]


def worker_metrics(url: str) -> dict[str, float]:
    probe = ServerProcess("", None, port=int(url.rsplit(":", 1)[1]))
    return probe.metrics()


def text_of(ids: list[int]) -> str:
    return " ".join(word(t) for t in ids)


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("step-traces")


@pytest.fixture(scope="module")
def deployment(model_dir, tmp_path_factory, trace_dir):
    traces = ["--step-trace", str(trace_dir / "steps-{role}.jsonl")]
    router = start_up(
        model_dir, tmp_path_factory, "--prefill", "1", "--decode", "1", "--cluster-secret", SECRET, *traces
    )
    wait_for(lambda: all(w["healthy"] for w in workers(router)), what="both workers")
    yield router
    router.stop()


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(model=model_dir, **{k: v for k, v in WORKER_ARGS.items() if k != "num_threads"})


def complete(router: ServerProcess, prompt: list[int], max_tokens: int) -> list[int]:
    client = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="-")
    result = client.completions.create(
        model=router.model,
        prompt=text_of(prompt),
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        logprobs=0,
    )
    return [int(t.removeprefix("token_id:")) for t in result.choices[0].logprobs.tokens]


def test_greedy_matches_offline_for_local_and_remote_prefill(deployment, offline):
    prompts = [random_prompt(n, seed=n) for n in (5, 13, 30, 47)]  # 5: local; the others remote
    # Prefix hits: 28 cached tokens on both workers and 18 to compute (remote); 44 cached and 3 new (local).
    prompts += [prompts[2] + random_prompt(16, seed=98), prompts[3] + random_prompt(3, seed=99)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in offline.generate(prompts, params, use_tqdm=False)]
    prefill, decode = workers(deployment)
    before = worker_metrics(decode["url"])
    got = [complete(deployment, p, 12) for p in prompts]
    assert got == expected
    # The same through the decode worker on its own (a colocated server).
    direct = ServerProcess(deployment.model, None, port=int(decode["url"].rsplit(":", 1)[1]))
    assert [complete(direct, p, 12) for p in prompts[:2]] == expected[:2]
    after = worker_metrics(decode["url"])
    assert after["duoserve:kv_transfer_requests_total"] - before["duoserve:kv_transfer_requests_total"] == 4
    # Authenticated with the cluster secret, every KV message and event got through.
    for stats in (after, deployment.metrics()):
        drops = {k: v for k, v in stats.items() if k.startswith("duoserve:untrusted_messages_dropped")}
        assert drops and not any(drops.values()), drops


def test_each_worker_writes_a_step_trace_of_its_role(deployment, trace_dir):
    """`up --step-trace PATTERN`: a trace per worker, named and headed by its role, so `plan profile
    --from-trace` fits each role's steps apart: the prefill worker's steps are prompt chunks only."""
    assert len(complete(deployment, random_prompt(30, seed=11), 6)) == 6
    paths = {role: trace_dir / f"steps-{role}.jsonl" for role in ("prefill", "decode")}

    def stepped(path) -> bool:  # a step's line is written when the next one starts
        return path.exists() and len(path.read_text().splitlines()) > 1

    wait_for(lambda: all(stepped(path) for path in paths.values()), what="both workers' traced steps")
    traces = {role: read_trace(str(path)) for role, path in paths.items()}
    assert {role: trace.header["role"] for role, trace in traces.items()} == {
        "prefill": "prefill",
        "decode": "decode",
    }
    assert all(step.shape.decode_seqs == 0 for step in traces["prefill"].steps)
    assert any(step.shape.prefill_tokens == 8 for step in traces["prefill"].steps)  # chunks of the budget


def test_streamed_equals_non_streamed(deployment):
    prompt = text_of(random_prompt(30, seed=7))
    client = openai.OpenAI(base_url=f"{deployment.base_url}/v1", api_key="-")
    whole = client.completions.create(model=deployment.model, prompt=prompt, max_tokens=10, temperature=0)
    stream = client.completions.create(
        model=deployment.model, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole.choices[0].text


def test_prompt_tokenized_once_and_first_token_not_recomputed(deployment):
    prefill, decode = workers(deployment)
    router_before = deployment.metrics()
    p_before, d_before = worker_metrics(prefill["url"]), worker_metrics(decode["url"])
    prompt = random_prompt(29, seed=123)  # not cached anywhere
    assert len(complete(deployment, prompt, 9)) == 9
    router_after = deployment.metrics()
    p_after, d_after = worker_metrics(prefill["url"]), worker_metrics(decode["url"])
    key = "duoserve:prompt_tokenizations_total"
    assert router_after[key] - router_before[key] == 1
    assert p_after[key] == p_before[key] and d_after[key] == d_before[key]  # workers get token ids

    def computed(before, after):
        name = "duoserve:iteration_tokens_total_sum"
        return after[name] - before[name]

    assert computed(p_before, p_after) == 29  # the prompt, once, on the prefill worker
    assert computed(d_before, d_after) == 8  # tokens 1..8 fed back; the first came from the prefill worker


async def _abort_after(base_url: str, model: str, prompt: str, num_events: int) -> None:
    """Stream a long completion and leave after `num_events` events (0: as soon as it is accepted)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 150, "temperature": 0, "stream": True}
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json={**body, "ignore_eos": True}) as response,
    ):
        assert response.status_code == 200
        received = 0
        async for line in response.aiter_lines():
            if received >= num_events:
                break
            received += line.startswith("data: ")
    # Leaving the block closed the connection: the router aborts the request on its workers.


def test_aborts_at_any_point_leak_no_blocks(deployment):
    async def run() -> None:
        # Points in the request's life, by events: accepted (prefill under way), first token, early and
        # late in the decode (the prompts are long enough to be prefilled remotely, in many chunks).
        points = [0, 1, 2, 5, 20, 60]
        prompts = [text_of(random_prompt(60, seed=500 + i)) for i in range(len(points))]
        await asyncio.gather(
            *(
                _abort_after(deployment.base_url, deployment.model, p, k)
                for p, k in zip(prompts, points, strict=True)
            )
        )

    asyncio.run(run())
    urls = [w["url"] for w in workers(deployment)]
    wait_for(
        lambda: all(worker_metrics(u)["duoserve:kv_cache_usage_perc"] == 0 for u in urls),
        timeout=30,
        what="both KV pools to be empty",
    )
    for url in urls:
        stats = worker_metrics(url)
        assert stats["duoserve:num_requests_running"] == stats["duoserve:num_requests_waiting"] == 0


def _pid(url: str) -> int:
    headers = http_auth_header(Signer(SECRET, HTTP_PURPOSE), "GET", "/internal/info", b"")
    return httpx.get(f"{url}/internal/info", headers=headers, timeout=10).json()["pid"]


def test_killed_decode_worker_fails_requests_promptly_and_rejoins(deployment):
    decode = workers(deployment)[1]
    body = {
        "model": deployment.model,
        "prompt": text_of(random_prompt(8, seed=1)),
        "max_tokens": 240,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    # Promptly: the router ends the stream with an error as soon as the worker's stream breaks, without
    # waiting for a health check or a timeout (a client that had to time out would fail this test).
    with httpx.stream("POST", f"{deployment.base_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # it is running
        os.kill(_pid(decode["url"]), signal.SIGKILL)
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and decode["url"] in error["message"]
    # The broken stream itself marked the worker down (before the client was told).
    assert f"worker {decode['url']} is down" in deployment.log()
    # `up` restarts it on the same port, and the router takes it back.
    wait_for(lambda: workers(deployment)[1]["healthy"], timeout=REJOIN_DEADLINE, what="the worker to rejoin")
    assert len(complete(deployment, random_prompt(20, seed=2), 4)) == 4


def test_lost_prefill_worker_falls_back_to_local_prefill(deployment, offline):
    prefill, decode = workers(deployment)
    os.kill(_pid(prefill["url"]), signal.SIGKILL)
    prompt = random_prompt(40, seed=77)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = offline.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    computed = "duoserve:iteration_tokens_total_sum"
    before = worker_metrics(decode["url"])[computed]
    assert complete(deployment, prompt, 6) == expected
    # The decode worker computed the prompt itself: 40 prompt tokens and 5 decode steps. Whether the
    # router had noticed the loss (local prefill from the start) or not (it tried the prefill worker,
    # then fell back), the outcome is the same; tests/router/test_router.py pins the second case down.
    assert worker_metrics(decode["url"])[computed] - before == 40 + 5
    wait_for(
        lambda: workers(deployment)[0]["healthy"],
        timeout=REJOIN_DEADLINE,
        what="the prefill worker to rejoin",
    )


@pytest.mark.parametrize("policy", ["kv", "round_robin"])
def test_kv_aware_routing_follows_the_prefix(model_dir, tmp_path_factory, policy):
    router = start_up(model_dir, tmp_path_factory, "--replicas", "2", "--policy", policy)
    try:
        wait_for(lambda: all(w["healthy"] for w in workers(router)), what="both replicas")
        systems = [random_prompt(32, seed=1000 + i) for i in range(3)]  # 3 over 2 workers: round-robin mixes
        indexed = lambda: sum(w["cached_blocks"] for w in workers(router))  # noqa: E731
        for turn in range(4):
            for i, system in enumerate(systems):
                complete(router, system + random_prompt(4, seed=turn * 10 + len(system)), 2)
                if turn == 0:  # the router's index has the new prefix (8 blocks) before it is asked again
                    wait_for(lambda n=8 * (i + 1): indexed() >= n, what="the KV events of the prefix")
        hits = sum(worker_metrics(w["url"])["duoserve:prefix_cache_hits_total"] for w in workers(router))
        # Each prefix is computed once and hit 3 times (32 tokens = 8 blocks of 4), if routed to its holder.
        if policy == "kv":
            assert hits == 3 * 3 * 32
        else:
            assert hits < 3 * 3 * 32
    finally:
        router.stop()
