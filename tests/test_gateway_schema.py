"""Schemathesis over the gateway's published OpenAPI schema: generated good and bad input.

The gateway runs in front of a fast paced backend (so valid requests are really served). For every
operation schemathesis generates conforming bodies (positive mode) and non-conforming ones
(negative mode: wrong types, missing fields, unexpected methods, raw bytes) and checks that the
gateway never answers 5xx, answers only documented status codes and content types, and that what
it answers matches the documented schemas.

A streamed answer is also checked event by event (JSON chunks, then ``[DONE]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from rtlm_adapt.gateway.app import create_app  # noqa: E402
from rtlm_adapt.gateway.config import BackendConfig, GatewayConfig  # noqa: E402
from rtlm_adapt.gateway.paced_backend import create_app as paced_app  # noqa: E402
from rtlm_adapt.gateway.server_thread import ServerThread  # noqa: E402

#: Generated max_tokens above this are lowered to it: the paced backend really generates them.
MAX_TOKENS = 4
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    positive_data_acceptance,  # what the schema calls valid is served (2xx)
]
#: Integer fields of the request bodies.
INT_FIELDS = ("max_tokens", "max_completion_tokens", "priority")


def _config(url: str) -> GatewayConfig:
    return GatewayConfig(
        backends=(BackendConfig(url),),
        max_inflight=8,
        health_interval_s=0.5,
        request_timeout_s=10.0,
    )


# The schema the gateway publishes (test_published_schema_is_the_one_tested checks it is what
# GET /openapi.json serves); the backend URL does not change it.
RAW_SCHEMA = create_app(_config("http://127.0.0.1:9")).openapi()
schema = schemathesis.openapi.from_dict(RAW_SCHEMA).include(
    path=["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"]
)
schema.config.generation.update(
    max_examples=40,
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    deterministic=True,  # reproducible in CI; the same examples every run
)


@schema.hook
def map_body(context: Any, body: Any) -> Any:
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            big = isinstance(value, (int, float)) and not isinstance(value, bool)
            if big and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
    return body


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    backend = paced_app(tokens_per_s=5000.0, default_max_tokens=2)
    with ServerThread(backend) as be, ServerThread(create_app(_config(be.url))) as gw:
        yield gw.url


def _is_stream(case: Any) -> bool:
    return isinstance(case.body, dict) and case.body.get("stream") is True


def _check_sse(response: Any) -> None:
    """A streamed answer: JSON chunks (each with choices or usage), then ``[DONE]``."""
    data = [
        line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert data and data[-1] == "[DONE]", response.text
    for item in data[:-1]:
        chunk = json.loads(item)
        assert isinstance(chunk, dict) and ("choices" in chunk or "usage" in chunk), chunk


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_schema_conformance(case: Any, gateway_url: str) -> None:
    response = case.call(base_url=gateway_url, timeout=30)
    if response.status_code == 200 and _is_stream(case):
        _check_sse(response)
    case.validate_response(response, checks=CHECKS)


def test_published_schema_is_the_one_tested(gateway_url: str) -> None:
    served = httpx.get(gateway_url + "/openapi.json").json()
    assert served == json.loads(json.dumps(RAW_SCHEMA))
    paths = served["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        codes = set(paths[path]["post"]["responses"])
        assert {"200", "400", "413", "429", "502", "503", "504"} <= codes
        assert "422" not in codes  # validation errors are answered 400
        assert "text/event-stream" in paths[path]["post"]["responses"]["200"]["content"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
def test_sse_events_match_the_published_schema(
    gateway_url: str, path: str, body: dict[str, Any]
) -> None:
    operation = schema[path]["POST"]
    case = operation.Case(
        body={**body, "max_tokens": 3, "stream": True}, media_type="application/json"
    )
    response = case.call(base_url=gateway_url, timeout=30)
    assert response.status_code == 200
    _check_sse(response)
    case.validate_response(response, checks=[response_schema_conformance])


def _request_schema_allows(path: str, body: Any) -> bool:
    """Whether the published schema calls ``body`` a valid request body for ``path``."""
    content = RAW_SCHEMA["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    document = {**content["schema"], "components": RAW_SCHEMA["components"]}
    return jsonschema.Draft202012Validator(document).is_valid(body)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param(
            "/v1/completions",
            {"prompt": [], "max_tokens": 2},
            id="empty prompt list",
        ),
        pytest.param(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.0},
            id="integral float",
        ),
        pytest.param("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2}, id="prompt list"),
        pytest.param("/v1/completions", {"prompt": "", "max_tokens": 2}, id="empty prompt"),
        pytest.param("/v1/chat/completions", {"messages": [], "max_tokens": 2}, id="no messages"),
        pytest.param(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            id="content parts",
        ),
    ],
)
def test_schema_and_gateway_agree_on_what_is_valid(
    gateway_url: str, path: str, body: dict[str, Any]
) -> None:
    response = httpx.post(gateway_url + path, json=body)
    assert response.status_code in (200, 400), response.text
    assert (response.status_code == 200) == _request_schema_allows(path, body), response.text


def test_deadline_header_is_documented() -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        parameters = RAW_SCHEMA["paths"][path]["post"].get("parameters", [])
        assert any(
            p.get("in") == "header" and p.get("name", "").lower() == "x-rtlm-deadline-ms"
            for p in parameters
        )
