"""Real executors by model name: what serve-bench, ``rtlm-adapt profile`` and the RL environment
build their :class:`~rtlm_adapt.serving.hf.HFExecutor` with.

A model is ``tiny`` (a random tiny Llama, for tests), ``smollm2`` (the packaged default, with
measured profiles in ``rtlm_adapt/calibration/profiles/``), a local folder or a hub id.
:func:`check_model` says at once, without loading torch, when a name can load from nowhere: a
hub id on a machine that cannot reach the hub would otherwise cost a minute of retries.

>>> check_model("tiny")
>>> check_model("/no/such/folder")
Traceback (most recent call last):
...
FileNotFoundError: model '/no/such/folder': no such folder
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

#: ``--model`` names that are not paths or hub ids, with their packaged (primary, secondary)
#: cost profiles.
PACKAGED_PROFILES = {"smollm2": ("smollm2-135m-cpu2-hf", "smollm2-135m-cpu2-hf-secondary")}

#: Names built in code rather than loaded.
BUILT_IN_MODELS = ("tiny", *PACKAGED_PROFILES)


def _looks_like_a_path(name: str) -> bool:
    """A name only a local folder can mean (a hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_model(model: str) -> None:
    """Raise ``FileNotFoundError`` (one line) where ``model`` cannot be loaded from anywhere.

    Cheap: no torch; at most one connection attempt to the hub, only for a name that is neither
    built in, a local folder nor in the local hub cache.
    """
    if model in BUILT_IN_MODELS or Path(model).expanduser().is_dir():
        return
    if _looks_like_a_path(model):
        raise FileNotFoundError(f"model {model!r}: no such folder")
    if _in_hub_cache(model):
        return
    if not _hub_reachable():
        raise FileNotFoundError(
            f"model {model!r}: not {', '.join(map(repr, BUILT_IN_MODELS))}, not a local folder, "
            "not in the hub cache, and the hub cannot be reached (offline)"
        )


def load_executor(model: str, *, name: str = "primary", max_batch_size: int = 8, **kwargs: Any):
    """An HFExecutor for ``model`` (see the module doc), checked first with :func:`check_model`."""
    check_model(model)
    from rtlm_adapt.serving.hf import HFExecutor

    if model == "tiny":
        return HFExecutor.tiny_random(name=name, max_batch_size=max_batch_size, **kwargs)
    try:
        return HFExecutor.from_pretrained(model, name=name, max_batch_size=max_batch_size, **kwargs)
    except OSError as exc:  # transformers' "not found / cannot connect", several lines long
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"model {model!r}: {first_line}") from exc


def sibling_executor(executor, *, name: str, max_batch_size: int):
    """A second executor sharing ``executor``'s weights (read-only) with its own KV caches and
    its own tokenizer copy (tokenizers are not safe to share across threads)."""
    return type(executor)(
        executor.model,
        copy.deepcopy(executor.tokenizer),
        name=name,
        max_batch_size=max_batch_size,
        device=executor.device,
        dtype=executor.dtype,
        max_context=executor.max_context,
    )


def warm_up(primary, secondary, threads: dict[str, int]) -> None:
    """A few short requests on each executor (first calls allocate and tune), each on its own
    torch thread count; the primary's count is left set."""
    import torch

    from rtlm_adapt.request import Request

    for ex in (primary, secondary):
        if ex is None:
            continue
        torch.set_num_threads(threads.get(ex.name, torch.get_num_threads()))
        ex.admit(
            [
                Request(f"warm-{ex.name}-{i}", "Hello there!" * (i + 1), 0.0, max_tokens=4)
                for i in range(min(2, ex.max_batch_size))
            ],
            0.0,
        )
        while ex.running():
            ex.step(0.0)
    torch.set_num_threads(threads["primary"])
