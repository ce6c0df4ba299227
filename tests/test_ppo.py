"""PPOPolicy: a tiny trained model loads, runs inside the CLI, and the guard falls back."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from rtlm_adapt.knobs import Knobs  # noqa: E402
from rtlm_adapt.observation import Observation  # noqa: E402
from rtlm_adapt.policies import make_policy  # noqa: E402
from rtlm_adapt.policies.action_space import KnobsActionMap  # noqa: E402
from rtlm_adapt.policies.heuristic import RTLMHeuristic  # noqa: E402
from rtlm_adapt.policies.mlp_actor import MLPActor  # noqa: E402
from rtlm_adapt.policies.ppo import PPOPolicy  # noqa: E402
from rtlm_adapt.policies.ppo_online import PerformanceGuard  # noqa: E402
from rtlm_adapt.policies.shadow_guard import ShadowGuard  # noqa: E402


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
    size = model.observation_space.shape[0]
    for obs in rng.uniform(0.0, 1.0, size=(20, size)).astype(np.float32):
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


def _bad_policy(**kwargs) -> PPOPolicy:
    """A deliberately bad policy: batch cap 1/16 of the primary's (format 1's action map),
    arrival order, no offloading."""
    actor = MLPActor([(np.zeros((6, 14)), np.array([-1.0, -1.0, -1.0, -1.0, -1.0, 1.0]))])
    return PPOPolicy(actor, action_map=KnobsActionMap(), **kwargs)


@pytest.mark.parametrize("arrivals,load", [("poisson", 0.9), ("azure-conv", 0.7)])
def test_interleaved_guard_hands_a_bad_policy_back_within_two_trials(arrivals, load, caplog):
    from rtlm_adapt.calibration.step_cost import StepCost
    from rtlm_adapt.envs.episodes import cached_prompts
    from rtlm_adapt.experiment import build_workload, run_policy

    samples = cached_prompts("alpaca:gpt4_1106_preview")
    workload = build_workload(samples, arrivals=arrivals, load=load, n=200, seed=1)
    policy = _bad_policy(guard=PerformanceGuard())
    judged_at = []
    decide = policy.decide

    def watch(obs):  # note the trial count when the guard first hands back
        knobs = decide(obs)
        if policy.guard.handbacks and not judged_at:
            judged_at.append(policy.guard.trials)
        return knobs

    policy.decide = watch
    secondary = StepCost.default_secondary()
    with caplog.at_level("WARNING", logger="rtlm_adapt.policies.ppo_guard"):
        guarded = run_policy(policy, workload, secondary_cost=secondary)
    # trial 1 is the warm-up; the evidence is trial 2 (heuristic) and trial 3 (learned)
    assert judged_at == [3]
    assert policy.guard.metrics()["handbacks"] >= 1
    assert any("handing the knobs back to the heuristic" in r.message for r in caplog.records)
    unguarded = run_policy(_bad_policy(guard=None), workload,
                           secondary_cost=secondary)
    assert guarded.summary.mean_rt_s < 0.8 * unguarded.summary.mean_rt_s


def _in_system_obs(now: float, in_system: int) -> Observation:
    return replace(_obs(in_system, now), primary_running=0, arrival_rate=1.0)


def _drive(guard: PerformanceGuard, rise: dict[str, int], steps: int, start: int = 0) -> list[str]:
    """Run the guard on a system where each source adds ``rise[source]`` requests an epoch."""
    level, sources = 50, []
    for step in range(start, start + steps):
        source = guard.choose(_in_system_obs(5.0 * step, level))
        sources.append(source)
        level = max(0, level + rise[source])
    return sources


def test_guard_keeps_a_learned_policy_that_does_as_well():
    guard = PerformanceGuard(trial_epochs=4, probe_every=3)
    sources = _drive(guard, {"learned": 0, "heuristic": 0}, 80)
    assert guard.handbacks == 0 and guard.active == "learned"
    assert sources.count("learned") > 0.6 * len(sources)
    assert "heuristic" in sources[16:]  # the reference is probed now and then


def test_guard_gives_the_knobs_back_once_the_learned_policy_recovers():
    guard = PerformanceGuard(trial_epochs=4, probe_every=2, window=2)
    _drive(guard, {"learned": 3, "heuristic": 0}, 13)
    assert guard.active == "heuristic" and guard.handbacks == 1
    # now the learned policy drains faster
    _drive(guard, {"learned": -1, "heuristic": 0}, 80, start=13)
    assert guard.active == "learned" and guard.resumes == 1


def test_guard_can_be_switched_off(tiny_model):
    path, _ = tiny_model
    assert isinstance(make_policy(f"ppo:{path}").guard, ShadowGuard)  # on by default
    assert isinstance(make_policy(f"ppo-interleaved:{path}").guard, PerformanceGuard)
    assert make_policy(f"ppo-unguarded:{path}").guard is None
    assert PPOPolicy.load(path, guard=None).guard is None
    with pytest.raises(ValueError, match="model path"):
        make_policy("ppo:")


def test_bare_ppo_loads_the_packaged_model():
    from rtlm_adapt.policies.ppo import PACKAGED_MODEL

    policy = make_policy("ppo")
    assert isinstance(policy, PPOPolicy) and PACKAGED_MODEL.is_file()
    # format 6: format 4's weights with the heuristic's hard aging bound, the better of the two
    # on a validation that weighs the p99 as much as the mean (BENCHMARKS.md 4.8)
    assert policy.observation_format == 6 and policy.guard is not None
    assert policy.metadata["observation_format"] == 6
    # trained with and without a secondary; without one, validation decides who sets the knobs
    assert policy.heuristic_regimes <= {"without_secondary"}
    # validation may choose the warm start (step 0) over what training made of it
    assert policy.metadata.get("training", {}).get("trained_timesteps", 0) > 0
    knobs = policy.decide(_obs(10, 5.0))
    assert 1 <= knobs.max_batch_size <= 16


def test_npz_round_trip_and_format_errors(tiny_model, tmp_path):
    path, _ = tiny_model
    policy = PPOPolicy.load(path, guard=None)
    saved = policy.save(tmp_path / "m.npz", note="test")
    again = PPOPolicy.load(saved, guard=None)
    assert again.metadata["note"] == "test"
    x = np.random.default_rng(1).uniform(0, 1, policy.actor.obs_size)
    np.testing.assert_allclose(again.actor(x), policy.actor(x))
    # a file from a future version names the problem
    with np.load(saved) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    for field_, value, message in [("observation_format", 9, "observation format 9"),
                                   ("file_version", 7, "model file version 7")]:
        arrays["meta"] = np.array(json.dumps({**meta, field_: value}))
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            PPOPolicy.load(tmp_path / "bad.npz")


def test_a_run_records_its_model_format(tiny_model, tmp_path):
    import shutil

    from rtlm_adapt.policies.action_space import LogKnobsActionMap, RelativeKnobsActionMap

    path, _ = tiny_model
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(path, run / "model.zip")
    shutil.copy(path, run / "checkpoints" / "ppo_256_steps.zip")
    # a run that recorded no format: the actor's input size says which (15 numbers: format 4)
    (run / "config.json").write_text(json.dumps({"env": {}}))
    assert PPOPolicy.load(run / "model.zip", guard=None).observation_format == 4
    (run / "config.json").write_text(json.dumps({"env": {}, "model_format": 4}))
    for file in (run / "model.zip", run / "checkpoints" / "ppo_256_steps.zip"):
        policy = PPOPolicy.load(file, guard=None)
        assert policy.observation_format == 4
        assert isinstance(policy.action_map, LogKnobsActionMap)
    again = PPOPolicy.load(policy.save(tmp_path / "m.npz"), guard=None)
    assert again.observation_format == 4 and isinstance(again.action_map, LogKnobsActionMap)
    with pytest.raises(ValueError, match="observation format 3 has 14"):
        PPOPolicy(again.actor, observation_format=3)
    assert isinstance(PPOPolicy(MLPActor([(np.zeros((6, 14)), np.zeros(6))]),
                                observation_format=2).action_map, RelativeKnobsActionMap)


def test_models_on_the_older_observation_still_run():
    from pathlib import Path

    old = Path(__file__).parents[1] / "benchmarks" / "results" / "ppo_model.zip"
    policy = make_policy(f"ppo:{old}")  # trained on observation format 1 (11 numbers)
    assert policy.observation_format == 1 and policy.actor.obs_size == 11
    assert isinstance(policy.decide(_obs(10, 5.0)), Knobs)
    with pytest.raises(ValueError, match="no observation format has"):
        PPOPolicy(MLPActor([(np.zeros((6, 9)), np.zeros(6))]))


def test_online_learning_updates_the_actor(tiny_model):
    path, _ = tiny_model
    policy = PPOPolicy.load(path, online=True, guard=None)
    policy.online.model.n_epochs = 1
    before = [w.copy() for w, _ in policy.actor.layers]
    for step in range(140):  # the online rollout is 128 decisions
        policy.decide(_obs(10 + step % 7, now=5.0 * step))
    assert policy.online.updates == 1
    after = [w for w, _ in policy.actor.layers]
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_no_secondary_defers_to_the_fallback(tiny_model):
    path, _ = tiny_model
    # no config.json beside it: assumed trained with a secondary; guard off to compare knobs
    policy = PPOPolicy.load(path, guard=None)
    assert policy.heuristic_regimes == {"without_secondary"}
    alone = replace(_obs(10, 5.0), secondary_max_batch=0)
    assert policy.decide(alone) == RTLMHeuristic().decide(alone)
    assert policy.decide(_obs(10, 5.0)) != RTLMHeuristic().decide(_obs(10, 5.0))
    (path.parent / "config.json").write_text(json.dumps({"env": {"secondary_profile": None}}))
    try:
        assert not PPOPolicy.load(path, guard=None).heuristic_regimes
        mixed = {"env": {"scenarios": {"secondary_prob": 0.5}}}
        (path.parent / "config.json").write_text(json.dumps(mixed))
        assert not PPOPolicy.load(path, guard=None).heuristic_regimes
    finally:
        (path.parent / "config.json").unlink()


def test_heuristic_aging_bound_grows_with_the_queue():
    # service 35 s: alone, the bound is 8 x 35 = 280 s; once responses take 200 s (a long
    # queue), it is 3 x 200 = 600 s, so overload does not turn shortest-first into FCFS.
    calm = replace(_obs(10, 5.0), recent_response_s=40.0)
    overloaded = replace(_obs(10, 5.0), recent_response_s=200.0)
    assert RTLMHeuristic().decide(calm).max_wait_s == pytest.approx(280.0)
    assert RTLMHeuristic().decide(overloaded).max_wait_s == pytest.approx(600.0)


def test_a_warm_start_begins_at_the_initial_action_whatever_the_observation():
    from pathlib import Path

    from stable_baselines3 import PPO

    from rtlm_adapt.envs import ServingEnv
    from rtlm_adapt.policies.action_space import OBS_HIGH, OBS_LOW, LogKnobsActionMap
    from rtlm_adapt.policies.ppo_train import TrainConfig, best_constant_action, build_model

    ceiling = Path(__file__).parents[1] / "benchmarks" / "results" / "knob_ceiling_format3.json"
    start = best_constant_action(str(ceiling))  # full batch cap, offload above 32 tokens
    assert start == [1.0, 0.0, 0.13, -1.0, 0.25, -0.5]
    assert best_constant_action("1,0,0.13,-1,0.25,-0.5") == start
    env = ServingEnv(n_requests=20, load=0.9)
    model = build_model(TrainConfig(initial_action=start, log_std_init=-1.5), env)
    observations = np.random.default_rng(0).uniform(
        OBS_LOW, OBS_HIGH, size=(8, env.observation_space.shape[0])).astype(np.float32)
    for obs in observations:
        np.testing.assert_allclose(model.predict(obs, deterministic=True)[0], start, atol=1e-6)
    policy = PPOPolicy.from_model(model, guard=None, observation_format=4)
    as_stored = np.asarray(start, dtype=np.float32).tolist()  # the actor's float32 bias
    for obs in (_obs(0, 0.0), _obs(40, 300.0)):
        assert policy.decide(obs) == LogKnobsActionMap().knobs(as_stored, obs)

    # without one, the model is the one SB3 builds with the same settings (seeded alike)
    config = TrainConfig()
    plain = build_model(config, env)
    same = PPO("MlpPolicy", env, n_steps=config.n_steps, batch_size=config.batch_size,
               n_epochs=config.n_epochs, learning_rate=config.learning_rate, gamma=config.gamma,
               gae_lambda=config.gae_lambda, seed=config.seed, device="cpu",
               policy_kwargs={"log_std_init": config.log_std_init})
    for key, value in plain.policy.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), same.policy.state_dict()[key].numpy())
    actions = [plain.predict(obs, deterministic=True)[0] for obs in observations[:2]]
    assert not np.allclose(*actions)


def test_a_warm_start_per_regime_gives_each_regime_its_own_action():
    from rtlm_adapt.envs import ServingEnv
    from rtlm_adapt.observation import Observation
    from rtlm_adapt.policies.action_space import OBS_HIGH, OBS_LOW
    from rtlm_adapt.policies.ppo_train import TrainConfig, build_model

    start = {"with_secondary": [1.0, 0.0, 0.13, -1.0, 0.25, -0.5],
             "without_secondary": [1.0, -0.5, 0.6, -1.0, 0.0, 1.0]}
    env = ServingEnv(n_requests=20, load=0.9)
    model = build_model(TrainConfig(initial_action=start), env)
    column = Observation.SCALE_FREE_FIELDS.index("has_secondary")
    observations = np.random.default_rng(1).uniform(
        OBS_LOW, OBS_HIGH, size=(16, env.observation_space.shape[0])).astype(np.float32)
    for k, obs in enumerate(observations):
        obs[column] = k % 2  # the environment writes 0 or 1 there
        regime = "with_secondary" if k % 2 else "without_secondary"
        np.testing.assert_allclose(model.predict(obs, deterministic=True)[0], start[regime],
                                   atol=1e-5)
    # the deployed numpy actor agrees with the torch one
    actor = PPOPolicy.from_model(model, guard=None, observation_format=4).actor
    np.testing.assert_allclose(actor.mean(observations[1].tolist()), start["with_secondary"],
                               atol=1e-5)
    with pytest.raises(ValueError, match="per regime"):
        build_model(TrainConfig(initial_action={"with_secondary": start["with_secondary"]}), env)


def test_export_leaves_a_regime_to_the_heuristic_where_validation_found_no_gain(tmp_path):
    from rtlm_adapt.envs import ServingEnv
    from rtlm_adapt.policies.ppo_train import (
        TrainConfig,
        build_model,
        export_model,
        validate_by_regime,
        validate_formats,
    )

    # a run folder holding one untrained warm start: a different action per regime
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    start = {"with_secondary": [1.0, 0.0, 0.13, -1.0, 0.25, -0.5],
             "without_secondary": [0.0, 0.0, 1.0, -1.0, -1.0, 1.0]}  # arrival order, cap 1/16
    config = TrainConfig(initial_action=start, env={"scenarios": {"batch_caps": [8, 8],
                                                                  "secondary_prob": 0.5}})
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    build_model(config, ServingEnv(n_requests=20)).save(run / "checkpoints" / "ppo_0_steps.zip")

    regimes = validate_by_regime(run, "checkpoints/ppo_0_steps.zip", episodes=8)
    assert set(regimes) == {"with_secondary", "without_secondary"}
    assert regimes["without_secondary"] > 1.0  # a batch of 1 in arrival order loses
    dest = export_model(run, tmp_path / "m.npz", "checkpoints/ppo_0_steps.zip",
                        by_regime=regimes)
    policy = PPOPolicy.load(dest, guard=None)
    assert "without_secondary" in policy.heuristic_regimes
    alone = replace(_obs(10, 5.0), secondary_max_batch=0)
    assert policy.decide(alone) == RTLMHeuristic().decide(alone)
    saved = json.loads(dest.with_suffix(".json").read_text())["validation_by_regime"]
    assert saved["rt_over_heuristic"] == regimes
    # with no validation by regime, a model trained in both regimes keeps both
    kept = export_model(run, tmp_path / "k.npz", "checkpoints/ppo_0_steps.zip")
    assert not PPOPolicy.load(kept, guard=None).heuristic_regimes
    with pytest.raises(ValueError, match="unknown regimes"):
        PPOPolicy(policy.actor, heuristic_regimes=["gpu"])
    # the same weights read in formats 4 and 6, scored on mean and p99 alike; the export reads
    # the model in the best-scoring format and keeps the scores
    formats = validate_formats(run, "checkpoints/ppo_0_steps.zip", episodes=8)
    assert [row["observation_format"] for row in formats] in ([4, 6], [6, 4])
    assert formats[0]["score"] <= formats[1]["score"]
    for row in formats:
        assert row["score"] == pytest.approx(
            (row["mean_rt_over_heuristic"] + row["p99_over_heuristic"]) / 2)
    for best in (4, 6):
        ranked = sorted(formats, key=lambda row: row["observation_format"] != best)
        chosen = export_model(run, tmp_path / f"f{best}.npz", "checkpoints/ppo_0_steps.zip",
                              formats=ranked)
        assert PPOPolicy.load(chosen, guard=None).observation_format == best
        saved = json.loads(chosen.with_suffix(".json").read_text())
        assert saved["validation_by_format"] == ranked


def test_format_5_scales_the_offload_threshold_to_the_prompt_mix():
    from rtlm_adapt.controller import AdaptiveController
    from rtlm_adapt.policies.action_space import LogKnobsActionMap, TypicalLengthActionMap
    from rtlm_adapt.request import Request

    # the controller reports the smoothed predicted length of arrivals, queue or none
    ctl = AdaptiveController("heuristic")
    ctl.submit(Request("a", "Say hi.", arrival_time=0.0))
    first = ctl.predictor.predict_one(ctl.prompt_features("Say hi.")).length
    assert ctl.observe(0.0).typical_len == pytest.approx(first)
    ctl.submit(Request("b", "Write a long essay on the history of Rome.", arrival_time=1.0))
    assert ctl.observe(1.0).typical_len != pytest.approx(first)

    # format 5 is format 3's threshold times typical_len / 256; the weights and cap are alike
    action = [1.0, 0.0, 0.0, -1.0, 0.5, 0.0]  # format 3: offload above 128 tokens
    obs = replace(_obs(10, 300.0), secondary_max_batch=4)
    three = LogKnobsActionMap().knobs(action, obs)
    for typical, expected in ((64.0, 32.0), (512.0, 256.0), (0.0, 128.0)):
        five = TypicalLengthActionMap().knobs(action, replace(obs, typical_len=typical))
        assert three.offload_threshold == 128.0 and five.offload_threshold == expected
        assert five.replace(offload_threshold=128.0) == three
    # off stays off, and nothing is offloaded without a secondary
    off = TypicalLengthActionMap().knobs([1, 0, 0, -1, 0.5, 1], replace(obs, typical_len=64.0))
    assert off.offload_threshold == math.inf
    alone = replace(obs, typical_len=64.0, secondary_max_batch=0)
    assert TypicalLengthActionMap().knobs(action, alone).offload_threshold == math.inf
    with pytest.raises(ValueError, match="reference_len"):
        TypicalLengthActionMap(reference_len=0.0)


def test_format_6_gives_the_learned_knobs_the_heuristics_hard_aging_bound(tmp_path):
    from rtlm_adapt.policies.action_space import AgingBoundActionMap, LogKnobsActionMap
    from rtlm_adapt.policies.ppo import PACKAGED_MODEL

    action = [1.0, 0.0, 0.0, -1.0, 0.5, 0.0]
    for recent_s in (4.0, 200.0):  # 8 x 35 s of service, or 3 x 200 s of response time
        obs = replace(_obs(10, 300.0), secondary_max_batch=4, recent_response_s=recent_s)
        four, six = LogKnobsActionMap().knobs(action, obs), AgingBoundActionMap().knobs(action, obs)
        assert four.max_wait_s == math.inf  # the action has no entry for it
        assert six.max_wait_s == RTLMHeuristic().decide(obs).max_wait_s < math.inf
        assert six.replace(max_wait_s=math.inf) == four  # the rest is format 4's
    # the packaged model's weights read as format 4, then as format 6: saved, loaded and run
    # with the bound
    packaged = PPOPolicy.load(PACKAGED_MODEL, guard=None, observation_format=4)
    bounded = PPOPolicy(packaged.actor, observation_format=6, guard=None)
    path = bounded.save(tmp_path / "bounded.npz")
    loaded = PPOPolicy.load(path, guard=None)
    assert loaded.observation_format == 6 and isinstance(loaded.action_map, AgingBoundActionMap)
    obs = replace(_obs(10, 300.0), secondary_max_batch=4)
    assert loaded.decide(obs) == packaged.decide(obs).replace(
        max_wait_s=RTLMHeuristic().decide(obs).max_wait_s)
    # the packaged file (format 6 itself) decides the same; an observation of another size is
    # refused
    assert PPOPolicy.load(PACKAGED_MODEL, observation_format=6, guard=None).decide(obs) == (
        loaded.decide(obs))
    with pytest.raises(ValueError, match="format 1"):
        PPOPolicy.load(PACKAGED_MODEL, observation_format=1, guard=None)


def test_a_run_can_start_from_a_trained_model(tmp_path):
    from rtlm_adapt.envs import ServingEnv
    from rtlm_adapt.policies.action_space import OBS_HIGH, OBS_LOW
    from rtlm_adapt.policies.ppo_train import TrainConfig, build_model

    env = ServingEnv(n_requests=20, load=0.9)
    start = [1.0, -0.5, 0.13, -1.0, 0.25, 0.0]
    trained = build_model(TrainConfig(initial_action=start, seed=3), env)
    trained.save(tmp_path / "trained.zip")
    carried = build_model(TrainConfig(init_model=str(tmp_path / "trained.zip")), env)
    observations = np.random.default_rng(2).uniform(
        OBS_LOW, OBS_HIGH, size=(6, env.observation_space.shape[0])).astype(np.float32)
    for obs in observations:  # the same actor and critic, not SB3's fresh ones
        np.testing.assert_allclose(carried.predict(obs, deterministic=True)[0], start, atol=1e-6)
    for key, value in trained.policy.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), carried.policy.state_dict()[key].numpy())
    with pytest.raises(ValueError, match="not both"):
        build_model(TrainConfig(initial_action=start, init_model=str(tmp_path / "trained.zip")),
                    env)
