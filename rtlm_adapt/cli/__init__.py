"""The ``rtlm-adapt`` command line.

One module per command (``add_arguments`` and ``run``):

- ``simulate``: run policies on the same real workload through the simulated executors and print
  one table (``--json PATH`` writes the figures).
- ``predict-eval``: the length predictor's quality on a prompt set.
- ``train``: train the PPO knob policy.
- ``profile``: measure a real executor (``--model smollm2|tiny|PATH``), or fit the steps of a
  serve-bench run (``--from-run RUN.json``), write a JSON cost profile.
- ``serve-bench``: the same policies on the REAL executor in real time (rtlm_adapt.serve_bench);
  ``--compare-sim`` adds the simulator's fidelity on the same requests and real lengths.
- ``serve``: the OpenAI-compatible scheduling gateway (rtlm_adapt.gateway).
- ``vllm-server``: start a vLLM server with the packaged SmolLM2 (rtlm_adapt.engines).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from rtlm_adapt.cli import predict_eval, profile, serve, serve_bench, simulate, train, vllm_server

#: Command name -> its module (``HELP``, ``add_arguments(parser)``, ``run(args)``), in help order.
COMMANDS: dict[str, ModuleType] = {
    "simulate": simulate,
    "predict-eval": predict_eval,
    "train": train,
    "profile": profile,
    "serve-bench": serve_bench,
    "serve": serve,
    "vllm-server": vllm_server,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``rtlm-adapt`` parser, one subcommand per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="rtlm-adapt",
        description="Uncertainty-aware, online-learning scheduling for real-time LM serving.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        command = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", None)
        )
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user's mistake ends in one line on stderr and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"rtlm-adapt {args.command}: error: {exc}", file=sys.stderr)
        return 2
