"""PPOPolicy: a tiny trained model loads, runs inside the CLI, and the guard falls back."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from rtlm_adapt.knobs import Knobs  # noqa: E402
from rtlm_adapt.observation import Observation  # noqa: E402
from rtlm_adapt.policies import make_policy  # noqa: E402
from rtlm_adapt.policies.heuristic import RTLMHeuristic  # noqa: E402
from rtlm_adapt.policies.mlp_actor import MLPActor  # noqa: E402
from rtlm_adapt.policies.ppo import PPOPolicy  # noqa: E402
from rtlm_adapt.policies.ppo_online import PerformanceGuard  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from stable_baselines3 import PPO

    from rtlm_adapt.envs import ServingEnv

    torch.set_num_threads(1)
    model = PPO("MlpPolicy", ServingEnv(n_requests=20, load=0.9), n_steps=128, batch_size=64,
                n_epochs=2, seed=0, device="cpu")
    model.learn(256)
    path = tmp_path_factory.mktemp("ppo") / "model.zip"
    model.save(path)
    return path, model


def _obs(queue: int, now: float) -> Observation:
    return Observation(
        now=now, queue_length=queue, primary_running=8, primary_max_batch=16,
        secondary_running=0, secondary_max_batch=4, pred_len_mean=300.0, pred_len_p90=700.0,
        uncertainty_mean=0.4, oldest_wait_s=20.0, min_slack_s=10.0, arrival_rate=0.05,
        service_time_s=35.0, load=0.9, recent_response_s=100.0, recent_miss_rate=0.3,
        step_time_s=0.4,
    )


def test_load_matches_sb3_predict(tiny_model):
    path, model = tiny_model
    policy = make_policy(f"ppo:{path}")
    assert isinstance(policy, PPOPolicy)
    rng = np.random.default_rng(0)
    for obs in rng.uniform(0.0, 1.0, size=(20, 11)).astype(np.float32):
        expected, _ = model.predict(obs, deterministic=True)
        np.testing.assert_allclose(policy.actor(obs), expected, atol=1e-5)
    knobs = policy.decide(_obs(10, 5.0))
    assert isinstance(knobs, Knobs) and 1 <= knobs.max_batch_size <= 16


def test_ppo_in_simulate_cli(tiny_model, tmp_path):
    from rtlm_adapt.cli import main

    path, _ = tiny_model
    out = tmp_path / "sim.json"
    code = main([
        "simulate", "--prompts", "alpaca:gpt4_1106_preview", "--arrivals", "azure-conv",
        "--requests", "40", "--policies", f"heuristic,ppo:{path}", "--no-progress",
        "--json", str(out),
    ])
    assert code == 0
    figures = json.loads(out.read_text())["policies"]
    assert figures[f"ppo:{path}"]["completed"] == 40


def test_guard_falls_back_to_heuristic_when_learned_is_worse():
    guard = PerformanceGuard(window=5, min_samples=3, probe_every=10, probe_len=5, margin=0.05)
    # a constant actor: whatever it decides, the queue it leaves behind is long
    actor = MLPActor([(np.zeros((6, 11)), np.full(6, 0.3))])
    heuristic = RTLMHeuristic()
    policy = PPOPolicy(actor, guard=guard, fallback=heuristic)
    sources = []
    for step in range(40):
        # the learned policy's epochs end with 40 waiting, the heuristic's with 5
        queue = 40 if policy._last_source == "learned" else 5
        knobs = policy.decide(_obs(queue, now=5.0 * step))
        sources.append(policy._last_source)
        if policy._last_source == "heuristic":
            assert knobs == heuristic.decide(_obs(queue, now=5.0 * step))
    assert sources[:9] == ["learned"] * 9  # nothing to compare with before the first probe
    assert guard.active == "heuristic" and guard.switches >= 1
    assert sources[-5:].count("heuristic") >= 4


def test_guard_keeps_learned_when_it_is_better():
    guard = PerformanceGuard(window=5, min_samples=3, probe_every=10, probe_len=5)
    for _ in range(5):
        guard.record("learned", 1.0)
        guard.record("heuristic", 2.0)
    assert guard.active == "learned" and guard.choose() == "learned"


def test_online_learning_updates_the_actor(tiny_model):
    path, _ = tiny_model
    policy = PPOPolicy.load(path, online=True,
                            guard=PerformanceGuard(probe_every=10_000, probe_len=1))
    policy.online.model.n_epochs = 1
    before = [w.copy() for w, _ in policy.actor.layers]
    for step in range(140):  # the online rollout is 128 decisions
        policy.decide(_obs(10 + step % 7, now=5.0 * step))
    assert policy.online.updates == 1
    after = [w for w, _ in policy.actor.layers]
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_no_secondary_defers_to_the_fallback(tiny_model):
    path, _ = tiny_model
    policy = PPOPolicy.load(path)  # no config.json beside it: assumed trained with a secondary
    assert policy.trained_with_secondary
    alone = replace(_obs(10, 5.0), secondary_max_batch=0)
    assert policy.decide(alone) == RTLMHeuristic().decide(alone)
    assert policy.decide(_obs(10, 5.0)) != RTLMHeuristic().decide(_obs(10, 5.0))
    (path.parent / "config.json").write_text(json.dumps({"env": {"secondary_profile": None}}))
    try:
        assert not PPOPolicy.load(path).trained_with_secondary
    finally:
        (path.parent / "config.json").unlink()


def test_heuristic_aging_bound_grows_with_the_queue():
    # service 35 s: alone, the bound is 8 x 35 = 280 s; once responses take 200 s (a long
    # queue), it is 3 x 200 = 600 s, so overload does not turn shortest-first into FCFS.
    calm = replace(_obs(10, 5.0), recent_response_s=40.0)
    overloaded = replace(_obs(10, 5.0), recent_response_s=200.0)
    assert RTLMHeuristic().decide(calm).max_wait_s == pytest.approx(280.0)
    assert RTLMHeuristic().decide(overloaded).max_wait_s == pytest.approx(600.0)
