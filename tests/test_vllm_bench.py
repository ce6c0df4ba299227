"""serve-bench --engine vllm's client side, against the paced backend (no vLLM needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")

from rtlm_adapt.data import PromptSample  # noqa: E402
from rtlm_adapt.engines.gateway_process import (  # noqa: E402
    MetricsTimeline,
    gateway_figures,
)
from rtlm_adapt.engines.vllm_bench import (  # noqa: E402
    BenchRequest,
    GatewayAnswer,
    build_requests,
    measure_capacity,
    policy_json,
    replay,
)
from rtlm_adapt.gateway.app import create_app  # noqa: E402
from rtlm_adapt.gateway.config import BackendConfig, GatewayConfig  # noqa: E402
from rtlm_adapt.gateway.paced_backend import create_app as paced_app  # noqa: E402
from rtlm_adapt.gateway.server_thread import ServerThread  # noqa: E402


def samples(n: int) -> list[PromptSample]:
    return [
        PromptSample(
            id=str(i),
            prompt=f"Question number {i}?",
            prompt_tokens=4,
            response_tokens=3 + i,
            source="test",
        )
        for i in range(n)
    ]


def test_build_requests_carries_lengths_arrivals_and_deadlines():
    chosen = samples(6)
    lengths = [s.response_tokens for s in chosen]
    requests = build_requests(
        chosen, lengths, rate=2.0, arrivals="poisson", seed=0, slo="1:3",
        mean_service_s=1.5, max_tokens=64, dataset_lengths=True,
    )  # fmt: skip
    assert [r.max_tokens for r in requests] == lengths
    assert all(r.deadline_s == pytest.approx(r.arrival_s + 4.5) for r in requests)
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    model_lengths = build_requests(
        chosen, lengths, rate=2.0, arrivals="poisson", seed=0, slo="1:3",
        mean_service_s=1.5, max_tokens=64, dataset_lengths=False,
    )  # fmt: skip
    assert {r.max_tokens for r in model_lengths} == {64}
    assert [r.true_tokens for r in model_lengths] == lengths


def test_replay_direct_and_through_the_gateway():
    requests = [
        BenchRequest(str(i), f"Say {i} words.", arrival_s=0.02 * i, deadline_s=0.02 * i + 5,
                     max_tokens=4 + i, true_tokens=4 + i)
        for i in range(6)
    ]  # fmt: skip
    with ServerThread(paced_app(tokens_per_s=2000.0, max_concurrency=2)) as backend:
        direct = asyncio.run(replay(backend.url, "paced", requests, ignore_eos=True, oracle=False))
        config = GatewayConfig(backends=(BackendConfig(backend.url, send_priority=True),))
        with ServerThread(create_app(config)) as gateway:
            answers: dict[str, GatewayAnswer] = {}
            via = asyncio.run(
                replay(
                    gateway.url, "paced", requests, ignore_eos=True, oracle=True, answers=answers
                )
            )
            metrics = asyncio.run(_get(gateway.url + "/metrics"))
        capacity = asyncio.run(
            measure_capacity(backend.url, "paced", samples(8), slots=2, n=8, max_tokens=64)
        )
    for run in (direct, via):
        assert [c.output_tokens for c in run] == [r.max_tokens for r in requests]
        assert all(c.ok and c.first_token_time is not None for c in run)
        assert all(c.deadline == pytest.approx(c.arrival_time + 5) for c in run)
    shape = policy_json([direct, via])
    for key in ("mean_rt_s", "p50_rt_s", "p99_rt_s", "ttft_p50_s", "ttft_p99_s"):
        assert shape[key] > 0
    assert shape["completed"] == 2 * len(requests) and shape["failed"] == 0
    # paced at 2,000 tokens/s: 0.5 ms per token (in ms, not s: seconds would read 0.0005). On
    # a loaded machine the client can see the first token late and the rest in a burst, which
    # shortens the measured span (0.43 and 0.449 in two CI runs), or add tens of ms to it.
    assert 0.25 <= shape["decode_ms_per_token"] < 200
    one = policy_json([direct])["throughput_rps"]
    assert shape["throughput_rps"] < 2 * one  # repeats are averaged, not pooled
    figures = gateway_figures(metrics)
    assert figures["requests"]['outcome="completed",reason=""'] == len(requests)
    assert figures["knobs"]["length_weight"] == 1.0
    assert capacity["requests"] == 8 and capacity["tokens_per_s"] > 0
    # the gateway's decisions, read from its answers: every request's, the admission time with it
    assert sorted(answers, key=int) == [r.id for r in requests]
    assert all(a.predicted_tokens > 0 and a.queue_ms >= 0 for a in answers.values())
    for c in via:
        assert c.start_time == pytest.approx(c.arrival_time + answers[c.request_id].queue_ms / 1000)
    assert all(c.start_time == c.arrival_time for c in direct)  # no gateway, no queue header


def test_capacity_counts_the_saturated_stretch_not_the_drain():
    # Two slots at 400 tokens/s each: capacity is 800 tokens/s. A heavy tail (the long answer,
    # taken last as the loop pops from the end) makes a whole-run count fall well short: the
    # long answer runs alone at the end.
    lengths = [400] + [20] * 23
    work = [
        PromptSample(str(i), f"Question {i}?", prompt_tokens=3, response_tokens=n, source="test")
        for i, n in enumerate(lengths)
    ]
    with ServerThread(paced_app(tokens_per_s=400.0, max_concurrency=2)) as backend:
        capacity = asyncio.run(
            measure_capacity(backend.url, "paced", work, slots=2, n=len(work), max_tokens=512)
        )
    whole_run = sum(lengths) / capacity["seconds"]
    assert capacity["tokens_per_s"] == pytest.approx(800.0, rel=0.15)
    assert whole_run < 0.8 * 800.0
    with pytest.raises(ValueError, match="3 \\* slots"):
        asyncio.run(measure_capacity(backend.url, "paced", work, slots=4, n=8, max_tokens=64))


def test_metrics_timeline_samples_queue_and_batch_cap():
    states = iter([(3, 4), (7, 2), (0, 4)])

    def read() -> str:
        queue, cap = next(states, (0, 4))
        return f'rtlm_queue_length {queue}.0\nrtlm_knob{{name="max_batch_size"}} {cap}.0\n'

    timeline = MetricsTimeline(read, 0.01)
    deadline = time.monotonic() + 5
    while len(timeline.queue_length) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = timeline.stop()
    assert summary["queue_length"][:3] == [3.0, 7.0, 0.0]
    assert summary["max_batch_size_min"] == 2.0
    assert summary["queue_length_max"] == 7.0


async def _get(url: str) -> str:
    import httpx

    async with httpx.AsyncClient() as client:
        return (await client.get(url)).text


def test_unwritable_json_fails_before_vllm_starts(monkeypatch, tmp_path, capsys):
    from rtlm_adapt.cli import main
    from rtlm_adapt.engines import vllm_server

    def never_starts(*_args, **_kwargs):
        raise AssertionError("vLLM was started before --json was checked")

    monkeypatch.setattr(vllm_server.VLLMServer, "__init__", never_starts)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Say hi.", "output": "Hi there."}\n')
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "bench.json"  # its "folder" is a file
    args = ["serve-bench", "--engine", "vllm", "--prompts", str(prompts), "--tokenizer", "words"]
    assert main([*args, "--json", str(out)]) == 2
    assert f"--json {out}: cannot create its folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "policies, message",
    [("direct,heuristic@bert", "tier must be lexical, encoder"), ("nosuch@encoder", "nosuch")],
)
def test_a_bad_policy_or_tier_fails_before_vllm_starts(
    monkeypatch, tmp_path, capsys, policies, message
):
    from rtlm_adapt.cli import main
    from rtlm_adapt.engines import vllm_server

    def never_starts(*_args, **_kwargs):
        raise AssertionError("vLLM was started before the policies were checked")

    monkeypatch.setattr(vllm_server.VLLMServer, "__init__", never_starts)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Say hi.", "output": "Hi there."}\n')
    args = ["serve-bench", "--engine", "vllm", "--prompts", str(prompts), "--tokenizer", "words"]
    assert main([*args, "--policies", policies]) == 2
    assert message in capsys.readouterr().err
