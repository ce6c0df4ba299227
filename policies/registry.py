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


#: The learned policy's names, before an optional ``:PATH``.
PPO_NAMES = ("ppo", "ppo-unguarded", "ppo-interleaved")


def _ppo(name: str, base: str, path: str | None) -> Policy:
    """``ppo``: the packaged model; ``ppo:PATH``: a trained one; both guarded by shadow
    replays (the guard hands the knobs back to the heuristic when the learned policy does
    worse on the same requests). ``ppo-unguarded``: without a guard; ``ppo-interleaved``: with
    the guard that lets the heuristic serve trials instead (it needs no controller)."""
    from .ppo import PACKAGED_MODEL, PPOPolicy
    from .ppo_guard import PerformanceGuard

    if path == "":
        raise ValueError(f"policy {name!r}: give a model path after the colon, or drop it")
    guards = {"ppo-unguarded": {"guard": None}, "ppo-interleaved": {"guard": PerformanceGuard()}}
    return PPOPolicy.load(path or PACKAGED_MODEL, name=name, **guards.get(base, {}))


def make_policy(name: str) -> Policy:
    """Build a policy from its command-line name."""
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a string, got {type(name).__name__}")
    base, colon, path = name.partition(":")
    if base in PPO_NAMES:
        return _ppo(name, base, path if colon else None)
    base, _, suffix = name.partition("+")
    if base not in POLICIES or suffix not in ("", "oracle"):
        known = ", ".join(sorted(POLICIES))
        raise ValueError(
            f"unknown policy {name!r}; known: {known} (append +oracle to rank by true lengths, "
            "ppo (the packaged model), ppo:PATH, ppo-unguarded[:PATH] without the guard, or "
            "ppo-interleaved[:PATH] with the interleaved-trials guard)"
        )
    policy = POLICIES[base]()
    if suffix == "oracle":
        policy.length_source = "oracle"
        policy.name = name
    return policy
