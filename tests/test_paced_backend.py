"""The paced backend, seen from real HTTP clients (the openai SDK and httpx) over a real socket."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from rtlm_adapt.gateway.paced_backend import create_app, token_text  # noqa: E402
from rtlm_adapt.gateway.server_thread import ServerThread  # noqa: E402

CHAT = "/v1/chat/completions"
# Give up reading soon, but let a busy machine take its time to connect.
GIVE_UP = httpx.Timeout(10.0, read=0.2)


@contextmanager
def serve(**settings: Any) -> Iterator[tuple[str, Any]]:
    """A paced backend on a free port: yields (base URL, app)."""
    app = create_app(**settings)
    with ServerThread(app) as server:
        yield server.url, app


def client(url: str) -> Any:
    # No retries: a test must see each fault exactly once.
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def chat_body(max_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "say a word"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return {**body, **extra}


def sse_events(response: Any) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_non_streaming_objects_have_exact_token_counts() -> None:
    with serve(default_max_tokens=5) as (url, app):
        oai = client(url)
        chat = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "one two three"}], max_tokens=7
        )
        assert chat.object == "chat.completion"
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == "".join(token_text(i) for i in range(7))
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 7)
        assert chat.usage.total_tokens == 10

        text = oai.completions.create(model="m", prompt="a b", max_tokens=3)
        assert text.object == "text_completion"
        assert text.choices[0].text == "alpha bravo charlie "
        assert text.usage is not None and text.usage.completion_tokens == 3

        # max_completion_tokens is honoured, and the default applies when neither is given.
        newer = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_completion_tokens=2
        )
        assert newer.usage is not None and newer.usage.completion_tokens == 2
        default = httpx.post(url + CHAT, json=chat_body()).json()
        assert default["usage"]["completion_tokens"] == 5

        assert [e["outcome"] for e in app.state.log] == ["completed"] * 4
        assert [e["max_tokens"] for e in app.state.log] == [7, 3, 2, 5]


def test_stream_sends_one_chunk_per_token_and_usage_only_when_asked() -> None:
    with serve() as (url, app):
        with httpx.stream("POST", url + CHAT, json=chat_body(4, stream=True)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) == 4
        assert all("usage" not in c for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "alpha "}
        assert chunks[1]["choices"][0]["delta"] == {"content": "bravo "}
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]

        body = chat_body(4, stream=True, stream_options={"include_usage": True})
        with httpx.stream("POST", url + CHAT, json=body) as r:
            events = sse_events(r)
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) == 5 and events[-1] == "[DONE]"
        assert all(c["usage"] is None for c in chunks[:4])
        assert chunks[4]["choices"] == [] and chunks[4]["object"] == "chat.completion.chunk"
        assert chunks[4]["usage"]["completion_tokens"] == 4

        # The same through the SDK, on the legacy completions endpoint.
        stream = client(url).completions.create(
            model="m", prompt="p", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        parts = list(stream)
        assert [p.choices[0].text for p in parts[:3]] == ["alpha ", "bravo ", "charlie "]
        assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 3
        assert {p.object for p in parts} == {"text_completion"} and parts[-1].choices == []
        assert [e["include_usage"] for e in app.state.log] == [False, True, True]


def test_pace_sets_the_duration() -> None:
    n, rate, ttft = 30, 300.0, 0.05
    expected = ttft + n / rate  # 0.15 s
    with serve(tokens_per_s=rate, ttft_s=ttft) as (url, _):
        start = time.monotonic()
        httpx.post(url + CHAT, json=chat_body(n)).raise_for_status()
        plain = time.monotonic() - start

        start = time.monotonic()
        with httpx.stream("POST", url + CHAT, json=chat_body(n, stream=True)) as r:
            arrivals = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic() - start)
    assert expected <= plain < expected + 1.0
    assert len(arrivals) == n
    assert arrivals[0] >= ttft + 1 / rate
    assert expected <= arrivals[-1] < expected + 1.0


def test_queue_serves_lowest_priority_value_first_when_saturated() -> None:
    with serve(max_concurrency=1, tokens_per_s=100.0) as (url, app):
        log = app.state.log
        with httpx.Client(timeout=10) as http, ThreadPoolExecutor(8) as pool:
            # A 10 s stream holds the only slot until we hang up, so the timing cannot race.
            with http.stream("POST", url + CHAT, json=chat_body(1000, stream=True)) as blocker:
                lines = blocker.iter_lines()  # keep a reference: a dropped iterator hangs up
                assert next(lines).startswith("data: ")
                priorities = [3, 0, -2, 1, 0, 2]
                futures = []
                for i, priority in enumerate(priorities):
                    body = chat_body(1, priority=priority)
                    futures.append(pool.submit(http.post, url + CHAT, json=body))
                    wait_for(lambda i=i: len(log) == i + 2)  # arrival order = list order
                # Logged on arrival, queued a moment later (after the body is read).
                wait_for(lambda: http.get(url + "/debug/state").json()["waiting"] == 6)
                assert http.get(url + "/debug/state").json()["running"] == 1
                assert log[0]["outcome"] is None  # the blocker still holds the slot
            assert all(f.result().status_code == 200 for f in futures)
        assert log[0]["outcome"] == "aborted"
        queued = sorted(log[1:], key=lambda e: e["started_at"])
        assert [e["priority"] for e in queued] == [-2, 0, 0, 1, 2, 3]
        # Equal priorities keep their arrival order.
        assert [e["seq"] for e in queued if e["priority"] == 0] == [2, 5]


def test_non_integer_priority_and_bad_fields_are_400() -> None:
    with serve() as (url, app):
        with pytest.raises(openai.BadRequestError, match="priority"):
            client(url).chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "x"}],
                extra_body={"priority": "high"},
            )
        for body in (chat_body(0), chat_body(2, priority=1.5), {"model": "m"}):
            r = httpx.post(url + CHAT, json=body)
            assert r.status_code == 400 and "message" in r.json()["error"]
        r = httpx.post(url + CHAT, json=chat_body(1), headers={"x-fake-fault": "explode"})
        assert r.status_code == 400
        assert (
            httpx.post(url + "/debug/faults", json={"fail_next": 1, "mode": "x"}).status_code == 422
        )
        assert {e["outcome"] for e in app.state.log} == {"invalid"}


def test_each_fault_mode_as_a_client_sees_it() -> None:
    with serve(max_concurrency=1, tokens_per_s=200.0) as (url, app):
        fault = {"status": {"x-fake-fault": "status"}}
        r = httpx.post(url + CHAT, json=chat_body(2), headers=fault["status"])
        assert r.status_code == 500 and r.json()["error"]["code"] == 500
        with pytest.raises(openai.InternalServerError):
            client(url).chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "x"}],
                extra_headers=fault["status"],
            )

        for stream in (False, True):
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                body = chat_body(5, stream=stream)
                httpx.post(url + CHAT, json=body, headers={"x-fake-fault": "drop"})

        # midstream: a stream gets a few chunks, then the connection is cut.
        got: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            body = chat_body(20, stream=True)
            with httpx.stream(
                "POST", url + CHAT, json=body, headers={"x-fake-fault": "midstream"}
            ) as r:
                assert r.status_code == 200
                got.extend(line for line in r.iter_lines() if line.startswith("data: "))
        assert len(got) == 3 and "[DONE]" not in got[-1]
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(url + CHAT, json=chat_body(5), headers={"x-fake-fault": "midstream"})
        # The SDK wraps the cut stream in its connection error.
        with pytest.raises(openai.APIConnectionError):
            list(
                client(url).chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "x"}],
                    max_tokens=20,
                    stream=True,
                    extra_headers={"x-fake-fault": "midstream"},
                )
            )

        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                url + CHAT, json=chat_body(2), headers={"x-fake-fault": "hang"}, timeout=GIVE_UP
            )

        # The cut stream released the only slot: a normal request still completes.
        assert httpx.post(url + CHAT, json=chat_body(2), timeout=2).status_code == 200
        wait_for(lambda: app.state.log[-2]["finished_at"] is not None)  # the hang saw its client go
        outcomes = [e["outcome"] for e in app.state.log]
        assert outcomes == [
            "fault:status",
            "fault:status",
            "fault:drop",
            "fault:drop",
            "fault:midstream",
            "fault:midstream",
            "fault:midstream",
            "fault:hang",
            "completed",
        ]
        assert app.state.log[0]["headers"] == {"x-fake-fault": "status"}


def test_fail_next_then_recover() -> None:
    with serve() as (url, app):
        assert httpx.post(url + "/debug/faults", json={"fail_next": 2, "mode": "drop"}).is_success
        for _ in range(2):
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.post(url + CHAT, json=chat_body(1))
        assert httpx.post(url + CHAT, json=chat_body(1)).status_code == 200
        assert [e["outcome"] for e in app.state.log] == ["fault:drop", "fault:drop", "completed"]


def test_random_faults_follow_the_seed() -> None:
    def outcomes(url: str) -> list[int]:
        with httpx.Client() as http:
            return [http.post(url + CHAT, json=chat_body(1)).status_code for _ in range(30)]

    with serve(fault_rate=0.3, fault_modes=["status"], seed=7) as (url, app):
        first = outcomes(url)
        assert 0 < first.count(500) < 30 and set(first) == {200, 500}
        assert httpx.post(url + "/debug/reset").is_success  # reset also reseeds
        assert app.state.log == []
        assert outcomes(url) == first
        assert app.state.log[0]["seq"] == 0


def test_disconnects_abort_and_free_the_slot() -> None:
    with serve(max_concurrency=1, tokens_per_s=100.0) as (url, app):
        log = app.state.log
        # A stream of 10 s: read one chunk, then hang up.
        with httpx.stream("POST", url + CHAT, json=chat_body(1000, stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        wait_for(lambda: log[0]["outcome"] == "aborted")
        assert log[0]["finished_at"] - log[0]["started_at"] < 2.0

        # A non-streaming client that times out also aborts its request.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + CHAT, json=chat_body(1000), timeout=GIVE_UP)
        wait_for(lambda: log[1]["outcome"] == "aborted")

        # A queued client that gives up leaves the queue without ever starting.
        with httpx.Client(timeout=10) as http, ThreadPoolExecutor(2) as pool:
            blocker = pool.submit(http.post, url + CHAT, json=chat_body(80))
            wait_for(lambda: len(log) == 3 and log[2]["started_at"] is not None)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + CHAT, json=chat_body(1), timeout=GIVE_UP)
            wait_for(lambda: log[3]["outcome"] == "aborted")
            assert log[3]["started_at"] is None
            assert http.get(url + "/debug/state").json()["waiting"] == 0
            assert blocker.result().status_code == 200

        # The slot is free: a short request goes straight through.
        start = time.monotonic()
        assert httpx.post(url + CHAT, json=chat_body(2)).status_code == 200
        assert time.monotonic() - start < 2.0


def test_health_toggle_gates_the_endpoints() -> None:
    with serve() as (url, _):
        assert httpx.get(url + "/health").text == "ok"
        assert httpx.post(url + "/debug/health", json={"healthy": False}).is_success
        assert httpx.get(url + "/health").status_code == 503
        assert httpx.post(url + CHAT, json=chat_body(1)).status_code == 503
        with pytest.raises(openai.InternalServerError):
            client(url).completions.create(model="m", prompt="x", max_tokens=1)
        assert httpx.post(url + "/debug/health", json={"healthy": True}).is_success
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + CHAT, json=chat_body(1)).status_code == 200


def test_models_and_request_log_endpoints() -> None:
    with serve(model="tiny") as (url, _):
        assert [m.id for m in client(url).models.list()] == ["tiny"]
        headers = {"x-request-id": "abc", "authorization": "Bearer y"}
        httpx.post(url + CHAT, json=chat_body(1, priority=4), headers=headers)
        (entry,) = httpx.get(url + "/debug/requests").json()
        assert entry["headers"] == {"x-request-id": "abc"}  # only the x-* headers
        assert (entry["model"], entry["priority"], entry["stream"]) == ("m", 4, False)
        assert entry["received_at"] <= entry["started_at"] <= entry["finished_at"]
        httpx.post(url + "/debug/reset")
        assert httpx.get(url + "/debug/requests").json() == []


def test_server_thread_binds_a_free_port_and_stops_with_a_request_in_flight() -> None:
    app = create_app()
    server = ServerThread(app)
    with pytest.raises(RuntimeError):
        _ = server.url  # not started yet
    with server:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        hung = ThreadPoolExecutor(1)
        answer = hung.submit(
            httpx.post, server.url + CHAT, json=chat_body(1), headers={"x-fake-fault": "hang"}
        )
        wait_for(lambda: len(app.state.log) == 1)
        start = time.monotonic()
        server.stop(timeout=0.5)  # a hung request must not keep the server alive
        assert time.monotonic() - start < 3.0
    server.stop()  # idempotent
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health")
    # Forced out, uvicorn cancels the hung request and answers it with a bare 500.
    try:
        assert answer.result(timeout=2).status_code == 500
    except httpx.TransportError:
        pass  # or the connection went first
    hung.shutdown()
