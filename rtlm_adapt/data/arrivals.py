"""Arrival times: Poisson, bursty gamma, or a rescaled window of the Azure LLM inference trace."""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtlm_adapt.data.paths import find_data_dir

__all__ = [
    "DEFAULT_GAMMA_CV",
    "AzureTrace",
    "gamma_arrivals",
    "load_azure_trace",
    "make_arrivals",
    "poisson_arrivals",
    "trace_arrivals",
]

#: Coefficient of variation of ``make_arrivals("gamma")`` when no CV is given.
DEFAULT_GAMMA_CV = 2.0


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
