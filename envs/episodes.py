"""Episodes from real traces: a window of Azure arrivals, real prompts with real response lengths.

:class:`EpisodeSampler` draws one :class:`~rtlm_adapt.experiment.Workload` per episode: a load
from a range, a window of consecutive arrivals from a slice of the trace (so training and
evaluation can use disjoint parts of it), prompts from a dataset, and deadlines from an SLO mix —
the same ingredients as :func:`rtlm_adapt.experiment.build_workload`, with the window under
control. It imports no gymnasium: the benchmarks use it to replay the evaluation windows through
the ordinary :func:`~rtlm_adapt.experiment.run_policy`.

Loaded prompt sets, their uncertainty features and the trace are cached per process, so drawing
an episode costs milliseconds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.data import (
    DEFAULT_SLO,
    AzureTrace,
    PromptSample,
    assign_deadlines,
    build_requests,
    find_data_dir,
    load_azure_trace,
    load_prompts,
    make_arrivals,
    trace_arrivals,
)
from rtlm_adapt.experiment import Workload, capacity_rps, mean_isolated_service_s
from rtlm_adapt.uncertainty import UncertaintyScorer

TRACES = ("azure-conv", "azure-code")


@functools.lru_cache(maxsize=8)
def cached_prompts(name: str, limit: int | None = None, seed: int = 0) -> tuple[PromptSample, ...]:
    """``load_prompts(name, limit, seed)``, loaded once per process (tokenising is slow)."""
    return tuple(load_prompts(name, limit=limit, seed=seed))


@functools.lru_cache(maxsize=4)
def cached_trace(name: str) -> AzureTrace:
    """The shared Azure trace ``azure-conv`` or ``azure-code``, parsed once per process."""
    kind = name.removeprefix("azure-")
    folder = find_data_dir() / "azure_llm_trace_2023"
    return load_azure_trace(folder / f"AzureLLMInferenceTrace_{kind}.csv")


class CachedScorer:
    """An :class:`UncertaintyScorer` that memoises features per prompt text.

    Episodes replay the same few thousand prompts over and over; scoring each once saves most of
    the per-request cost. ``features`` returns a fresh dict (the controller adds to it).
    """

    def __init__(self, scorer: UncertaintyScorer | None = None) -> None:
        self.scorer = scorer or UncertaintyScorer()
        self._cache: dict[str, dict[str, float]] = {}

    def features(self, prompt: str) -> dict[str, float]:
        cached = self._cache.get(prompt)
        if cached is None:
            cached = self._cache[prompt] = self.scorer.features(prompt)
        return dict(cached)

    def score(self, features: dict[str, float]) -> float:
        return self.scorer.score(features)


@functools.lru_cache(maxsize=1)
def shared_scorer() -> CachedScorer:
    """One memoising scorer per process, shared by every environment and evaluation."""
    return CachedScorer()


class EpisodeSampler:
    """Draws episode workloads from real traces.

    Parameters
    ----------
    prompts
        Prompt set for :func:`rtlm_adapt.data.load_prompts` (``"alpaca:MODEL"``,
        ``"sharegpt"``, or a file), or a sequence of :class:`PromptSample`.
    arrivals
        ``"azure-conv"`` or ``"azure-code"`` (windows of the real trace), or any other
        :func:`~rtlm_adapt.data.make_arrivals` spec (``"poisson"``, ``"gamma:2"``).
    load
        Offered load (arrival rate over the primary's capacity), a number or a ``(low, high)``
        range drawn uniformly per episode.
    n_requests
        Requests per episode.
    trace_slice
        Fraction ``(start, end)`` of the trace that window starts are drawn from; give training
        and evaluation disjoint slices so evaluation windows are unseen.
    slo
        Deadline mix (see :func:`rtlm_adapt.data.assign_deadlines`).
    cost
        The primary's cost profile (capacity and the mean service time come from it).
    prompt_limit
        For ShareGPT: how many prompts to sample (default 2000).
    """

    def __init__(
        self,
        prompts: str | Sequence[PromptSample] = "alpaca:gpt4_1106_preview",
        *,
        arrivals: str = "azure-conv",
        load: float | tuple[float, float] = (0.6, 1.1),
        n_requests: int = 100,
        trace_slice: tuple[float, float] = (0.0, 0.8),
        slo: str = DEFAULT_SLO,
        cost: StepCost | None = None,
        prompt_limit: int | None = None,
    ) -> None:
        if isinstance(prompts, str):
            limit = prompt_limit
            if limit is None and prompts == "sharegpt":
                limit = 2000  # a sample: all 61k pairs take minutes to tokenise
            self.samples: Sequence[PromptSample] = cached_prompts(prompts, limit)
            self.prompts_name = prompts
        else:
            self.samples = tuple(prompts)
            self.prompts_name = "custom"
        if not self.samples:
            raise ValueError("EpisodeSampler needs at least one prompt sample")
        low, high = (load, load) if isinstance(load, (int, float)) else load
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"load must be a positive number or a (low, high) range, got {load!r}")
        if not isinstance(n_requests, int) or n_requests < 2:
            raise ValueError(f"n_requests must be an int >= 2, got {n_requests!r}")
        start, end = trace_slice
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"trace_slice must satisfy 0 <= start < end <= 1, got {trace_slice!r}")
        self.arrivals = arrivals
        self.load_range = (float(low), float(high))
        self.n_requests = n_requests
        self.trace_slice = (float(start), float(end))
        self.slo = slo
        self.cost = cost or StepCost.default()
        self.trace = cached_trace(arrivals) if arrivals in TRACES else None
        if self.trace is not None:
            self._first, self._last = self._window_range()
        else:
            make_arrivals(arrivals, 2, 1.0, 0)  # fail fast on a bad spec, before any episode

    def _window_range(self) -> tuple[int, int]:
        assert self.trace is not None
        n_trace = len(self.trace)
        first = int(self.trace_slice[0] * n_trace)
        last = int(self.trace_slice[1] * n_trace) - self.n_requests
        if last < first:
            raise ValueError(
                f"the trace slice {self.trace_slice} of {self.arrivals} holds fewer than "
                f"{self.n_requests} arrivals"
            )
        return first, last

    def sample(
        self, rng: np.random.Generator, load: float | None = None, cost: StepCost | None = None
    ) -> Workload:
        """One episode's workload, drawn with ``rng`` (same generator state, same workload).

        ``cost`` replaces the primary's profile for this episode (e.g. another batch cap): the
        rate follows its capacity."""
        n = self.n_requests
        cost = cost or self.cost
        if load is None:
            low, high = self.load_range
            load = float(rng.uniform(low, high)) if high > low else low
        idx = rng.choice(len(self.samples), size=n, replace=n > len(self.samples))
        chosen = [self.samples[i] for i in idx]
        cap = capacity_rps(cost, chosen, cost.max_batch_size)
        rate = load * cap
        arrival_seed = int(rng.integers(2**31))
        if self.trace is not None:
            offset = int(rng.integers(self._first, self._last + 1))
            times = trace_arrivals(self.trace, n, rate, offset=offset)
            where = f"{self.arrivals}[{offset}:{offset + n}]"
        else:
            times = make_arrivals(self.arrivals, n, rate, arrival_seed)
            where = f"{self.arrivals} (seed {arrival_seed})"
        mean_svc = mean_isolated_service_s(cost, chosen)
        deadlines = assign_deadlines(times, mean_svc, seed=rng, slo=self.slo)
        requests = build_requests(chosen, times, deadlines)
        requests = [replace(r, id=f"{i}:{r.metadata['sample_id']}") for i, r in enumerate(requests)]
        desc = (
            f"{n} requests of {self.prompts_name}, arrivals {where} at load {load:.3f} "
            f"({rate:.4f} req/s of {cap:.4f}), mean isolated service {mean_svc:.2f}s"
        )
        return Workload(requests, rate, load, mean_svc, cap, desc)
