"""Policy names, as used on the command line.

``make_policy("heuristic+oracle")`` runs the heuristic on true lengths instead of predictions,
which isolates the scheduling mechanism from the predictor.

>>> make_policy("fcfs").name
'fcfs'
>>> make_policy("heuristic+oracle").length_source
'oracle'
>>> make_policy("lifo")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown policy 'lifo'; known: fcfs, heuristic, heuristic-local, oracle-sjf, sjf, ...
"""

from __future__ import annotations

from collections.abc import Callable

from rtlm_adapt.knobs import Policy

from .baselines import fcfs, oracle_sjf, sjf_predicted, sjf_prompt
from .heuristic import RTLMHeuristic

POLICIES: dict[str, Callable[[], Policy]] = {
    "fcfs": fcfs,
    "sjf-prompt": sjf_prompt,
    "oracle-sjf": oracle_sjf,
    "sjf": sjf_predicted,
    "heuristic": RTLMHeuristic,
    # the heuristic without a secondary executor: same hardware as the baselines
    "heuristic-local": lambda: RTLMHeuristic(name="heuristic-local", offload=False),
}


def make_policy(name: str) -> Policy:
    """Build a policy from its command-line name."""
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {type(name).__name__}")
    if name.startswith("ppo:"):
        from .ppo import PPOPolicy

        return PPOPolicy.load(name[len("ppo:") :])
    base, _, suffix = name.partition("+")
    if base not in POLICIES or suffix not in ("", "oracle"):
        known = ", ".join(sorted(POLICIES))
        raise ValueError(
            f"unknown policy {name!r}; known: {known} (append +oracle to rank by true lengths, "
            "or ppo:PATH)"
        )
    policy = POLICIES[base]()
    if suffix == "oracle":
        policy.length_source = "oracle"
        policy.name = name
    return policy
