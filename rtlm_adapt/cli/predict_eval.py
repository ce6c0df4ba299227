"""``rtlm-adapt predict-eval``: the length predictor's quality on a prompt set (prior, then a
prequential stream, then held-out prompts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rtlm_adapt.cli.arguments import add_encoder_arg, tier_spec
from rtlm_adapt.data import TokenCounter, load_prompts

HELP = "length predictor quality: prior + prequential stream, then held-out prompts"


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the figures (and ``--json``)."""
    from rtlm_adapt.predictor.evaluation import evaluate

    tier = tier_spec(args)  # an unknown encoder fails before the data loads
    counter = TokenCounter.resolve(args.tokenizer)
    samples = load_prompts(args.prompts, tokenizer=counter)
    result = evaluate(
        samples,
        tier=tier,
        holdout_fraction=args.holdout_fraction,
        seed=args.seed,
        coverage=args.coverage,
    )
    result.update(prompts=str(args.prompts), seed=args.seed, tokenizer=counter.kind)
    for key, value in result.items():
        print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        required=True,
        help="AlpacaEval-format .jsonl/.jsonl.gz, 'alpaca:MODEL' or 'sharegpt'",
    )
    parser.add_argument("--tier", choices=("lexical", "encoder"), default="lexical")
    add_encoder_arg(parser)
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coverage", type=float, default=0.9, help="interval coverage target")
    parser.add_argument("--tokenizer", default="smollm2", help="smollm2, words, or a path/hub id")
    parser.add_argument("--json", help="write the figures to this JSON file")
