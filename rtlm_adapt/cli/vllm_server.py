"""``rtlm-adapt vllm-server``: start a vLLM server (the packaged SmolLM2 by default)."""

from __future__ import annotations

import argparse

from rtlm_adapt.engines.vllm_server import add_arguments, run_from_args

HELP = "start a vLLM server (the packaged SmolLM2 by default; needs [vllm])"

__all__ = ["HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    return run_from_args(args)
