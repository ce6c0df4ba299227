"""serve-bench --engine vllm --compare-sim's replay on the engine model (no vLLM needed)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.engines.vllm_replay import (
    compare_on_engine,
    engine_profile,
    replay,
    replay_requests,
)
from rtlm_adapt.request import Completion


@dataclass
class Bench:  # the fields of vllm_bench.BenchRequest a replay reads
    id: str
    prompt: str
    arrival_s: float
    deadline_s: float


REQUESTS = [Bench(str(i), f"Tell me about {i}.", 0.4 * i, 0.4 * i + 30.0) for i in range(40)]
PROMPT_TOKENS = [10 + 3 * i for i in range(40)]


def fake_real(scale: float) -> list[Completion]:
    """A 'real' run: lengths 5..200 tokens, response times that the engine replay then sets."""
    return [
        Completion(r.id, 5 + (7 * i) % 196, r.arrival_s, r.arrival_s, r.arrival_s + scale, "vllm")
        for i, r in enumerate(REQUESTS)
    ]


def test_replay_generates_the_real_lengths_and_direct_has_no_cap():
    cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=4)
    real = fake_real(1.0)
    requests = replay_requests(
        [r.id for r in REQUESTS], [r.prompt for r in REQUESTS], PROMPT_TOKENS,
        [r.arrival_s for r in REQUESTS], [r.deadline_s for r in REQUESTS], real,
    )  # fmt: skip
    for policy in ("direct", "fcfs", "oracle-sjf"):
        sim = replay(policy, requests, cost).completions
        assert {c.request_id: c.output_tokens for c in sim} == {
            c.request_id: c.output_tokens for c in real
        }
    # oracle-sjf reorders through the gateway and vLLM's priority: a lower mean than direct
    mean = {p: replay(p, requests, cost).summary.mean_rt_s for p in ("direct", "oracle-sjf")}
    assert mean["oracle-sjf"] < mean["direct"]


def test_replaying_a_replay_is_exact_and_repeats_pool():
    cost = engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=4)
    requests = replay_requests(
        [r.id for r in REQUESTS], [r.prompt for r in REQUESTS], PROMPT_TOKENS,
        [r.arrival_s for r in REQUESTS], [r.deadline_s for r in REQUESTS], fake_real(1.0),
    )  # fmt: skip
    sim_run = replay("fcfs", requests, cost).completions
    figures = compare_on_engine(
        REQUESTS, PROMPT_TOKENS, {"fcfs": [sim_run, sim_run]}, max_num_seqs=4
    )["fcfs"]
    assert figures["n"] == 80
    assert figures["mean_rt_ratio_sim_over_real"] == pytest.approx(1.0)
    assert figures["spearman"] == pytest.approx(1.0)
    assert figures["profile"] == "vllm-cpu-smollm2-135m" and figures["sim_preemptions"] == 0


def test_a_profile_without_an_engine_cannot_replay_vllm():
    with pytest.raises(ValueError, match="no engine block"):
        engine_profile(StepCost.default(), max_num_seqs=4)


def test_serve_bench_vllm_compare_sim_reports_each_policy(capsys):
    import argparse

    from rtlm_adapt.data import PromptSample
    from rtlm_adapt.engines.vllm_replay import compare_sim

    chosen = [
        PromptSample(r.id, r.prompt, 10, t, "t")
        for r, t in zip(REQUESTS, PROMPT_TOKENS, strict=True)
    ]
    args = argparse.Namespace(profile="auto", max_num_seqs=4)
    figures = compare_sim(
        args, REQUESTS, chosen, {"direct": [fake_real(2.0)], "fcfs": [fake_real(2.0)]}
    )
    assert set(figures) == {"direct", "fcfs"}
    assert all(f["n"] == 40 and f["profile"] == "vllm-cpu-smollm2-135m" for f in figures.values())
    assert "fidelity direct" in capsys.readouterr().err


def test_vllm_preemption_count_is_nan_when_metrics_do_not_answer():
    import math

    from rtlm_adapt.engines.vllm_server import VLLMServer, free_port

    server = VLLMServer(port=free_port())  # not started: nothing listens there
    assert math.isnan(server.preemptions(timeout=1.0))


def test_the_replay_gets_the_real_servers_kv_cache_less_the_null_block():
    cost = StepCost.load("vllm-cpu-smollm2-135m")
    small = engine_profile(cost, max_num_seqs=16, kv_blocks=24, block_size=128)
    assert small.engine.kv_cache_tokens == 23 * 128 and small.engine.block_size == 128
    assert small.engine.num_blocks == 23
    # no KV figures: the profile's own cache
    assert engine_profile(cost, max_num_seqs=16).engine.kv_cache_tokens == 93_184
    with pytest.raises(ValueError, match="both kv_blocks and block_size"):
        engine_profile(cost, max_num_seqs=16, kv_blocks=24)
    with pytest.raises(ValueError, match=">= 2 blocks"):
        engine_profile(cost, max_num_seqs=16, kv_blocks=1, block_size=128)


def test_compare_sim_replays_on_the_servers_kv_cache_and_preempts_when_it_is_small():
    import argparse

    from rtlm_adapt.data import PromptSample
    from rtlm_adapt.engines.vllm_bench import kv_cache_figures
    from rtlm_adapt.engines.vllm_replay import compare_sim

    chosen = [
        PromptSample(r.id, r.prompt, 10, t, "t")
        for r, t in zip(REQUESTS, PROMPT_TOKENS, strict=True)
    ]
    args = argparse.Namespace(profile="auto", max_num_seqs=16)
    kv = kv_cache_figures({"num_gpu_blocks": "6", "block_size": "64"})
    figures = compare_sim(args, REQUESTS, chosen, {"fcfs": [fake_real(2.0)]}, kv)["fcfs"]
    assert figures["sim_kv_cache_tokens"] == 5 * 64 and figures["sim_block_size"] == 64
    assert figures["sim_preemptions"] > 0
    assert figures["sim_template_tokens"] == 30  # SmolLM2's chat template holds KV too


def test_kv_blocks_is_checked_before_vllm_starts(capsys):
    from rtlm_adapt.cli import main
    from rtlm_adapt.engines.vllm_server import VLLMServer

    assert "--num-gpu-blocks-override" in VLLMServer(kv_blocks=20, port=1).command("m")
    assert "--num-gpu-blocks-override" not in VLLMServer(port=1).command("m")
    with pytest.raises(ValueError, match="kv_blocks must be an int >= 2"):
        VLLMServer(kv_blocks=1)
    with pytest.raises(SystemExit):
        main(["serve-bench", "--engine", "vllm", "--kv-blocks", "1"])
    assert "--kv-blocks: expected an integer >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--kv-blocks sizes vLLM's KV cache: it needs --engine"):
        main(["serve-bench", "--kv-blocks", "20"])


def test_an_inflight_cap_above_the_seats_moves_the_wait_into_the_engine():
    # 40 requests 0.4 s apart of up to 200 tokens at ~32 ms a step: 4 seats queue them
    fake = [[Completion(c.request_id, c.output_tokens, c.arrival_time, c.arrival_time,
                        c.finish_time, "vllm") for c in fake_real(1.0)]]  # fmt: skip
    figures = {
        cap: compare_on_engine(
            REQUESTS, PROMPT_TOKENS, {"fcfs": fake}, max_num_seqs=4, max_inflight=cap
        )["fcfs"]
        for cap in (4, 8)
    }
    # the gateway's queue shrinks, and the replay's real side (start = arrival here) is 0
    assert figures[8]["sim_mean_queue_s"] < figures[4]["sim_mean_queue_s"]
    assert figures[4]["real_mean_queue_s"] == 0.0
    # FCFS in both queues: the same order, the same response times
    assert figures[8]["sim_mean_rt_s"] == pytest.approx(figures[4]["sim_mean_rt_s"], rel=0.02)
    with pytest.raises(ValueError, match="max_inflight must be >= 1"):
        engine_profile(StepCost.load("vllm-cpu-smollm2-135m"), max_num_seqs=4, max_inflight=0)


def test_max_inflight_is_checked_before_vllm_starts():
    from rtlm_adapt.cli import main

    with pytest.raises(SystemExit, match="--max-inflight is the gateway's cap: it needs --engine"):
        main(["serve-bench", "--max-inflight", "6"])


def test_compare_sim_replays_on_a_profile_fitted_to_the_runs_own_probe():
    import argparse

    from rtlm_adapt.data import PromptSample
    from rtlm_adapt.engines.vllm_replay import compare_sim, probe_fitted_profile

    chosen = [
        PromptSample(r.id, r.prompt, 10, t, "t")
        for r, t in zip(REQUESTS, PROMPT_TOKENS, strict=True)
    ]
    args = argparse.Namespace(profile="auto", max_num_seqs=4)

    def probe(tokens_per_s: float, alone_s_per_token: float = 0.032) -> dict:
        capacity = {"alone_s_per_token": alone_s_per_token, "tokens_per_s": tokens_per_s}
        return {"max_num_seqs": 4, "max_tokens": 512, "capacity": capacity}

    fast = probe_fitted_profile(probe(120.0), chosen, args)
    slow = probe_fitted_profile(probe(60.0), chosen, args)
    assert fast.name == slow.name == "probe-fit" and fast.engine.max_num_seqs == 4
    runs = {"fcfs": [fake_real(2.0)]}
    on_fast = compare_sim(args, REQUESTS, chosen, runs, profile=fast)["fcfs"]
    on_slow = compare_sim(args, REQUESTS, chosen, runs, profile=slow)["fcfs"]
    assert on_fast["profile"] == "probe-fit"
    # a probe that measured half the rate makes a slower engine, so the replay waits longer
    assert on_slow["sim_mean_rt_s"] > 1.1 * on_fast["sim_mean_rt_s"]
    # a request alone far slower than the saturated rate allows: no positive costs solve it
    assert probe_fitted_profile(probe(120.0, alone_s_per_token=0.1), chosen, args) is None


def test_compare_sim_at_the_runs_pace_slows_the_profile_until_the_replay_keeps_it():
    import argparse

    from rtlm_adapt.data import PromptSample
    from rtlm_adapt.engines.vllm_replay import compare_sim

    chosen = [
        PromptSample(r.id, r.prompt, 10, t, "t")
        for r, t in zip(REQUESTS, PROMPT_TOKENS, strict=True)
    ]
    args = argparse.Namespace(profile="auto", max_num_seqs=4)

    def paced_real(s_per_token: float) -> list[Completion]:
        return [
            dataclasses.replace(
                c, first_token_time=c.finish_time - s_per_token * (c.output_tokens - 1))
            for c in fake_real(20.0)
        ]  # fmt: skip

    at_profile = compare_sim(args, REQUESTS, chosen, {"fcfs": [paced_real(0.064)]})["fcfs"]
    matched = compare_sim(args, REQUESTS, chosen, {"fcfs": [paced_real(0.064)]},
                          match_pace=True)["fcfs"]  # fmt: skip
    assert at_profile["real_decode_s_per_token"] == pytest.approx(0.064)
    # the packaged profile runs about 32 ms a token; matched, the replay runs the real pace
    assert at_profile["sim_decode_s_per_token"] < 0.045
    assert matched["sim_decode_s_per_token"] == pytest.approx(0.064, rel=0.03)
    assert matched["profile"] == "vllm-cpu-smollm2-135m at the run's pace"
    assert matched["sim_mean_rt_s"] > 1.5 * at_profile["sim_mean_rt_s"]
    with pytest.raises(ValueError, match="pace is unknown"):  # no first-token times
        compare_sim(args, REQUESTS, chosen, {"fcfs": [fake_real(2.0)]}, match_pace=True)
