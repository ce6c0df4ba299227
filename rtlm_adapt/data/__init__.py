"""Benchmark data: real prompts with real response lengths, arrival processes, deadlines.

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

from rtlm_adapt.data.arrivals import (
    DEFAULT_GAMMA_CV,
    AzureTrace,
    gamma_arrivals,
    load_azure_trace,
    make_arrivals,
    poisson_arrivals,
    trace_arrivals,
)
from rtlm_adapt.data.datasets import (
    PromptSample,
    alpaca_models,
    load_alpaca_eval,
    load_prompts,
    load_sharegpt,
)
from rtlm_adapt.data.paths import cache_dir, find_data_dir
from rtlm_adapt.data.tokens import TokenCounter
from rtlm_adapt.data.workloads import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_SLO,
    assign_deadlines,
    build_requests,
    parse_slo,
)

__all__ = [
    "DEFAULT_GAMMA_CV",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SLO",
    "AzureTrace",
    "PromptSample",
    "TokenCounter",
    "alpaca_models",
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
