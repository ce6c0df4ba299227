"""Ray Serve scale-out: 2 engine replicas behind LengthAwareRouter, on the CI machine's 2 cores.

One Ray session for the module (about 10 s to start). The checks reason from where requests
actually ran (each answer names its replica), so they fail if Serve's default router were used.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from rtlm_adapt.integrations.ray_serve import (  # noqa: E402
    ScaleOutSettings,
    build_app,
    engine_app,
)

APP = "rtlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """Ray with 2 CPUs, temp dirs for its files, Serve on a free port; torn down at the end."""
    scratch = Path(tempfile.mkdtemp(prefix="rtlm-ray-"))
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "HOME")}
    os.environ["RAY_TMPDIR"] = str(scratch / "tmp")
    os.environ["HOME"] = str(scratch / "home")
    for k in ("RAY_TMPDIR", "HOME"):
        Path(os.environ[k]).mkdir(parents=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield {"url": f"http://127.0.0.1:{port}", "scratch": scratch}
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: One long replica; offload_threshold 1 token makes every HTTP request offload-eligible.
SETTINGS = {
    "engine_replicas": 2,
    "slots": 1,
    "tokens_per_s": 1000.0,
    "long_replicas": 1,
    "offload_threshold": 1.0,
    "pull_every_s": 0.2,
    "routing_stats_period_s": 0.5,
    "engine_cpus": 0.25,
    "ingress_cpus": 0.25,
}


@pytest.fixture(scope="module")
def engine(cluster) -> serve.handle.DeploymentHandle:
    """The application (ingress, 2 engines, learner), deployed once; the engines' handle."""
    settings = {**SETTINGS, "learner_state_dir": str(cluster["scratch"] / "learner")}
    serve.run(build_app(settings), name=APP, route_prefix="/")
    return serve.get_deployment_handle("Engine", app_name=APP)


async def _generate(engine, n, *, tokens, predicted, offload=False):
    calls = [
        engine.generate.remote(
            {"max_tokens": tokens},
            rtlm_predicted_tokens=predicted,
            rtlm_priority=0,
            rtlm_offload=offload,
        )
        for _ in range(n)
    ]
    return [await c for c in calls]


def test_short_requests_go_where_the_predicted_work_is_least_not_the_count(engine):
    # Requests that are not offload-eligible rank every replica by predicted work.

    async def scenario():
        # One replica gets one long request, the other two short ones (by predicted work).
        heavy = engine.generate.remote(
            {"max_tokens": 800}, rtlm_predicted_tokens=4000.0, rtlm_priority=0
        )
        await asyncio.sleep(0.05)
        mediums = [
            engine.generate.remote(
                {"max_tokens": 100}, rtlm_predicted_tokens=100.0, rtlm_priority=0
            )
            for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        shorts = await _generate(engine, 4, tokens=10, predicted=10.0)
        return await heavy, [await m for m in mediums], shorts

    heavy, mediums, shorts = asyncio.run(scenario())
    assert {m["replica"] for m in mediums} != {heavy["replica"]}
    # Counting requests (Serve's power of two) sends the shorts to the heavy request's replica
    # (1 request < 2); counting predicted work sends them to the other (200 tokens < 4000).
    assert heavy["replica"] not in {s["replica"] for s in shorts}


def test_offload_eligible_requests_go_to_the_long_group_and_the_rest_shun_its_backlog(engine):

    async def scenario():
        longs = [
            engine.generate.remote(
                {"max_tokens": 150}, rtlm_predicted_tokens=900.0, rtlm_priority=0, rtlm_offload=True
            )
            for _ in range(8)
        ]
        await asyncio.sleep(0.05)  # routed: 7,200 predicted tokens wait on the long replica
        shorts = await _generate(engine, 4, tokens=5, predicted=20.0)
        return [await c for c in longs], shorts

    longs, shorts = asyncio.run(scenario())
    long_replicas = Counter(r["replica"] for r in longs)
    short_replicas = Counter(r["replica"] for r in shorts)
    assert len(long_replicas) == 1 and len(short_replicas) == 1, (long_replicas, short_replicas)
    (long_id,), (short_id,) = long_replicas, short_replicas
    # The long group is the last replica in id order, the same in every caller's router.
    assert short_id < long_id


def test_the_http_ingress_predicts_routes_and_teaches_the_shared_learner(cluster, engine):
    learner = ray.get_actor("rtlm-learner", namespace="rtlm")
    before = ray.get(learner.learned.remote())
    prompts = ["Name one prime.", "Write a long story about the sea.", "Why is the sky blue?"]
    with httpx.Client(base_url=cluster["url"], timeout=30) as client:
        replies = [
            client.post("/v1/completions", json={"prompt": p, "max_tokens": 7}) for p in prompts
        ]
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        bad = client.post("/v1/completions", json={"max_tokens": 3})
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 7
        assert reply.headers["x-rtlm-offload"] == "true"  # threshold 1 token: all are long
        assert float(reply.headers["x-rtlm-predicted-tokens"]) > 0
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
    # Every offloaded request ran on the one long replica.
    assert len({r.headers["x-rtlm-replica"] for r in replies}) == 1
    _wait_for(lambda: ray.get(learner.learned.remote()) >= before + 4)


def test_a_restarted_learner_keeps_what_it_learned(cluster, engine):
    learner = ray.get_actor("rtlm-learner", namespace="rtlm")
    with httpx.Client(base_url=cluster["url"], timeout=30) as client:
        assert client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).is_success
    _wait_for(lambda: ray.get(learner.learned.remote()) >= 1)
    before = ray.get(learner.info.remote())
    ray.kill(learner, no_restart=False)  # the actor process dies; Ray starts a new one
    _wait_for(lambda: ray.get(learner.info.remote())["pid"] != before["pid"], timeout=30)
    # The new process read the snapshot and replayed the journal.
    assert ray.get(learner.info.remote())["learned"] == before["learned"]


def test_an_engine_replica_killed_mid_run_loses_no_request(cluster, engine):
    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#Engine")
    ]
    assert len(replicas) == 2

    async def run():
        async with httpx.AsyncClient(base_url=cluster["url"], timeout=60) as client:
            calls = [
                asyncio.ensure_future(
                    client.post("/v1/completions", json={"prompt": f"Tell {i}", "max_tokens": 300})
                )
                for i in range(6)
            ]
            await asyncio.sleep(0.5)  # some run, the rest queue on the long replica
            # The long replica (last in id order): every HTTP request goes there.
            ray.kill(ray.get_actor(max(replicas), namespace="serve"), no_restart=True)
            return await asyncio.gather(*calls)

    replies = asyncio.run(run())
    outcomes = Counter(
        "completed" if r.status_code == 200 else r.json()["error"]["message"].split(":")[0]
        for r in replies
    )
    # Each request ends: answered (retried on the other replica) or failed with a reason.
    assert sum(outcomes.values()) == 6 and set(outcomes) <= {"completed", "executor_failure"}
    assert outcomes["completed"] >= 1, outcomes


def test_fcfs_engines_of_unequal_speed_serve_arrivals_in_order_each_at_its_own_speed(cluster):
    # The default stack's engines (fcfs) behind Serve's own router, one replica at half speed.
    settings = ScaleOutSettings(
        engine_replicas=2,
        slots=1,
        tokens_per_s=1000.0,
        router="power-of-two",
        queue_order="fcfs",
        replica_speed_factors=(1.0, 0.5),
        engine_cpus=0.25,
    )
    serve.run(engine_app(settings), name="fcfs", route_prefix=None)
    handle = serve.get_deployment_handle("Engine", app_name="fcfs")

    async def scenario():
        done: list[tuple[int, dict]] = []

        async def one(i: int) -> None:
            # Later arrivals get better (lower) priorities: a priority queue would reverse them.
            answer = await handle.generate.remote(
                {"max_tokens": 150}, rtlm_predicted_tokens=150.0, rtlm_priority=100 - i
            )
            done.append((i, answer))

        calls = []
        for i in range(6):
            calls.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(0.05)  # well apart, so they reach the replicas in this order
        await asyncio.gather(*calls)
        return done

    try:
        done = asyncio.run(scenario())
    finally:
        serve.delete("fcfs")
    speeds = {a["replica"]: a["tokens_per_s"] for _, a in done}
    assert sorted(set(speeds.values())) == [500.0, 1000.0], speeds
    for _, answer in done:  # each paced at its own replica's speed
        assert answer["service_s"] == pytest.approx(150 / answer["tokens_per_s"], rel=0.5)
    for replica in speeds:  # on each replica, finished in the order sent
        sent = [i for i, a in done if a["replica"] == replica]
        assert sent == sorted(sent), (replica, sent)


def _wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_settings_take_a_yaml_list_of_speed_factors_and_reject_bad_engine_options():
    settings = ScaleOutSettings.from_args({"replica_speed_factors": [1, 0.5]})
    assert settings.replica_speed_factors == (1, 0.5)
    with pytest.raises(ValueError, match="queue_order"):
        ScaleOutSettings(queue_order="lifo")
    with pytest.raises(ValueError, match="replica_speed_factors"):
        ScaleOutSettings(replica_speed_factors=(1.0, 0.0))
