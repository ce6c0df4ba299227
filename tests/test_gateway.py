"""The scheduling gateway's mechanics, end to end over real sockets.

Every test runs the gateway (``rtlm_adapt.gateway.app``) and one or more paced backends
(``rtlm_adapt.gateway.paced_backend``) in uvicorn threads, and talks to the gateway with the
official ``openai`` client where a user would (httpx only for raw SSE lines and bad input).
What the backends saw comes from their request logs; what the gateway counted from
``AdaptiveController.stats()`` and ``GET /metrics``.

A request is "held" on a backend by a long stream (thousands of tokens) that the test closes when
it is done with the slot: ordering and routing then depend on nothing but the gateway's choices.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rtlm_adapt.controller import AdaptiveController  # noqa: E402
from rtlm_adapt.gateway.app import create_app  # noqa: E402
from rtlm_adapt.gateway.cli import add_arguments, config_from_args  # noqa: E402
from rtlm_adapt.gateway.config import BackendConfig, GatewayConfig  # noqa: E402
from rtlm_adapt.gateway.headers import DEADLINE_HEADER  # noqa: E402
from rtlm_adapt.gateway.paced_backend import create_app as paced_app  # noqa: E402
from rtlm_adapt.gateway.paced_backend import token_text  # noqa: E402
from rtlm_adapt.gateway.server_thread import ServerThread  # noqa: E402
from rtlm_adapt.knobs import Knobs  # noqa: E402
from rtlm_adapt.predictor import LengthPredictor  # noqa: E402
from rtlm_adapt.request import FAILURE_REASONS, FailureReason, Request  # noqa: E402

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
#: Prompts whose predicted lengths (the packaged lexical prior) differ widely.
SHORT = ("Hi", "Name one prime number.")
LONG = (
    "Write a story",
    "Write a long detailed essay about the history of the Roman Empire, covering its rise, "
    "its emperors, its wars and its fall, in at least 2000 words.",
    "Explain in detail how a transformer neural network works, step by step, with examples "
    "and code.",
)
#: Tokens of a stream that holds its slot until the test closes it (50 s at the default pace:
#: longer than any test holds a slot, even on a loaded machine).
HOLD = 100_000


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Paced:
    """A running paced backend."""

    url: str
    app: Any
    server: ServerThread

    @property
    def name(self) -> str:
        return self.url.removeprefix("http://")

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.app.state.log

    def running(self) -> list[dict[str, Any]]:
        return [e for e in self.log if e["started_at"] is not None and e["outcome"] is None]

    def fault(self, mode: str, n: int = 1) -> None:
        r = httpx.post(self.url + "/debug/faults", json={"fail_next": n, "mode": mode})
        r.raise_for_status()

    def set_healthy(self, healthy: bool) -> None:
        httpx.post(self.url + "/debug/health", json={"healthy": healthy}).raise_for_status()

    def config(self, **settings: Any) -> BackendConfig:
        return BackendConfig(self.url, **settings)


@contextmanager
def paced(port: int = 0, **settings: Any) -> Iterator[Paced]:
    settings.setdefault("tokens_per_s", 2000.0)
    app = paced_app(**settings)
    with ServerThread(app, port=port) as server:
        yield Paced(server.url, app, server)


@dataclass
class Gw:
    """A running gateway and an openai client for it."""

    url: str
    app: Any
    clients: list[Any] = field(default_factory=list)
    _oai: Any = None

    @property
    def gateway(self) -> Any:
        return self.app.state.gateway

    @property
    def controller(self) -> AdaptiveController:
        return self.gateway.controller

    def client(self, **options: Any) -> Any:
        options.setdefault("timeout", 20.0)
        oai = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, **options)
        self.clients.append(oai)
        return oai

    @property
    def oai(self) -> Any:
        """The default client (20 s timeout)."""
        if self._oai is None:
            self._oai = self.client()
        return self._oai

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        text = httpx.get(self.url + "/metrics").text
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
        return sum(
            value
            for got, value in self.metrics().get(name, [])
            if all(got.get(k) == v for k, v in labels.items())
        )


@contextmanager
def gateway(*backends: Paced | BackendConfig, controller: Any = None, **settings: Any):
    configs = tuple(b.config() if isinstance(b, Paced) else b for b in backends)
    # The probe's timeout is min(2 s, the interval): not too short, or a busy test machine
    # takes a healthy backend out of rotation.
    settings.setdefault("health_interval_s", 0.5)
    app = create_app(GatewayConfig(backends=configs, **settings), controller=controller)
    with ServerThread(app) as server:
        gw = Gw(server.url, app)
        try:
            yield gw
        finally:
            for oai in gw.clients:
                oai.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


# -- small helpers ---------------------------------------------------------------------------------
def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat(oai: Any, prompt: str = "say a word", max_tokens: int = 3, **kw: Any) -> Any:
    """A non-streamed chat completion; returns the raw response (headers, then ``.parse()``)."""
    return oai.chat.completions.with_raw_response.create(
        model="m", messages=user(prompt), max_tokens=max_tokens, **kw
    )


@contextmanager
def held(oai: Any, prompt: str = "hold the slot", **kw: Any) -> Iterator[Any]:
    """A long stream, admitted and generating, until the block ends (the client then leaves)."""
    stream = oai.chat.completions.create(
        model="m", messages=user(prompt), max_tokens=HOLD, stream=True, **kw
    )
    try:
        next(iter(stream))
        yield stream
    finally:
        stream.close()


def wait_for(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.005)


def sse_data(response: Any) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def max_overlap(entries: list[dict[str, Any]], slack: float = 0.002) -> int:
    """Most requests generating at once at a backend, from its log's [started_at, finished_at].

    ``slack`` trims each end: the backend logs ``finished_at`` a loop turn after its last byte,
    so a client can hold its answer before the log has it: wait for that first.
    """
    wait_for(lambda: all(e["finished_at"] is not None for e in entries), what="the log complete")
    events = [(e["started_at"], 1) for e in entries]
    events += [(e["finished_at"] - slack, -1) for e in entries]
    events.sort(key=lambda ev: (ev[0], ev[1]))
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def assert_accounting(gw: Gw) -> Any:
    """Every request ended, stats() balances, the slots are free, /metrics tells the same story.

    Returns the stats. (Waits a little first: the metrics count an end just after the controller.)
    """

    def counted() -> dict[tuple[str, str], float]:
        samples = gw.metrics()["rtlm_requests_total"]
        return {(labels["outcome"], labels["reason"]): value for labels, value in samples}

    def expected() -> dict[tuple[str, str], float]:
        stats = gw.controller.stats()
        out = {("failed", r): float(stats.failures[r]) for r in FAILURE_REASONS}
        return {("completed", ""): float(stats.finished), **out}

    def settled() -> bool:
        stats = gw.controller.stats()
        return (
            stats.queued == stats.running == 0
            and all(b.inflight == 0 for b in gw.gateway.backends)
            and counted() == expected()
        )

    try:
        wait_for(settled, timeout=3.0, what="every request ended and counted")
    except AssertionError:
        pass  # the asserts below say what differs
    stats = gw.controller.stats()
    assert stats.balanced, stats
    assert (stats.queued, stats.running) == (0, 0), stats
    assert counted() == expected()
    assert [b.inflight for b in gw.gateway.backends] == [0] * len(gw.gateway.backends)
    return stats


def predicted_length(controller: AdaptiveController, prompt: str) -> float:
    """What ``controller`` would predict for ``prompt`` now (asked of a copy)."""
    clone = AdaptiveController.from_state_bytes(controller.state_bytes())
    clone.submit(Request("probe", prompt, arrival_time=0.0))
    return clone.entry("probe").prediction.length


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# == 1. pass-through ===============================================================================
@pytest.mark.parametrize("send_priority", [False, True])
def test_non_stream_pass_through(send_priority: bool) -> None:
    with paced() as be, gateway(be.config(send_priority=send_priority), policy="sjf") as gw:
        raw = chat(gw.oai, "one two three", max_tokens=7, extra_body={"priority": 5})
        answer = raw.parse()
        assert answer.object == "chat.completion"
        assert answer.usage.completion_tokens == 7
        assert answer.usage.prompt_tokens == 3
        assert answer.choices[0].message.content == "".join(token_text(i) for i in range(7))

        text = gw.oai.completions.with_raw_response.create(model="m", prompt="a b", max_tokens=4)
        assert text.parse().usage.completion_tokens == 4
        assert text.parse().choices[0].text == "alpha bravo charlie delta "

        assert [e["endpoint"] for e in be.log] == ["chat", "completions"]
        assert [e["max_tokens"] for e in be.log] == [7, 4]
        assert [e["outcome"] for e in be.log] == ["completed", "completed"]
        for entry, response in zip(be.log, (raw, text), strict=True):
            assert response.headers["x-rtlm-backend"] == be.name
            assert entry["headers"]["x-request-id"] == response.headers["x-request-id"]
            assert entry["stream"] is False and entry["model"] == "m"
            if send_priority:  # the controller's priority, never the client's
                assert entry["priority"] == int(response.headers["x-rtlm-priority"]) != 5
            else:  # not sent at all: the backend's default
                assert entry["priority"] == 0
        assert assert_accounting(gw).finished == 2


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_usage_chunk_only_when_the_client_asks(endpoint: str) -> None:
    n = 5

    def create(oai: Any, **kw: Any) -> Any:
        if endpoint == "chat":
            return oai.chat.completions.create(
                model="m", messages=user("stream it"), max_tokens=n, stream=True, **kw
            )
        return oai.completions.create(
            model="m", prompt="stream it", max_tokens=n, stream=True, **kw
        )

    def text_of(chunk: Any) -> str:
        return chunk.choices[0].delta.content if endpoint == "chat" else chunk.choices[0].text

    with paced() as be, gateway(be.config(send_priority=True)) as gw:
        plain = list(create(gw.oai))
        assert [text_of(c) for c in plain] == [token_text(i) for i in range(n)]
        assert all(c.usage is None for c in plain)

        asked = list(create(gw.oai, stream_options={"include_usage": True}))
        assert [text_of(c) for c in asked[:n]] == [token_text(i) for i in range(n)]
        assert len(asked) == n + 1 and asked[-1].choices == []
        assert asked[-1].usage.completion_tokens == n

        declined = list(create(gw.oai, stream_options={"include_usage": False}))
        assert len(declined) == n and all(c.usage is None for c in declined)

        # On the wire: no usage key at all (not even the null placeholder) for a client that
        # did not ask, and the stream ends with [DONE].
        path = CHAT if endpoint == "chat" else COMPLETIONS
        body: dict[str, Any] = {"model": "m", "max_tokens": n, "stream": True}
        body.update({"messages": user("raw")} if endpoint == "chat" else {"prompt": "raw"})
        with httpx.stream("POST", gw.url + path, json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-rtlm-backend"] == be.name
            data = sse_data(r)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert len(chunks) == n and all("usage" not in c for c in chunks)

        # The gateway always asked upstream for usage, and priority went to this backend.
        assert [e["stream"] for e in be.log] == [True] * 4
        assert [e["include_usage"] for e in be.log] == [True] * 4
        assert all(isinstance(e["priority"], int) and e["priority"] > 0 for e in be.log)
        # ... and learned each stream's true length from it.
        assert gw.metric("rtlm_actual_output_tokens_sum") == 4 * n
        assert gw.metric("rtlm_ttft_seconds_count", backend=be.name) == 4
        assert assert_accounting(gw).finished == 4


def test_models_and_health() -> None:
    with paced(model="alpha") as a, paced(model="beta") as b, gateway(a, b) as gw:
        assert sorted(m.id for m in gw.oai.models.list()) == ["alpha", "beta"]
        health = httpx.get(gw.url + "/health")
        assert health.status_code == 200
        assert health.json() == {
            "status": "ok",
            "backends": {a.name: True, b.name: True},
            "queued": 0,
        }


# == 2. learning ===================================================================================
def test_predictor_learns_from_every_answer(pool: ThreadPoolExecutor) -> None:
    prompt, length, n = "Write a story about a dragon.", 6, 24
    with paced(tokens_per_s=5000.0) as be, gateway(be, policy="sjf", max_inflight=4) as gw:
        before = predicted_length(gw.controller, prompt)
        latency = gw.controller.latency[be.name]
        step_before = latency.step_time(1)
        first = chat(gw.oai, prompt, max_tokens=length)

        def one(i: int) -> None:
            if i % 3 == 0:  # a stream whose client did not ask for usage teaches too
                list(
                    gw.oai.chat.completions.create(
                        model="m", messages=user(prompt), max_tokens=length, stream=True
                    )
                )
            else:
                chat(gw.oai, prompt, max_tokens=length)

        list(pool.map(one, range(n - 1)))
        stats = assert_accounting(gw)
        assert stats.finished == n and stats.submitted == n
        after = predicted_length(gw.controller, prompt)
        # Learned towards the true 6 tokens (from ~240 predicted by the prior).
        assert after < 0.75 * before
        assert float(first.headers["x-rtlm-predicted-tokens"]) == pytest.approx(before, abs=0.5)
        last = chat(gw.oai, prompt, max_tokens=length)
        assert float(last.headers["x-rtlm-predicted-tokens"]) == pytest.approx(after, abs=0.5)
        assert gw.metric("rtlm_actual_output_tokens_count") == n + 1
        assert gw.metric("rtlm_actual_output_tokens_sum") == (n + 1) * length
        # Time per token taught the latency model (the backend is far faster than its prior).
        assert latency.n_learned > 0
        assert latency.step_time(1) < 0.5 * step_before


def test_backend_latency_models_start_from_the_configured_profile() -> None:
    from rtlm_adapt.calibration.step_cost import StepCost

    with paced() as be:
        for name in ("http-engine-prior", "vllm-cpu-smollm2-135m"):
            settings = {} if name == "http-engine-prior" else {"profile": name}
            with gateway(be, **settings) as gw:
                model, prior = gw.controller.latency[be.name], StepCost.load(name)
                assert model.n_learned == 0
                assert model.step_time(4, 400) == pytest.approx(prior.step_time(4, 400))
    backend = (BackendConfig("http://127.0.0.1:9"),)
    with pytest.raises(ValueError, match="unknown cost profile 'no-such-profile'"):
        create_app(GatewayConfig(backends=backend, profile="no-such-profile"))


def test_metrics_reflect_lengths_and_ranking() -> None:
    short, long_, n = 4, 40, 32
    with paced(tokens_per_s=20_000.0) as be, gateway(be, policy="sjf") as gw:
        for i in range(n):
            if i % 2:
                chat(gw.oai, f"Name one prime number bigger than {i}.", max_tokens=short)
            else:
                chat(gw.oai, f"Write a long detailed essay about topic {i} and its history.", 40)
        assert_accounting(gw)
        buckets = {
            labels["le"]: value
            for labels, value in gw.metrics()["rtlm_actual_output_tokens_bucket"]
        }
        assert buckets["4.0"] == n / 2 and buckets["32.0"] == n / 2 and buckets["64.0"] == n
        assert gw.metric("rtlm_actual_output_tokens_sum") == n / 2 * (short + long_)
        assert gw.metric("rtlm_predicted_output_tokens_count") == n
        # Long prompts were predicted longer: the sliding Kendall tau sees the ranking.
        assert gw.metric("rtlm_prediction_kendall_tau") > 0.5
        assert gw.metric("rtlm_response_time_seconds_count", backend=be.name) == n


def test_a_guarded_learned_policy_shows_its_guard_in_metrics() -> None:
    with paced() as be, gateway(be, policy="ppo") as gw:
        assert chat(gw.oai).status_code == 200
        assert gw.metric("rtlm_policy_guard", figure="learned_active") == 1.0
        assert gw.metric("rtlm_policy_guard", figure="handbacks") == 0.0
        guard = gw.controller.policy.guard
        guard.active, guard.handbacks = "heuristic", 1  # as after a hand-back
        assert gw.metric("rtlm_policy_guard", figure="learned_active") == 0.0
        assert gw.metric("rtlm_policy_guard", figure="handbacks") == 1.0


def test_the_shadow_guard_hands_a_bad_policy_back_inside_the_gateway(tmp_path, pool) -> None:
    """The guard sees the gateway's own traffic (the controller's log), replays it on the
    gateway's backends as their latency models learned them, on a worker thread (the event
    loop must not pause), and acts on the verdict at a later scheduling epoch."""
    import numpy as np

    from rtlm_adapt.policies.action_space import KnobsActionMap
    from rtlm_adapt.policies.mlp_actor import MLPActor
    from rtlm_adapt.policies.ppo import PPOPolicy

    # one request at a time in arrival order: format 1's action map at its lowest batch cap
    actor = MLPActor([(np.zeros((6, 14)), np.array([-1.0, -1.0, -1.0, -1.0, -1.0, 1.0]))])
    bad = PPOPolicy(actor, action_map=KnobsActionMap()).save(tmp_path / "bad.npz")
    with paced() as be, gateway(be, policy=f"ppo:{bad}") as gw:
        guard = gw.controller.policy.guard
        assert gw.controller.traffic is guard.traffic  # attached when the gateway took it
        assert guard.background
        answers = list(pool.map(lambda i: chat(gw.oai, f"Write {i} words", max_tokens=20),
                                range(guard.judge_every)))
        assert all(r.status_code == 200 for r in answers)

        def handed_back() -> bool:  # the policy decides (and the guard looks) once an epoch
            time.sleep(1.05)
            assert chat(gw.oai).status_code == 200
            return gw.metric("rtlm_policy_guard", figure="handbacks") == 1.0

        wait_for(handed_back, timeout=15.0, what="a hand-back")
        assert gw.metric("rtlm_policy_guard", figure="learned_active") == 0.0
        # the replays found the learned policy slower (how much depends on how the requests
        # happened to arrive together: 1.48x in one CI run on the 2-core machine)
        assert gw.metric("rtlm_policy_guard", figure="shadow_ratio") > 1.0


def test_the_shadow_guard_replays_every_primary_backend() -> None:
    """A pool of two backends is replayed as two primaries (replayed on one, the judgement
    would serve twice the load on half the seats; BENCHMARKS.md 4.8)."""
    from rtlm_adapt.shadow import ShadowSetup

    with paced() as a, paced() as b, gateway(a, b, policy="ppo") as gw:
        assert chat(gw.oai).status_code == 200
        setup = ShadowSetup.of(gw.controller)
        names = [backend.name for backend in gw.gateway.backends]
        assert len(set(names)) == 2
        assert sorted(shadow.name for shadow in setup.primaries) == sorted(names)


def test_oracle_policy_ranks_by_the_oracle_header() -> None:
    with paced() as be, gateway(be, policy="oracle-sjf") as gw:
        raw = chat(gw.oai, extra_headers={"x-rtlm-oracle-tokens": "5"})
        assert raw.status_code == 200
        assert int(raw.headers["x-rtlm-priority"]) > 0
        with pytest.raises(openai.BadRequestError, match="true length"):
            chat(gw.oai)  # an oracle policy needs the true length
        with pytest.raises(openai.BadRequestError) as info:
            chat(gw.oai, extra_headers={"x-rtlm-oracle-tokens": "many"})
        assert info.value.body["param"] == "x-rtlm-oracle-tokens"
        stats = assert_accounting(gw)
        assert (stats.submitted, stats.finished) == (1, 1)  # refused ones are not requests
        assert len(be.log) == 1


# == 3. ordering under saturation ==================================================================
def scratch_keys(prompts: tuple[str, ...], knobs: Knobs | None = None) -> dict[str, float]:
    """Each prompt's priority key in a fresh controller (under ``knobs``), all arriving at 0."""
    ctl = AdaptiveController("sjf")
    if knobs is not None:
        ctl.set_knobs(knobs)
    for i, prompt in enumerate(prompts):
        ctl.submit(Request(f"k{i}", prompt, arrival_time=0.0))
    return {p: ctl.entry(f"k{i}").key for i, p in enumerate(prompts)}


@pytest.mark.parametrize("policy", ["sjf", "heuristic", "fcfs"])
def test_saturated_backend_admits_in_key_order(policy: str, pool: ThreadPoolExecutor) -> None:
    prompts = SHORT + LONG + ("What is 2+2?",)
    # Arrive longest-first (by the predictor's own keys): a length-aware policy must reverse it.
    keys = scratch_keys(prompts)
    arrival = sorted(prompts, key=lambda p: -keys[p])
    with paced() as be, gateway(be.config(send_priority=True), policy=policy, max_inflight=1) as gw:
        futures: list[Future[Any]] = []
        with held(gw.oai):
            for i, prompt in enumerate(arrival):
                futures.append(pool.submit(chat, gw.oai, prompt, 2))
                wait_for(lambda i=i: len(gw.controller) == i + 1, what=f"{i + 1} queued")
            assert len(be.log) == 1  # only the held request reached the backend
        responses = [f.result() for f in futures]
        prompt_of = {r.headers["x-request-id"]: p for r, p in zip(responses, arrival, strict=True)}
        by_id = {r.headers["x-request-id"]: r for r in responses}
        priority_of = {
            r.headers["x-request-id"]: int(r.headers["x-rtlm-priority"]) for r in responses
        }
        started = sorted(be.log[1:], key=lambda e: e["started_at"])
        order = [prompt_of[e["headers"]["x-request-id"]] for e in started]
        # x-rtlm-queue-ms: each queued behind the held request; reversing the arrival order, a
        # length-aware policy starts last one of the first to arrive: it waited the longest
        waited = [
            float(by_id[e["headers"]["x-request-id"]].headers["x-rtlm-queue-ms"]) for e in started
        ]
        assert min(waited) > 0
        if policy != "fcfs":
            assert waited[-1] == max(waited) > waited[0]
        received = [e["priority"] for e in started]
        # The backend got the controller's priority, and they arrive in non-decreasing order.
        assert received == [priority_of[e["headers"]["x-request-id"]] for e in started]
        assert received == sorted(received)
        if policy == "fcfs":
            assert order == arrival
        else:  # by the keys under the knobs the policy set
            ranked = scratch_keys(prompts, gw.controller.knobs)
            assert order == sorted(prompts, key=lambda p: ranked[p])
            assert order != arrival
        assert max_overlap(started) <= 1


@pytest.mark.parametrize("max_wait_s", [0.3, math.inf])
def test_a_request_overdue_inside_the_backend_is_not_passed_again(
    max_wait_s: float, pool: ThreadPoolExecutor
) -> None:
    # One seat, an in-flight cap of 3: two requests wait in the backend's own priority queue.
    # A long request sent early is passed there by every shorter one sent after it, unless the
    # gateway stops sending once it is overdue (waited past the hard aging bound, not started).
    long_prompt, short_prompt = LONG[0], SHORT[1]
    keys = scratch_keys((long_prompt, short_prompt))
    assert keys[long_prompt] > keys[short_prompt]  # the long one has the worse priority
    controller = AdaptiveController("sjf")
    knobs = Knobs(length_weight=1.0, wait_weight=0.0, max_wait_s=max_wait_s)
    controller.set_knobs(knobs, hold=True)

    def stream(prompt: str) -> int:
        chunks = gw.oai.chat.completions.create(
            model="m", messages=user(prompt), max_tokens=20, stream=True
        )
        return sum(1 for _ in chunks)

    with (
        paced(tokens_per_s=200.0, max_concurrency=1) as be,
        gateway(be.config(send_priority=True), controller=controller, max_inflight=3) as gw,
    ):
        with held(gw.oai):
            futures = [pool.submit(stream, long_prompt)]
            wait_for(lambda: len(be.log) == 2, what="the long request sent")
            futures += [pool.submit(stream, short_prompt) for _ in range(5)]
            wait_for(lambda: len(gw.controller) == 4, what="4 short requests queued")
            time.sleep(2 * 0.3)  # the long request, waiting in the backend, is now overdue
        assert all(f.result() >= 1 for f in futures)
        started = sorted(be.log[1:], key=lambda e: e["started_at"])
        long_id = be.log[1]["headers"]["x-request-id"]
        place = [e["headers"]["x-request-id"] for e in started].index(long_id)
        assert_accounting(gw)
    if max_wait_s < math.inf:
        assert place == 1  # right after the short request that was already in the backend
    else:
        assert place == 5  # passed by all five


# == 4. consolidation ==============================================================================
def test_inflight_never_exceeds_the_cap(pool: ThreadPoolExecutor) -> None:
    with paced(tokens_per_s=1000.0) as be, gateway(be, policy="fcfs", max_inflight=2) as gw:
        list(pool.map(lambda i: chat(gw.oai, f"request {i}", max_tokens=25), range(10)))
        assert_accounting(gw)
        assert len(be.log) == 10
        assert max_overlap(be.log) == 2  # reached, never passed


def test_policy_batch_cap_is_the_inflight_cap(pool: ThreadPoolExecutor) -> None:
    controller = AdaptiveController("fcfs")
    controller.set_knobs(Knobs(length_weight=0.0, wait_weight=1.0, max_batch_size=1), hold=True)
    with paced(tokens_per_s=1000.0) as be, gateway(be, controller=controller, max_inflight=4) as gw:
        list(pool.map(lambda i: chat(gw.oai, f"request {i}", max_tokens=20), range(6)))
        assert_accounting(gw)
        assert len(be.log) == 6
        assert max_overlap(be.log) == 1


# == 5. routing ====================================================================================
def test_routes_to_the_primary_with_least_outstanding_work() -> None:
    with (
        paced() as a,
        paced() as b,
        gateway(a.config(send_priority=True), b, policy="fcfs", max_inflight=8) as gw,
        ExitStack() as streams,
    ):
        # A long-predicted request first (a tie: the first primary), then short ones. A router by
        # in-flight count would send the third to A (one each); least predicted work sends it
        # and the fourth to B.
        prompts = (LONG[2], SHORT[0], SHORT[0], SHORT[0])
        extra = {"priority": 5}
        backends = [streams.enter_context(held(gw.oai, p, extra_body=extra)) for p in prompts]
        assert [s.response.headers["x-rtlm-backend"] for s in backends] == [a.name] + [b.name] * 3
        assert (len(a.running()), len(b.running())) == (1, 3)
        g = gw.gateway.backends
        assert g[0].outstanding_s > g[1].outstanding_s > 0
        # priority only where configured: A got the controller's, B nothing (not the client's 5).
        assert a.log[0]["priority"] == int(backends[0].response.headers["x-rtlm-priority"])
        assert [e["priority"] for e in b.log] == [0, 0, 0]
        streams.close()
        wait_for(lambda: all(x.inflight == 0 for x in g), what="slots freed")
        assert [x.outstanding_s for x in g] == pytest.approx([0.0, 0.0], abs=1e-9)
        assert assert_accounting(gw).failures["cancelled"] == 4


def test_fcfs_never_offloads_to_the_secondary(pool: ThreadPoolExecutor) -> None:
    with (
        paced() as primary,
        paced() as secondary,
        gateway(
            primary.config(max_inflight=1), secondary.config(role="secondary"), policy="fcfs"
        ) as gw,
    ):
        with held(gw.oai, LONG[1]):
            futures = [pool.submit(chat, gw.oai, p, 2) for p in LONG * 2]
            wait_for(lambda: len(gw.controller) == len(futures), what="a queue")
            time.sleep(0.1)  # the idle secondary has had every chance to take one
            assert secondary.log == []
        assert {f.result().headers["x-rtlm-backend"] for f in futures} == {primary.name}
        assert secondary.log == [] and len(primary.log) == 7
        assert_accounting(gw)


def test_heuristic_offloads_only_long_requests_to_the_secondary(pool: ThreadPoolExecutor) -> None:
    # One policy epoch for the whole test: the offload threshold stays what the first decision
    # set (from the queue it saw: the first held request), so each assignment can be checked.
    controller = AdaptiveController("heuristic", epoch_s=3600.0)
    with (
        paced() as primary,
        paced() as secondary,
        gateway(
            primary.config(max_inflight=1),
            secondary.config(role="secondary", max_inflight=1),
            controller=controller,
        ) as gw,
    ):
        burst = (SHORT + LONG) * 2
        with ExitStack() as holders:
            first = holders.enter_context(held(gw.oai, "What is 2+2?"))
            assert first.response.headers["x-rtlm-backend"] == primary.name
            threshold = controller.knobs.offload_threshold
            assert threshold < float("inf")
            # A long request, with the primary full: offloaded.
            second = holders.enter_context(held(gw.oai, LONG[1]))
            assert second.response.headers["x-rtlm-backend"] == secondary.name
            futures = [pool.submit(chat, gw.oai, p, 20) for p in burst]
            wait_for(lambda: len(gw.controller) == len(burst), what="the burst queued")
        assert controller.knobs.offload_threshold == threshold
        responses = [f.result() for f in futures]
        on: dict[str, list[float]] = {primary.name: [], secondary.name: []}
        for r in responses:
            on[r.headers["x-rtlm-backend"]].append(float(r.headers["x-rtlm-predicted-tokens"]))
        assert on[secondary.name], "the secondary took no offloadable request"
        assert min(on[secondary.name]) >= threshold - 0.5
        assert any(p < threshold for p in on[primary.name])  # short ones existed, and stayed
        assert len(secondary.log) == 1 + len(on[secondary.name])
        assert_accounting(gw)


# == 6. deadlines and shedding =====================================================================
@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf", ""])
def test_malformed_deadline_header_is_a_400_naming_it(value: str) -> None:
    with paced() as be, gateway(be) as gw:
        with pytest.raises(openai.BadRequestError) as info:
            chat(gw.oai, extra_headers={DEADLINE_HEADER: value})
        assert info.value.status_code == 400
        assert info.value.body["param"] == DEADLINE_HEADER
        assert DEADLINE_HEADER in info.value.body["message"]
        assert gw.controller.stats().submitted == 0 and be.log == []


def test_shed_rejects_a_deadline_the_backlog_cannot_meet(pool: ThreadPoolExecutor) -> None:
    with paced() as be, gateway(be, shed=True, max_inflight=1) as gw:
        with held(gw.oai):
            backlog = [pool.submit(chat, gw.oai, p, 2) for p in SHORT]
            wait_for(lambda: len(gw.controller) == 2, what="a backlog")
            with pytest.raises(openai.InternalServerError) as info:
                chat(gw.oai, extra_headers={DEADLINE_HEADER: "1"})
            assert info.value.status_code == 503
            assert int(info.value.response.headers["retry-after"]) >= 1
            assert set(info.value.body) == {"message", "type", "param", "code"}
            assert "deadline" in info.value.body["message"]
            # A deadline the prediction can meet is queued as usual.
            patient = pool.submit(chat, gw.oai, extra_headers={DEADLINE_HEADER: "600000"})
            wait_for(lambda: len(gw.controller) == 3, what="the patient request queued")
        assert patient.result().parse().usage.completion_tokens == 3
        assert all(f.result().parse().usage.completion_tokens == 2 for f in backlog)
        stats = assert_accounting(gw)
        assert stats.failures["rejected"] == 1
        assert gw.metric("rtlm_requests_total", outcome="failed", reason="rejected") == 1
        assert len(be.log) == 4  # the shed request never went upstream


def test_without_shed_a_missed_deadline_is_served_and_counted() -> None:
    with paced() as be, gateway(be, shed=False) as gw:
        assert chat(gw.oai, extra_headers={DEADLINE_HEADER: "1"}).parse().usage.completion_tokens
        assert chat(gw.oai, extra_headers={DEADLINE_HEADER: "60000"}).status_code == 200
        assert assert_accounting(gw).finished == 2
        assert gw.metric("rtlm_deadline_misses_total") == 1


# == 7. failures ===================================================================================
def test_queue_full_is_a_429_with_retry_after(pool: ThreadPoolExecutor) -> None:
    with paced() as be, gateway(be, max_inflight=1, max_queue=1) as gw:
        with held(gw.oai):
            queued = pool.submit(chat, gw.oai)
            wait_for(lambda: len(gw.controller) == 1, what="one queued")
            with pytest.raises(openai.RateLimitError) as info:
                chat(gw.oai)
            assert info.value.status_code == 429
            assert int(info.value.response.headers["retry-after"]) >= 1
            assert info.value.body["type"] == "rate_limit_error"
        assert queued.result().status_code == 200
        stats = assert_accounting(gw)
        assert stats.failures["rejected"] == 1 and stats.finished == 1
        assert len(be.log) == 2


@pytest.mark.parametrize("mode", ["status", "drop"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_backend_is_retried_on_the_other(mode: str, stream: bool) -> None:
    with paced() as a, paced() as b, gateway(a, b) as gw:
        a.fault(mode)
        if stream:
            s = gw.oai.chat.completions.create(
                model="m", messages=user("retry me"), max_tokens=4, stream=True
            )
            assert s.response.headers["x-rtlm-backend"] == b.name
            assert "".join(c.choices[0].delta.content for c in s) == "alpha bravo charlie delta "
        else:
            raw = chat(gw.oai, "retry me", max_tokens=4)
            assert raw.headers["x-rtlm-backend"] == b.name
            assert raw.parse().usage.completion_tokens == 4
        assert [e["outcome"] for e in a.log] == [f"fault:{mode}"]
        assert [e["outcome"] for e in b.log] == ["completed"]
        assert gw.metric("rtlm_retries_total", backend=a.name) == 1
        assert gw.metric("rtlm_retries_total", backend=b.name) == 0
        stats = assert_accounting(gw)
        assert (stats.finished, stats.failed) == (1, 0)


def test_hung_backend_times_out_and_is_retried() -> None:
    with paced() as a, paced() as b, gateway(a, b, request_timeout_s=0.3) as gw:
        a.fault("hang")
        raw = chat(gw.oai, "wait for it", max_tokens=4)
        assert raw.headers["x-rtlm-backend"] == b.name
        assert gw.metric("rtlm_retries_total", backend=a.name) == 1
        wait_for(lambda: a.log[0]["finished_at"] is not None, what="the hung request aborted")
        assert assert_accounting(gw).finished == 1


@pytest.mark.parametrize("stream", [False, True])
def test_one_backend_failing_is_a_502_in_openai_format(stream: bool) -> None:
    with paced() as be, gateway(be) as gw:
        be.fault("status")
        with pytest.raises(openai.InternalServerError) as info:
            chat(gw.oai, stream=stream)
        assert info.value.status_code == 502
        body = info.value.body
        assert set(body) == {"message", "type", "param", "code"}
        assert body["code"] == 502 and body["type"] == "upstream_error"
        assert "executor_failure" in body["message"]
        stats = gw.controller.stats()
        assert stats.balanced and stats.failures["executor_failure"] == 1
        assert gw.metric("rtlm_requests_total", outcome="failed", reason="executor_failure") == 1


def test_exhausted_retry_frees_the_slot_exactly_once(pool: ThreadPoolExecutor) -> None:
    with paced(tokens_per_s=1000.0) as be, gateway(be, max_inflight=1) as gw:
        be.fault("status")
        with pytest.raises(openai.InternalServerError):
            chat(gw.oai)
        assert gw.gateway.backends[0].inflight == 0
        # Still one request at a time afterwards.
        list(pool.map(lambda i: chat(gw.oai, f"after {i}", max_tokens=20), range(3)))
        assert max_overlap([e for e in be.log if e["outcome"] == "completed"]) == 1
        assert assert_accounting(gw).finished == 3


def test_midstream_drop_ends_the_stream_with_an_error_event() -> None:
    with paced() as be, gateway(be) as gw:
        be.fault("midstream")
        body = {"model": "m", "messages": user("cut me off"), "max_tokens": 10, "stream": True}
        with httpx.stream("POST", gw.url + CHAT, json=body) as r:
            assert r.status_code == 200
            data = sse_data(r)
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"].startswith("executor_failure")
        content = [json.loads(d) for d in data[:-2]]
        assert content and all("choices" in c for c in content)  # what came before is intact

        # The openai client surfaces it as an APIError after the chunks that came through.
        be.fault("midstream")
        stream = gw.oai.chat.completions.create(
            model="m", messages=user("cut me off"), max_tokens=10, stream=True
        )
        got = []
        with pytest.raises(openai.APIError, match="executor_failure"):
            for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        assert got == [token_text(i) for i in range(len(got))] and got

        # the backend logs the cut a loop turn after the gateway relayed it (flaky under load)
        wait_for(
            lambda: [e["outcome"] for e in be.log] == ["fault:midstream"] * 2,
            what="both cuts in the backend's log",
        )
        stats = assert_accounting(gw)
        assert stats.failures["executor_failure"] == 2 and stats.finished == 0


def test_unhealthy_backend_leaves_rotation_and_comes_back() -> None:
    with paced() as a, paced() as b, gateway(a, b, health_interval_s=0.1) as gw:
        assert chat(gw.oai).headers["x-rtlm-backend"] == a.name  # a tie goes to the first
        a.set_healthy(False)
        wait_for(lambda: not gw.gateway.backends[0].healthy, what="A out of rotation")
        assert httpx.get(gw.url + "/health").json()["backends"] == {a.name: False, b.name: True}
        assert gw.metric("rtlm_backend_healthy", backend=a.name) == 0
        assert [chat(gw.oai).headers["x-rtlm-backend"] for _ in range(3)] == [b.name] * 3

        b.set_healthy(False)
        wait_for(lambda: not gw.gateway.backends[1].healthy, what="B out of rotation")
        health = httpx.get(gw.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"

        a.set_healthy(True)
        b.set_healthy(True)
        wait_for(lambda: all(x.healthy for x in gw.gateway.backends), what="both back")
        assert chat(gw.oai).headers["x-rtlm-backend"] == a.name
        assert [e["outcome"] for e in a.log] == ["completed", "completed"]
        assert assert_accounting(gw).finished == 5


def test_refused_backend_is_out_of_rotation_until_it_answers() -> None:
    port = free_port()  # nothing listens there yet: connections are refused
    down = BackendConfig(f"http://127.0.0.1:{port}")
    with paced() as b, gateway(down, b, health_interval_s=0.1) as gw:
        assert httpx.get(gw.url + "/health").json()["backends"][down.name] is False
        assert [chat(gw.oai).headers["x-rtlm-backend"] for _ in range(3)] == [b.name] * 3
        with paced(port=port) as a:
            wait_for(lambda: gw.gateway.backends[0].healthy, what="the new server taken in")
            assert chat(gw.oai).headers["x-rtlm-backend"] == a.name
            assert len(a.log) == 1
        assert assert_accounting(gw).finished == 4


def test_connection_refused_mid_use_is_retried_and_marks_the_backend_down() -> None:
    with paced() as a, paced() as b, gateway(a, b, health_interval_s=60.0) as gw:
        a.server.stop()  # the gateway still believes A is up: no health check for a minute
        raw = chat(gw.oai, max_tokens=2)
        assert raw.headers["x-rtlm-backend"] == b.name
        assert gw.metric("rtlm_retries_total", backend=a.name) == 1
        assert gw.gateway.backends[0].healthy is False
        assert chat(gw.oai).headers["x-rtlm-backend"] == b.name  # not tried again
        assert gw.metric("rtlm_retries_total") == 1
        assert assert_accounting(gw).finished == 2


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_while_queued_is_cancelled_and_never_sent(stream: bool) -> None:
    with paced() as be, gateway(be, max_inflight=1) as gw:
        impatient = gw.client(timeout=0.3)
        with held(gw.oai):
            with pytest.raises(openai.APITimeoutError):
                if stream:
                    impatient.chat.completions.create(
                        model="m", messages=user("queued"), max_tokens=2, stream=True
                    )
                else:
                    chat(impatient, "queued", max_tokens=2)
            wait_for(
                lambda: gw.metric("rtlm_requests_total", outcome="failed", reason="cancelled") == 1,
                what="counted cancelled",
            )
            assert gw.controller.stats().failures["cancelled"] == 1
            assert len(gw.controller) == 0
        assert chat(gw.oai, "after").status_code == 200
        # The backend saw the held stream and the last request: never the one that left.
        assert [e["max_tokens"] for e in be.log] == [HOLD, 3]
        stats = assert_accounting(gw)
        assert stats.failures["cancelled"] == 2 and stats.finished == 1  # + the held stream


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_mid_request_aborts_it_upstream(stream: bool) -> None:
    with paced() as be, gateway(be) as gw:
        if stream:
            s = gw.oai.chat.completions.create(
                model="m", messages=user("long"), max_tokens=HOLD, stream=True
            )
            chunks = iter(s)
            assert [next(chunks).choices[0].delta.content for _ in range(3)] == [
                token_text(i) for i in range(3)
            ]
            s.close()
        else:
            with pytest.raises(openai.APITimeoutError):
                chat(gw.client(timeout=0.3), "long", max_tokens=HOLD)
        wait_for(lambda: be.log[0]["outcome"] is not None, what="the backend saw it leave")
        assert be.log[0]["outcome"] == "aborted"
        assert be.log[0]["finished_at"] - be.log[0]["started_at"] < 2.0  # 5 s if left to run
        stats = assert_accounting(gw)
        assert stats.failures["cancelled"] == 1 and stats.finished == 0


def test_a_pump_between_submit_and_admit_loses_nothing(pool: ThreadPoolExecutor) -> None:
    # A request is assignable from controller.submit() on. If the dispatcher learnt of it only
    # in admit(), a loop turn later, a pump() in between (a request ending, a backend back in
    # rotation) would get it from next_batch() unregistered: KeyError, and an orphan request.
    with paced() as be, gateway(be, policy="sjf", health_interval_s=60.0) as gw:
        g = gw.gateway
        g.backends[0].healthy = False  # as a failed health check leaves it
        waiting = pool.submit(chat, gw.oai, LONG[2], 2)
        wait_for(lambda: g.dispatcher.waiting == 1, what="a request waiting for a backend")
        submit = g._submit

        def submit_then_back_in_rotation(*args: Any) -> Any:
            # The health loop's round (backend healthy again, then pump()) landing right after
            # this arrival, before the request's own coroutine has run.
            ticket = submit(*args)

            def health_round() -> None:
                g.backends[0].healthy = True
                g.dispatcher.pump()

            asyncio.get_running_loop().call_soon(health_round)
            return ticket

        g._submit = submit_then_back_in_rotation
        short = chat(gw.client(timeout=1.5), SHORT[0], 2)  # sjf: it goes first
        assert short.status_code == waiting.result().status_code == 200
        assert [e["headers"]["x-request-id"] for e in be.log][0] == short.headers["x-request-id"]
        assert assert_accounting(gw).finished == 2


# == 8. bad input ==================================================================================
@pytest.fixture(scope="module")
def bad_input_gateway() -> Iterator[tuple[Gw, Paced]]:
    with paced() as be, gateway(be, max_body_bytes=2000) as gw:
        yield gw, be


def bad(name: str, path: str, body: Any, param: str | None) -> Any:
    return pytest.param(path, body, param, id=name)


BAD = [
    bad("bad json", CHAT, b'{"messages": [', None),
    bad("not an object", CHAT, b"[1, 2]", None),
    bad("missing messages", CHAT, {"model": "m"}, "messages"),
    bad("messages not a list", CHAT, {"messages": "hi"}, "messages"),
    bad("empty messages", CHAT, {"messages": []}, "messages"),
    bad("message without role", CHAT, {"messages": [{"content": "x"}]}, "messages.0.role"),
    bad("max_tokens a string", CHAT, {"messages": user("x"), "max_tokens": "5"}, "max_tokens"),
    bad("max_tokens zero", CHAT, {"messages": user("x"), "max_tokens": 0}, "max_tokens"),
    bad("stream a string", CHAT, {"messages": user("x"), "stream": "yes"}, "stream"),
    bad(
        "include_usage a string",
        CHAT,
        {"messages": user("x"), "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
    ),
    bad("missing prompt", COMPLETIONS, {"model": "m"}, "prompt"),
    bad(
        "prompt a number",
        COMPLETIONS,
        {"prompt": 5},
        "prompt",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_input_is_a_400_in_openai_format(
    bad_input_gateway: tuple[Gw, Paced], path: str, body: Any, param: str | None
) -> None:
    gw, be = bad_input_gateway
    before = gw.metric("rtlm_invalid_requests_total", status="400")
    if isinstance(body, bytes):
        r = httpx.post(gw.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(gw.url + path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]
    assert gw.metric("rtlm_invalid_requests_total", status="400") == before + 1
    assert gw.controller.stats().submitted == 0 and be.log == []


def test_bad_input_through_the_openai_client(bad_input_gateway: tuple[Gw, Paced]) -> None:
    gw, be = bad_input_gateway
    with pytest.raises(openai.BadRequestError) as info:
        gw.oai.chat.completions.create(model="m", messages=user("x"), max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    assert gw.controller.stats().submitted == 0 and be.log == []


def test_body_over_the_limit_is_a_413(bad_input_gateway: tuple[Gw, Paced]) -> None:
    gw, be = bad_input_gateway
    before = gw.metric("rtlm_invalid_requests_total", status="413")
    r = httpx.post(gw.url + CHAT, json={"messages": user("word " * 1000)})
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert gw.metric("rtlm_invalid_requests_total", status="413") == before + 1
    assert gw.controller.stats().submitted == 0 and be.log == []


def test_chunked_body_over_the_limit_is_a_413(bad_input_gateway: tuple[Gw, Paced]) -> None:
    gw, be = bad_input_gateway
    payload = json.dumps({"messages": user("word " * 1000)}).encode()

    def chunks() -> Iterator[bytes]:  # no content-length: the limit must count the bytes
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    r = httpx.post(gw.url + CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert gw.controller.stats().submitted == 0 and be.log == []


def test_non_utf8_body_is_a_400_in_openai_format(bad_input_gateway: tuple[Gw, Paced]) -> None:
    gw, _ = bad_input_gateway
    r = httpx.post(
        gw.url + CHAT,
        content=b'{"messages": "\xf3\xcd"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert set(r.json()) == {"error"}


# == 9. accounting =================================================================================
def test_mixed_outcomes_balance_in_stats_and_metrics(pool: ThreadPoolExecutor) -> None:
    with paced() as be, gateway(be, max_inflight=1, max_queue=2, shed=True) as gw:
        for i in range(3):  # completed: non-stream and stream
            chat(gw.oai, f"fine {i}")
        list(gw.oai.completions.create(model="m", prompt="fine", max_tokens=3, stream=True))
        be.fault("midstream")  # executor_failure
        with pytest.raises(openai.APIError):
            list(
                gw.oai.chat.completions.create(
                    model="m", messages=user("x"), max_tokens=9, stream=True
                )
            )
        with pytest.raises(openai.BadRequestError):  # invalid: not counted as a request
            chat(gw.oai, max_tokens=0)
        impatient = gw.client(timeout=0.3)
        with held(gw.oai):  # cancelled (this one too, when it closes)
            queued = pool.submit(chat, gw.oai, "queued")
            with pytest.raises(openai.APITimeoutError):  # cancelled while queued
                chat(impatient, "impatient")
            wait_for(lambda: len(gw.controller) == 1, what="one left in the queue")
            with pytest.raises(openai.InternalServerError):  # rejected: shed
                chat(gw.oai, extra_headers={DEADLINE_HEADER: "1"})
            also = pool.submit(chat, gw.oai, "also queued")
            wait_for(lambda: len(gw.controller) == 2, what="a full queue")
            with pytest.raises(openai.RateLimitError):  # rejected: queue full
                chat(gw.oai)
        assert queued.result().status_code == also.result().status_code == 200
        stats = assert_accounting(gw)
        assert stats.submitted == 11
        assert stats.finished == 6
        assert stats.failures == {
            "rejected": 2,
            "timed_out": 0,
            "executor_failure": 1,
            "cancelled": 2,
            "shutdown": 0,
        }
        assert gw.metric("rtlm_invalid_requests_total", status="400") == 1


def test_failure_reasons_travel_typed_and_the_wire_is_unchanged(monkeypatch) -> None:
    """Each failure's FailureReason goes from where it happened to the controller and the
    metrics as a value: nothing parses "<reason>: <detail>" text back (a parse fails the test),
    while clients still read that text."""

    def no_parsing(cls: Any, error: str) -> Any:
        raise AssertionError(f"a failure reason was parsed back out of {error!r}")

    monkeypatch.setattr(FailureReason, "of_error", classmethod(no_parsing))
    with paced() as be, gateway(be, max_inflight=1, request_timeout_s=0.5) as gw:
        be.fault("status")
        with pytest.raises(openai.InternalServerError, match=f"executor_failure: {be.name} answ"):
            chat(gw.oai)
        be.fault("midstream")
        with pytest.raises(openai.APIError, match=f"executor_failure: {be.name}: "):
            list(gw.oai.chat.completions.create(model="m", messages=user("x"), stream=True))
        be.fault("hang")
        with pytest.raises(openai.APIStatusError, match=f"timed_out: {be.name}: ") as info:
            chat(gw.oai)
        assert info.value.status_code == 504
        with held(gw.oai):  # cancelled when it closes
            with pytest.raises(openai.APITimeoutError):  # cancelled while queued
                chat(gw.client(timeout=0.3), "impatient")
        stats = assert_accounting(gw)
        assert stats.failures == {
            "rejected": 0,
            "timed_out": 1,
            "executor_failure": 2,
            "cancelled": 2,
            "shutdown": 0,
        }


# == 10. state =====================================================================================
def test_learned_state_survives_a_restart(tmp_path: Any) -> None:
    state = tmp_path / "s.bin"
    prompt = "Write a story about a dragon."
    with paced(tokens_per_s=5000.0) as be:
        settings = {"policy": "sjf", "state": str(state), "state_every": 5}
        with gateway(be, **settings) as gw:
            fresh = predicted_length(gw.controller, prompt)
            for _ in range(5):
                chat(gw.oai, prompt, max_tokens=4)
            wait_for(state.exists, what="the autosave after 5 requests")
            autosaved = AdaptiveController.load(state).stats()
            assert autosaved.finished == 5
            for _ in range(7):
                chat(gw.oai, prompt, max_tokens=4)
            learned = predicted_length(gw.controller, prompt)
            before = gw.controller.stats()
        assert learned < 0.8 * fresh
        # The shutdown saved the state; a new gateway with the same settings resumes it.
        with gateway(be, **settings) as gw:
            assert gw.controller.policy.name == "sjf"
            after = gw.controller.stats()
            assert (after.submitted, after.finished, after.failed) == (
                before.submitted,
                before.finished,
                before.failed,
            )
            assert predicted_length(gw.controller, prompt) == pytest.approx(learned)
            raw = chat(gw.oai, prompt, max_tokens=4)
            assert float(raw.headers["x-rtlm-predicted-tokens"]) == pytest.approx(learned, abs=0.5)
            assert gw.controller.stats().finished == before.finished + 1
            assert gw.controller.stats().balanced


def test_a_state_learned_on_another_tier_is_refused_by_name(tmp_path: Any) -> None:
    state = tmp_path / "s.bin"
    with paced(tokens_per_s=5000.0) as be:
        with gateway(be, state=str(state)) as gw:
            chat(gw.oai, "hello", max_tokens=2)
        assert state.exists()
        with pytest.raises(ValueError, match="learned with the lexical tier, not encoder"):
            create_app(GatewayConfig(backends=(be.config(),), state=str(state), tier="encoder"))


def test_the_encoder_tier_predicts_from_the_prompt_embedding() -> None:
    pytest.importorskip("torch")
    prompts = ["Write a 2000-word essay on the history of Rome.", "Say yes or no: is 7 prime?"]
    expected = {}
    for tier in ("lexical", "encoder"):
        fresh = AdaptiveController("heuristic", predictor=LengthPredictor.pretrained(tier))
        for i, prompt in enumerate(prompts):
            fresh.submit(Request(f"{tier}{i}", prompt, arrival_time=0.0))
            expected[tier, prompt] = fresh.entry(f"{tier}{i}").prediction.length
    assert all(abs(expected["lexical", p] - expected["encoder", p]) > 1.0 for p in prompts)
    with paced(tokens_per_s=5000.0) as be, gateway(be, tier="encoder") as gw:
        assert gw.controller.predictor.featurizer.encoder is not None  # loaded at start-up
        # the first request meets the untouched encoder-tier prior
        got = float(chat(gw.oai, prompts[0], max_tokens=2).headers["x-rtlm-predicted-tokens"])
        assert got == pytest.approx(expected["encoder", prompts[0]], abs=0.5)
        stream = gw.oai.chat.completions.create(
            model="m", messages=user(prompts[1]), max_tokens=3, stream=True
        )
        assert sum(1 for _ in stream) >= 3  # streamed through while embedding on a thread
        assert gw.controller.predictor.tier == "encoder"
        assert assert_accounting(gw).finished == 2


# == 11. command line ==============================================================================
def parse(*argv: str) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_cli_flags() -> None:
    cfg = parse(
        "--backend",
        "http://10.0.0.1:8000",
        "--backend",
        "http://10.0.0.2:8000/v1",
        "--secondary",
        "http://10.0.0.3:8000",
        "--policy",
        "sjf",
        "--max-inflight",
        "3",
        "--max-queue",
        "7",
        "--shed",
        "--state",
        "s.bin",
        "--port",
        "9001",
        "--request-timeout",
        "12.5",
        "--profile",
        "vllm-cpu-smollm2-135m",
        "--tier",
        "encoder:smollm2-l16",
    )
    assert [(b.url, b.role) for b in cfg.backends] == [
        ("http://10.0.0.1:8000", "primary"),
        ("http://10.0.0.2:8000", "primary"),  # /v1 stripped
        ("http://10.0.0.3:8000", "secondary"),
    ]
    assert not any(b.send_priority for b in cfg.backends)
    assert (cfg.policy, cfg.max_inflight, cfg.max_queue) == ("sjf", 3, 7)
    assert (cfg.shed, cfg.state, cfg.port, cfg.request_timeout_s) == (True, "s.bin", 9001, 12.5)
    assert (cfg.profile, cfg.tier) == ("vllm-cpu-smollm2-135m", "encoder:smollm2-l16")
    with pytest.raises(ValueError, match="tier must be lexical, encoder or encoder:NAME"):
        parse("--backend", "http://h:1", "--tier", "bert")
    with pytest.raises(ValueError, match="unknown encoder 'bert'"):
        parse("--backend", "http://h:1", "--tier", "encoder:bert")
    defaults = parse("--backend", "http://h:1")
    assert (defaults.policy, defaults.shed, defaults.max_inflight) == ("heuristic", False, 4)
    assert (defaults.profile, defaults.tier) == ("http-engine-prior", "lexical")
    assert all(
        b.send_priority for b in parse("--backend", "http://h:1", "--send-priority").backends
    )


def test_cli_config_file_with_flags_overriding(tmp_path: Any) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        'policy = "fcfs"\nmax_inflight = 2\nshed = true\nmax_queue = 50\n'
        '[[backends]]\nurl = "http://10.0.0.1:8000"\nsend_priority = true\n'
        '[[backends]]\nurl = "http://10.0.0.9:8000"\nrole = "secondary"\nmax_inflight = 1\n'
    )
    from_file = parse("--config", str(path))
    assert (from_file.policy, from_file.max_inflight, from_file.shed) == ("fcfs", 2, True)
    assert [(b.role, b.send_priority, b.max_inflight) for b in from_file.backends] == [
        ("primary", True, None),
        ("secondary", False, 1),
    ]
    cfg = parse(
        "--config", str(path), "--policy", "sjf", "--max-queue", "9", "--backend", "http://h:1"
    )
    assert (cfg.policy, cfg.max_queue) == ("sjf", 9)  # flags win
    assert (cfg.max_inflight, cfg.shed) == (2, True)  # the rest from the file
    assert [b.url for b in cfg.backends] == [
        "http://10.0.0.1:8000",
        "http://10.0.0.9:8000",
        "http://h:1",
    ]
    both = parse("--config", str(path), "--send-priority")
    assert all(b.send_priority for b in both.backends)
    assert [b.max_inflight for b in both.backends] == [None, 1]  # kept


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('polcy = "fcfs"\n[[backends]]\nurl = "http://h:1"\n', "polcy"),
        ('[[backends]]\nurl = "http://h:1"\nweight = 2\n', "weight"),
        ('[[backends]]\nurl = "h:1"\n', "http://"),
        ('[[backends]]\nurl = "http://h:1"\nrole = "tertiary"\n', "role"),
        ('policy = "fcfs"\n', "primary"),
        ("policy = \n", "not valid TOML"),
    ],
)
def test_cli_config_file_errors_are_clear(tmp_path: Any, text: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse("--config", str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'polcy = "fcfs"\n[[backends]]\nurl = "http://h:1"\n',
            "unknown gateway setting(s) ['polcy']",
        ),
        ('max_inflight = "4"\n[[backends]]\nurl = "http://h:1"\n', "max_inflight must be an int"),
    ],
)
def test_cli_main_reports_config_errors(
    tmp_path: Any, capsys: Any, text: str, message: str
) -> None:
    from rtlm_adapt.cli import main

    path = tmp_path / "gateway.toml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2  # and no server started
    assert message in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_cli_serve_subcommand_parses() -> None:
    from rtlm_adapt.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--backend", "http://h:1", "--secondary", "http://h:2", "--policy", "fcfs"]
    )
    cfg = config_from_args(args)
    assert [b.role for b in cfg.backends] == ["primary", "secondary"]
    assert cfg.policy == "fcfs"
    with pytest.raises(ValueError, match="primary"):
        config_from_args(build_parser().parse_args(["serve", "--secondary", "http://h:2"]))
