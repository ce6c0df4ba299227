"""A workload's requests: prompt samples zipped with arrival times and deadlines.

Deadlines follow a service-level mix drawn independently of the length, so that a scheduler
cannot read the length off the deadline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rtlm_adapt.data.datasets import PromptSample
from rtlm_adapt.request import TRUE_LENGTH_KEY, Request

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SLO",
    "assign_deadlines",
    "build_requests",
    "parse_slo",
]

#: Default cap on generated tokens per request (raised to the true length where that is longer,
#: so a benchmark's real response always fits).
DEFAULT_MAX_TOKENS = 4096
#: Default service-level mix: 70% of requests get 2x the mean service time, 30% get 10x.
DEFAULT_SLO = "0.7:2,0.3:10"


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
