"""/openapi.json describes every public route with the request models the server validates with, and a
schemathesis run over it against the real server gets no 5xx and no answer the document does not allow.

DUOSERVE_FUZZ_EXAMPLES sets the examples per operation (default: a short run for the suite);
benchmarks/fuzz_api.sh runs a long one against any model.
"""

from __future__ import annotations

import os

import httpx
import pytest

from duoserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    TokenizeRequest,
)

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (after the skip: schemathesis brings hypothesis)
from schemathesis.checks import positive_data_acceptance  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

API_KEY = "fuzz-key"
MAX_MODEL_LEN = 24
NUM_KV_BLOCKS = 128 * MAX_MODEL_LEN // 4 + 8  # block_size 4 (ENGINE_ARGS)
EXAMPLES = int(os.environ.get("DUOSERVE_FUZZ_EXAMPLES", "8"))
PUBLIC_ROUTES = {
    "/v1/completions": "post",
    "/v1/chat/completions": "post",
    "/v1/models": "get",
    "/health": "get",
    "/livez": "get",
    "/ready": "get",
    "/tokenize": "post",
    "/detokenize": "post",
    "/metrics": "get",
}
BODIES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


@pytest.fixture(scope="module")
def server(start_server):
    # The HTTP layer is under test: the torch attention backend spares a compiled kernel. A short context
    # with room for n=128 sequences at once: the fuzzer asks for every n, and a chat request without
    # max_tokens fills the context (on 64 blocks, 128 long sequences would take minutes of preemptions).
    return start_server(
        api_key=API_KEY, attention_backend="torch", max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_KV_BLOCKS
    )


@pytest.fixture(scope="module")
def document(server) -> dict:
    response = httpx.get(f"{server.base_url}/openapi.json", headers=server.headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_every_public_route_and_no_internal_one_is_described(document):
    paths = document["paths"]
    assert {path: list(ops) for path, ops in paths.items()} == {p: [m] for p, m in PUBLIC_ROUTES.items()}
    assert not any(path.startswith("/internal") for path in paths)
    assert document["openapi"].startswith("3.")


def test_request_bodies_are_the_models_the_server_validates_with(document):
    schemas = document["components"]["schemas"]
    for path, model in BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model.__name__}"
        }
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = expected.pop("$defs", {})
        assert schemas[model.__name__] == expected
        for name, schema in defs.items():
            assert schemas[name] == schema
    completion = schemas["CompletionRequest"]
    assert completion["required"] == ["prompt"] and completion["properties"]["max_tokens"]["default"] == 16
    prompt_kinds = [kind["type"] for kind in completion["properties"]["prompt"]["anyOf"]]
    assert prompt_kinds == ["string", "array", "array", "array"]  # text, texts, token ids, lists of them
    content = schemas["ChatMessage"]["properties"]["content"]["anyOf"]
    assert {"items": {"$ref": "#/components/schemas/TextContentPart"}, "type": "array"} in content


def test_errors_are_documented_as_openai_error_bodies(document):
    error_ref = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "415", "429", "503"} <= set(responses)
    for status in ("400", "401", "413", "429"):
        assert responses[status]["content"]["application/json"]["schema"] == error_ref
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert document["components"]["schemas"]["ErrorInfo"]["required"] == ["message", "type", "param", "code"]
    # With --api-key every operation but the probes asks for the bearer token.
    assert "security" not in document["paths"]["/health"]["get"]
    assert "security" not in document["paths"]["/livez"]["get"]
    assert document["paths"]["/metrics"]["get"]["security"] == [{"bearerAuth": []}]


@pytest.fixture(scope="module")
def api_schema(server):
    # Fuzzing only: the coverage phase's boundary cases number in the hundreds whatever max_examples says
    # (the long run, benchmarks/fuzz_api.sh, has every phase).
    # No crash cache written into the checkout either.
    config = SchemathesisConfig.from_dict(
        {"phases": {"coverage": {"enabled": False}}, "cache": {"enabled": False}}
    )
    return schemathesis.openapi.from_url(
        f"{server.base_url}/openapi.json", config=config, headers=server.headers
    )


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a generation request on a loaded machine
    derandomize=True,  # the same cases every run
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(case, server):
    # Every default check (not_a_server_error, status codes, content types, response schemas,
    # negative_data_rejection, ...) but positive_data_acceptance: the schema states types, and values
    # a type admits can still be refused (a prompt longer than the context, an unknown model name).
    case.call_and_validate(headers=server.headers, excluded_checks=[positive_data_acceptance], timeout=60)


def test_the_server_is_well_after_the_fuzzing(server):
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"prompt": "w5 w6", "max_tokens": 2},
        headers=server.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log and "engine died" not in log
