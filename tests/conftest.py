"""Shared fixtures: paths to the real data, small request factories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rtlm_adapt.request import TRUE_LENGTH_KEY, Request

ROOT = Path(__file__).resolve().parents[1]
#: Short prompts of varied shape, for tests that run a model on a few.
PROMPTS = [
    "Name one prime.",
    "Write a haiku about the sea and the wind.",
    "Why is the sky blue?",
    "List three colours, then explain which one you like best and why.",
    "Hello",
]


def data_dir() -> Path | None:
    env = os.environ.get("RTLM_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture
def alpaca_file() -> Path:
    d = data_dir()
    path = d / "alpaca_eval" / "gpt4_1106_preview.jsonl.gz" if d else None
    if path is None or not path.exists():
        pytest.skip("the AlpacaEval data (../shared/data/alpaca_eval) is not present")
    return path


@pytest.fixture
def azure_conv() -> Path:
    d = data_dir()
    path = d / "azure_llm_trace_2023" / "AzureLLMInferenceTrace_conv.csv" if d else None
    if path is None or not path.exists():
        pytest.skip("the Azure trace (../shared/data/azure_llm_trace_2023) is not present")
    return path


def make_request(
    rid: str,
    arrival: float,
    length: int,
    prompt: str = "Explain why the sky is blue.",
    deadline: float | None = None,
    prompt_tokens: int = 16,
) -> Request:
    return Request(
        id=rid,
        prompt=prompt,
        arrival_time=arrival,
        deadline=deadline,
        max_tokens=4096,
        prompt_tokens=prompt_tokens,
        metadata={TRUE_LENGTH_KEY: length},
    )


def alpaca_samples(model: str):
    """One AlpacaEval model's prompts with real lengths (SmolLM2 tokens); skips without data."""
    from rtlm_adapt.data import TokenCounter, find_data_dir, load_alpaca_eval

    try:
        path = find_data_dir() / "alpaca_eval" / f"{model}.jsonl.gz"
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"no shared data folder: {exc}")
    if not path.is_file():
        pytest.skip(f"no AlpacaEval outputs at {path}")
    return load_alpaca_eval(path, tokenizer=TokenCounter.default())
