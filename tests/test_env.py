"""ServingEnv: the gymnasium contract, reproducibility, episodes, and the action mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")

from rtlm_adapt.envs import ENV_ID, ServingEnv  # noqa: E402
from rtlm_adapt.knobs import Knobs  # noqa: E402
from rtlm_adapt.policies.action_space import KnobsActionMap  # noqa: E402

SMALL = {"n_requests": 20, "load": 0.9}


def test_gymnasium_check_env():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(ENV_ID, **SMALL)
    check_env(env.unwrapped, skip_render_check=True)


def test_sb3_check_env():
    from stable_baselines3.common.env_checker import check_env

    check_env(ServingEnv(**SMALL), warn=True)


def _rollout(seed: int, steps: int = 40) -> tuple[list[np.ndarray], list[float]]:
    env = ServingEnv(**SMALL)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    observations, rewards = [obs], []
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            break
    return observations, rewards


def test_same_seed_same_trajectory():
    obs_a, rew_a = _rollout(7)
    obs_b, rew_b = _rollout(7)
    assert rew_a == rew_b
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b, strict=True))
    obs_c, rew_c = _rollout(8)
    assert rew_c != rew_a  # another seed, another window


def test_episode_terminates_with_finite_rewards_and_return_matches_response_time():
    env = ServingEnv(**SMALL, miss_penalty=0.0)
    obs, info = env.reset(seed=3)
    total, steps = 0.0, 0
    while True:
        obs, reward, terminated, truncated, info = env.step(np.zeros(6, dtype=np.float32))
        assert math.isfinite(reward) and reward <= 1e-9
        assert env.observation_space.contains(obs)
        total += reward
        steps += 1
        if terminated or truncated:
            break
    assert terminated and not truncated and info["completed"] == SMALL["n_requests"]
    assert 10 < steps < 2000
    # the return is -(total response time) / mean service time (the reward's definition)
    expected = -info["mean_response_s"] * SMALL["n_requests"] / env.workload.mean_service_s
    assert total == pytest.approx(expected, rel=1e-6)


def test_action_mapping_round_trips_and_stays_in_bounds():
    amap = KnobsActionMap()
    rng = np.random.default_rng(0)
    for action in rng.uniform(-1.0, 1.0, size=(200, amap.size)):
        knobs = amap.to_knobs(action, primary_max_batch=16)
        assert isinstance(knobs, Knobs)
        assert 0.0 <= knobs.length_weight <= 1.0
        assert 0.0 <= knobs.uncertainty_weight <= 2.0
        assert 1e-3 - 1e-12 <= knobs.wait_weight <= 1.0 + 1e-12
        assert 0.0 <= knobs.slack_weight <= 1.0
        assert 1 <= knobs.max_batch_size <= 16
        assert 32.0 - 1e-9 <= knobs.offload_threshold <= 4096.0 + 1e-6
        back = amap.to_action(knobs, primary_max_batch=16)
        continuous = [0, 1, 2, 3, 5]
        np.testing.assert_allclose(back[continuous], action[continuous], atol=1e-5)
        # the batch cap is rounded to a whole request: within half a slot's share of the range
        assert abs(back[4] - action[4]) <= 2.0 / 15.0 / (1 - 1 / 16) + 1e-6
    # out-of-range actions are clipped, never invalid
    extreme = amap.to_knobs([5.0, -5.0, 9.0, -9.0, 3.0, -3.0], primary_max_batch=16)
    assert extreme.max_batch_size == 16 and extreme.offload_threshold == pytest.approx(32.0)


def _observation(**changes):
    from dataclasses import replace

    from rtlm_adapt.observation import Observation

    obs = Observation(now=0.0, queue_length=0, primary_running=4, primary_max_batch=64,
                      secondary_running=0, secondary_max_batch=4, pred_len_mean=0.0,
                      pred_len_p90=0.0, uncertainty_mean=0.0, oldest_wait_s=0.0,
                      min_slack_s=math.inf, arrival_rate=1.0, service_time_s=10.0, load=0.9,
                      recent_response_s=20.0, recent_miss_rate=0.0, step_time_s=0.1,
                      primary_knee_batch=16)
    return replace(obs, **changes)


def test_format_3_round_trips_and_stays_in_bounds():
    from rtlm_adapt.policies.action_space import LogKnobsActionMap

    amap = LogKnobsActionMap()
    rng = np.random.default_rng(0)
    for cap in (4, 16, 64):
        for action in rng.uniform(-1.0, 1.0, size=(200, amap.size)):
            knobs = amap.to_knobs(action, primary_max_batch=cap)
            assert 1 <= knobs.max_batch_size <= cap
            assert knobs.offload_threshold >= 8.0 - 1e-9
            assert (knobs.offload_threshold == math.inf) == (action[5] >= 0.9)
            back = amap.to_action(knobs, primary_max_batch=cap)
            np.testing.assert_allclose(back[:4], action[:4], atol=1e-5)
            if action[5] < 0.9:  # the threshold is continuous
                assert back[5] == pytest.approx(action[5], abs=1e-5)
            # the batch cap: the plateau reads back as its start, the rest within a slot
            assert amap.to_knobs(back, cap).max_batch_size == knobs.max_batch_size
    # the plateau: the primary's full cap from a = 0.25 up, at every cap
    for cap in (4, 16, 64):
        assert {amap.to_knobs([0, 0, 0, 0, a, 0], cap).max_batch_size
                for a in (0.25, 0.5, 1.0, 3.0)} == {cap}
        assert amap.to_knobs([0, 0, 0, 0, -1, 0], cap).max_batch_size == max(1, cap // 16)
    # the threshold grows one octave per quarter of the range, from 8 tokens
    assert [amap.to_knobs([0, 0, 0, 0, 0, a], 16).offload_threshold
            for a in (-1, -0.75, -0.5, 0, 0.75)] == pytest.approx([8, 16, 32, 128, 1024])


def test_format_3_needs_nothing_from_the_queue():
    from rtlm_adapt.policies.action_space import LogKnobsActionMap, RelativeKnobsActionMap

    action = [1.0, 0.0, 0.0, -1.0, 1.0, -0.5]
    empty, busy = _observation(), _observation(queue_length=40, pred_len_mean=300.0,
                                               pred_len_p90=900.0, pred_len_p50=200.0)
    log = LogKnobsActionMap()
    assert log.knobs(action, empty) == log.knobs(action, busy)
    assert log.knobs(action, empty).offload_threshold == pytest.approx(32.0)
    assert log.knobs(action, empty).max_batch_size == 64
    # format 2 turns offloading off with an empty queue, and its top cap depends on the knee
    assert RelativeKnobsActionMap().knobs(action, empty).offload_threshold == math.inf
    # no secondary: nothing to offload to
    assert log.knobs(action, _observation(secondary_max_batch=0)).offload_threshold == math.inf


def test_env_uses_format_4_and_trains_formats_2_3_5_and_6_too():
    from rtlm_adapt.policies.action_space import (
        ACTION_MAPS,
        OBSERVATION_FORMAT,
        LogKnobsActionMap,
        RelativeKnobsActionMap,
        TypicalLengthActionMap,
        observation_format_for_size,
    )

    assert OBSERVATION_FORMAT == 4 and set(ACTION_MAPS) == {1, 2, 3, 4, 5, 6}
    assert observation_format_for_size(14) == 2  # a file without the number predates format 3
    assert observation_format_for_size(15) == 4
    env = ServingEnv(**SMALL)
    assert env.model_format == 4 and type(env.action_map) is LogKnobsActionMap
    five = ServingEnv(**SMALL, model_format=5)
    assert isinstance(five.action_map, TypicalLengthActionMap)
    old = ServingEnv(**SMALL, model_format=2)
    assert isinstance(old.action_map, RelativeKnobsActionMap)
    three = ServingEnv(**SMALL, model_format=3)
    assert isinstance(three.action_map, LogKnobsActionMap)
    obs, _ = env.reset(seed=0)
    obs2, _ = old.reset(seed=0)
    obs3, _ = three.reset(seed=0)
    np.testing.assert_array_equal(obs2, obs3)  # formats 2 and 3: the same observation
    np.testing.assert_array_equal(obs[:-1], obs3)  # formats 4 and 5: that and the slowdown
    np.testing.assert_array_equal(five.reset(seed=0)[0], obs)
    six = ServingEnv(**SMALL, model_format=6)  # format 4's observation, knobs with a bound
    np.testing.assert_array_equal(six.reset(seed=0)[0], obs)
    assert six.knobs_for(np.zeros(6)).max_wait_s < math.inf
    assert env.knobs_for(np.zeros(6)).max_wait_s == math.inf
    assert obs.shape == (15,)
    with pytest.raises(ValueError, match="model_format"):
        ServingEnv(**SMALL, model_format=9)


def test_the_slowdown_tells_a_cpu_secondary_beside_a_fast_engine_from_a_peer():
    def slowdown(profile: str) -> float:
        env = ServingEnv(**SMALL, profile=profile)
        env.reset(seed=0)
        for _ in range(5):
            env.step(np.zeros(6, dtype=np.float32))
        return env.observation().secondary_slowdown

    # the packaged CPU secondary beside the transformers executor's primary (2 threads vs 1),
    # and beside the engine model of vLLM: several times slower than that primary
    peer, engine = slowdown("smollm2-135m-cpu2"), slowdown("vllm-cpu-smollm2-135m")
    assert 0.3 < peer < 2.0 and engine > 3.0
    alone = ServingEnv(**SMALL, secondary_profile=None)
    obs, _ = alone.reset(seed=0)
    assert alone.observation().secondary_slowdown == 0.0 and obs[-1] == 0.0


def test_hf_executor_runs_the_real_model_on_the_wall_clock_loop():
    pytest.importorskip("transformers")
    # a tiny random model; a high load packs the arrivals into about a second of wall time
    env = ServingEnv(
        executor="hf", model="tiny", n_requests=6, load=40.0, epoch_s=0.5, hf_max_tokens=8
    )
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    done, steps, rewards = False, 0, []
    while not done and steps < 200:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
        rewards.append(reward)
        steps += 1
        done = done or truncated
    assert done and info["completed"] == 6
    assert all(math.isfinite(r) for r in rewards)
    stats = env.controller.stats()
    assert stats.balanced and stats.finished == 6
    env.reset(seed=1)  # the loaded executors are reused: the new episode starts cleanly
    assert env.controller.stats().balanced and env.controller.stats().failed == 0


def test_scenarios_vary_the_deployment_per_episode():
    from gymnasium.utils.env_checker import check_env

    from rtlm_adapt.policies.action_space import OBSERVATION_FORMATS
    from rtlm_adapt.policies.ppo_train import TRAIN_SCENARIOS

    env = ServingEnv(scenarios=TRAIN_SCENARIOS, n_requests=20)
    check_env(env, skip_render_check=True)
    names = OBSERVATION_FORMATS[2][1]
    seen = []
    for seed in range(12):
        obs, info = env.reset(seed=seed)
        sc = env.scenario
        assert 4 <= sc.max_batch <= 64 and 0.5 <= sc.load <= 1.1
        assert not 0.65 < sc.load < 0.75 and not 0.85 < sc.load < 0.95  # held-out bands
        assert env.observation().primary_max_batch == sc.max_batch
        assert obs[names.index("has_secondary")] == float(sc.secondary)
        assert 1 <= env.knobs_for(np.ones(6, dtype=np.float32)).max_batch_size <= sc.max_batch
        seen.append(sc)
    assert len({s.max_batch for s in seen}) > 3 and {s.secondary for s in seen} == {True, False}
    assert len({s.prompts for s in seen}) > 2 and len({s.arrivals for s in seen}) > 1


def test_scenarios_can_draw_the_engine_model_of_vllm_as_the_primary():
    space = {"prompts": ["alpaca:phi-2"], "arrivals": ["poisson"], "loads": [[0.9, 0.9]],
             "batch_caps": [4, 32], "secondary_prob": 0.0,
             "profiles": ["smollm2-135m-cpu2", "vllm-cpu-smollm2-135m"]}  # fmt: skip
    env = ServingEnv(scenarios=space, n_requests=20)
    kinds = set()
    for seed in range(10):
        env.reset(seed=seed)
        sc, cost = env.scenario, env.episode_cost
        assert cost.name == sc.profile and cost.max_batch_size == sc.max_batch
        if sc.profile == "vllm-cpu-smollm2-135m":
            # the engine's seats follow the drawn cap (simulated_executor serves an engine block
            # with the engine model)
            assert cost.engine.max_num_seqs == sc.max_batch
        else:
            assert cost.engine is None
        kinds.add(sc.profile)
        _, reward, _, _, _ = env.step(np.zeros(6, dtype=np.float32))
        assert math.isfinite(reward)
    assert kinds == set(space["profiles"])


def test_scale_free_observation_reads_two_scales_alike():
    from dataclasses import replace

    from rtlm_adapt.observation import Observation

    small = Observation(now=0.0, queue_length=8, primary_running=4, primary_max_batch=4,
                        secondary_running=0, secondary_max_batch=0, pred_len_mean=200.0,
                        pred_len_p90=500.0, uncertainty_mean=0.3, oldest_wait_s=30.0,
                        min_slack_s=20.0, arrival_rate=0.1, service_time_s=10.0, load=0.9,
                        recent_response_s=25.0, recent_miss_rate=0.1, step_time_s=0.05,
                        primary_knee_batch=2, pred_len_p50=150.0)
    # a 16x larger executor on a 4x longer prompt mix, 10x faster: the same situation
    big = replace(small, queue_length=128, primary_running=64, primary_max_batch=64,
                  pred_len_mean=800.0, pred_len_p90=2000.0, pred_len_p50=600.0,
                  oldest_wait_s=3.0, min_slack_s=2.0, arrival_rate=1.0, service_time_s=1.0,
                  recent_response_s=2.5, step_time_s=0.005, primary_knee_batch=32)
    assert small.scale_free_vector() == pytest.approx(big.scale_free_vector())
    assert small.as_vector() != pytest.approx(big.as_vector())  # format 1 was not


def _episode_rewards(env: ServingEnv, seed: int, act) -> list[float]:
    env.reset(seed=seed)
    rewards = []
    while True:
        _, reward, terminated, truncated, _ = env.step(act(env))
        rewards.append(reward)
        if terminated or truncated:
            return rewards


def test_a_reference_reward_is_the_gain_over_the_heuristic_on_the_same_requests():
    from rtlm_adapt.policies.action_space import LogKnobsActionMap
    from rtlm_adapt.policies.heuristic import RTLMHeuristic

    # no secondary: the action map can express the heuristic's knobs exactly here
    options = dict(SMALL, secondary_profile=None, profile="vllm-cpu-smollm2-135m", load=0.95)
    heuristic = RTLMHeuristic()

    def plays_heuristic(env: ServingEnv) -> np.ndarray:
        obs = env.observation()
        return LogKnobsActionMap().to_action(heuristic.decide(obs), obs.primary_max_batch)

    env = ServingEnv(**options, reference="heuristic")
    rewards = _episode_rewards(env, 0, plays_heuristic)
    assert len(rewards) > 10 and max(abs(r) for r in rewards) < 1e-9  # the same schedule

    # a bad policy (a batch cap of one request) loses to it, and the per-epoch difference adds
    # up to the absolute return minus the heuristic's
    def one_at_a_time(env: ServingEnv) -> np.ndarray:
        return np.array([1, 0, 0, -1, -1, 1], dtype=np.float32)

    relative = _episode_rewards(env, 1, one_at_a_time)
    ref = env._reference_run
    absolute = _episode_rewards(ServingEnv(**options), 1, one_at_a_time)
    heuristic_return = -ref.work(math.inf) / env.workload.mean_service_s - (
        env.miss_penalty * ref.misses(-math.inf, math.inf))
    assert sum(relative) < -1.0
    assert sum(relative) == pytest.approx(sum(absolute) - heuristic_return, rel=1e-6)
    # so does an agent whose last epoch ends before the reference's last request: that epoch
    # settles the reference's remaining requests (strong aging at the full cap, no offloading)
    def aging(env: ServingEnv) -> np.ndarray:
        return np.array([0, 0, 1, -1, 1, 1], dtype=np.float32)

    relative = _episode_rewards(env, 4, aging)
    ref = env._reference_run
    assert ref.work(math.inf) > ref.work(env.loop.now)  # the reference was still serving
    absolute = _episode_rewards(ServingEnv(**options), 4, aging)
    heuristic_return = -ref.work(math.inf) / env.workload.mean_service_s - (
        env.miss_penalty * ref.misses(-math.inf, math.inf))
    assert sum(relative) == pytest.approx(sum(absolute) - heuristic_return, rel=1e-6)
    with pytest.raises(ValueError, match="reference"):
        ServingEnv(**SMALL, reference="fcfs")


# -- the tail term (issue #17) ----------------------------------------------------------------
# no secondary: the action map can express the heuristic's knobs exactly (as above)
TAIL_OPTIONS = dict(SMALL, secondary_profile=None, profile="vllm-cpu-smollm2-135m", load=0.95)


def _plays_heuristic(env: ServingEnv) -> np.ndarray:
    from rtlm_adapt.policies.action_space import LogKnobsActionMap
    from rtlm_adapt.policies.heuristic import RTLMHeuristic

    obs = env.observation()
    return LogKnobsActionMap().to_action(RTLMHeuristic().decide(obs), obs.primary_max_batch)


def _one_at_a_time(env: ServingEnv) -> np.ndarray:
    return np.array([1, 0, 0, -1, -1, 1], dtype=np.float32)


def test_the_tail_term_is_zero_for_an_agent_that_plays_the_reference():
    env = ServingEnv(**TAIL_OPTIONS, reference="heuristic", tail_weight=1.0)
    rewards = _episode_rewards(env, 0, _plays_heuristic)
    assert len(rewards) > 10 and max(abs(r) for r in rewards) < 1e-9
    # not for want of a tail: the reference's slowest requests exceed the threshold
    assert env._reference_run.tail_excess(-math.inf, math.inf, env._tail_tau) > 0


def test_the_tail_term_adds_up_to_the_cvar_bounds_excess_agent_minus_reference():
    import functools

    from rtlm_adapt.controller import AdaptiveController
    from rtlm_adapt.envs.episodes import shared_scorer
    from rtlm_adapt.experiment import run_policy

    weight, q = 2.0, 0.9
    tailed = ServingEnv(**TAIL_OPTIONS, reference="heuristic", tail_weight=weight,
                        tail_quantile=q)
    with_tail = _episode_rewards(tailed, 1, _one_at_a_time)
    plain = ServingEnv(**TAIL_OPTIONS, reference="heuristic")
    without = _episode_rewards(plain, 1, _one_at_a_time)
    assert len(with_tail) == len(without)

    # the same requests served by the heuristic, independently of the environment
    workload = tailed.workload
    factory = functools.partial(AdaptiveController, epoch_s=tailed.epoch_s,
                                scorer=shared_scorer())
    reference = run_policy("heuristic", workload, batching=tailed.batching,
                           primary_cost=tailed.episode_cost, secondary_cost=None,
                           controller_factory=factory).completions
    agent = tailed.loop.result.completions
    assert len(agent) == len(reference) == SMALL["n_requests"]
    # the agent finishes last, so every reference completion fell in one of its epochs
    assert max(c.finish_time for c in reference) <= tailed.loop.now
    tau = np.quantile([c.response_time for c in reference], q)

    def excess(completions) -> float:
        return sum(max(0.0, c.response_time - tau) for c in completions)

    expected = -weight * (excess(agent) - excess(reference)) / (
        (1 - q) * workload.mean_service_s)
    assert expected < -1.0  # one request at a time has the longer tail
    difference = sum(a - b for a, b in zip(with_tail, without, strict=True))
    assert difference == pytest.approx(expected, rel=1e-6)


def test_the_tail_options_are_validated():
    for bad in ({"tail_weight": 1.0}, {"tail_weight": -0.5, "reference": "heuristic"},
                {"tail_weight": math.nan, "reference": "heuristic"},
                {"tail_quantile": 0.0}, {"tail_quantile": 1.0}):
        with pytest.raises(ValueError, match="tail_"):
            ServingEnv(**SMALL, **bad)
    with pytest.raises(ValueError, match="tail_weight.*reference"):
        ServingEnv(**SMALL, tail_weight=0.5)
    env = ServingEnv(**SMALL)
    assert env.tail_weight == 0.0 and env.tail_quantile == 0.95


def test_the_last_info_carries_the_tail_response_time():
    env = ServingEnv(**SMALL, tail_quantile=0.8)
    env.reset(seed=2)
    while True:
        _, _, terminated, truncated, info = env.step(np.zeros(6, dtype=np.float32))
        if terminated or truncated:
            break
        assert "tail_response_s" not in info
    times = np.array([c.response_time for c in env.loop.result.completions])
    slowest = times[times >= np.quantile(times, 0.8)]
    assert len(slowest) >= 4  # a fifth of 20 requests
    assert info["tail_response_s"] == pytest.approx(slowest.mean())
    assert info["tail_response_s"] > info["mean_response_s"]


def test_train_passes_the_tail_options_to_the_environments(monkeypatch, tmp_path, capsys):
    from rtlm_adapt.cli import main
    from rtlm_adapt.policies import ppo_train

    seen = []
    monkeypatch.setattr(ppo_train, "train", lambda config: seen.append(config) or "model.zip")
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--reference", "heuristic", "--tail-weight", "0.5",
                 "--tail-quantile", "0.9"]) == 0
    assert seen[-1].env["tail_weight"] == 0.5 and seen[-1].env["tail_quantile"] == 0.9
    assert seen[-1].env["reference"] == "heuristic"
    assert main(["train", "--out", out]) == 0  # not given: the environment's defaults
    assert "tail_weight" not in seen[-1].env and "tail_quantile" not in seen[-1].env
    # a tail without a reference is refused before training starts
    assert main(["train", "--out", out, "--tail-weight", "0.5"]) == 2
    assert "--tail-weight needs --reference" in capsys.readouterr().err and len(seen) == 2
    for bad in (["--tail-weight", "-1"], ["--tail-weight", "nan"], ["--tail-quantile", "1"]):
        with pytest.raises(SystemExit):
            main(["train", "--out", out, *bad])


def test_train_passes_the_model_format_and_a_start_model(monkeypatch, tmp_path):
    from rtlm_adapt.cli import main
    from rtlm_adapt.policies import ppo_train

    seen = []
    monkeypatch.setattr(ppo_train, "train", lambda config: seen.append(config) or "model.zip")
    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--model-format", "5", "--init-model", "m.zip"]) == 0
    assert seen[-1].model_format == 5 and seen[-1].init_model == "m.zip"
    assert main(["train", "--out", out]) == 0
    assert seen[-1].model_format == 4 and seen[-1].init_model is None
    with pytest.raises(SystemExit):
        main(["train", "--out", out, "--model-format", "9"])
