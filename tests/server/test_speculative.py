"""A server with speculative decoding: the same greedy text as offline plain decoding, streamed (several
tokens per engine step) and not, and vLLM's spec_decode counters on /metrics."""

from __future__ import annotations

import json

import httpx
import pytest

from duoserve.llm import LLM
from duoserve.sampling_params import SamplingParams
from tests.helpers import random_prompt
from tests.server.harness import ENGINE_ARGS

pytest.importorskip("transformers")


def test_speculative_server_matches_plain_offline_and_exports_counters(start_server, model_dir):
    # The target as its own draft: every draft is accepted, so each step emits up to 1 + 3 tokens. Such a
    # draft costs as much as it saves, so the priced back-off would stop it; a seeded request backs off on
    # acceptance alone, and a seed does not change greedy tokens.
    server = start_server(speculative="draft", num_speculative_tokens=3)
    prompt = random_prompt(9, seed=5)
    expected = LLM(model=model_dir, **ENGINE_ARGS).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )[0]
    body = {
        "model": model_dir,
        "prompt": prompt,
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
        "seed": 1,
    }
    url = f"{server.base_url}/v1/completions"
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected.outputs[0].text
    streamed = ""
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += json.loads(line[6:])["choices"][0]["text"]
    assert streamed == expected.outputs[0].text
    metrics = server.metrics()
    drafts = metrics["duoserve:spec_decode_num_drafts_total"]
    draft_tokens = metrics["duoserve:spec_decode_num_draft_tokens_total"]
    assert drafts > 0 and draft_tokens > drafts
    assert metrics["duoserve:spec_decode_num_accepted_tokens_total"] == draft_tokens
    assert metrics['duoserve:spec_decode_num_accepted_tokens_per_pos_total{position="0"}'] == drafts
