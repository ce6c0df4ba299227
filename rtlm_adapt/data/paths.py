"""Where the data lives: the shared data folder (AlpacaEval outputs, the Azure trace) and the
cache of converted tokenizers and token counts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "find_data_dir"]


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
