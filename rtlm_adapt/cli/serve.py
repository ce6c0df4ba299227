"""``rtlm-adapt serve``: the OpenAI-compatible scheduling gateway (rtlm_adapt.gateway)."""

from __future__ import annotations

import argparse

from rtlm_adapt.gateway.cli import add_arguments, run_from_args

HELP = (
    "the OpenAI-compatible scheduling gateway in front of vLLM or other servers (needs [gateway])"
)

__all__ = ["HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    return run_from_args(args)
