"""``rtlm-adapt train``: train the PPO knob policy on ServingEnvs (needs the [rl] extra)."""

from __future__ import annotations

import argparse

from rtlm_adapt.cli.arguments import (
    non_negative_float,
    open_unit_float,
    positive_float,
    positive_int,
)

HELP = "train the PPO knob policy on ServingEnvs (needs [rl])"


def run(args: argparse.Namespace) -> int:
    """Train the PPO knob policy (the same run as examples/train_ppo.py)."""
    if args.tail_weight and not args.reference:
        # caught before training starts, rather than by every ServingEnv it builds
        raise ValueError("--tail-weight needs --reference: the tail threshold is the "
                         "reference run's quantile")
    from rtlm_adapt.policies.ppo_train import best_constant_action, make_config, train

    warm: dict[str, object] = {}
    if args.initial_action:
        warm["initial_action"] = best_constant_action(args.initial_action)
    if args.log_std_init is not None:
        warm["log_std_init"] = args.log_std_init
    if args.init_model:
        warm["init_model"] = args.init_model
    if args.model_format is not None:
        warm["model_format"] = args.model_format
    config = make_config(
        out=args.out,
        timesteps=args.timesteps,
        quick=args.quick,
        prompts=args.prompts,
        load=args.load,
        arrivals=args.arrivals,
        batch_caps=args.batch_caps,
        n_envs=args.n_envs,
        seed=args.seed,
        progress_bar=not args.no_progress,
        max_minutes=args.max_minutes,
        learning_rate=args.learning_rate,
        reference=args.reference,
        tail_weight=args.tail_weight,
        tail_quantile=args.tail_quantile,
        **warm,
    )
    print(f"saved {train(config)}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timesteps", type=positive_int, help="environment steps (default 300000)")
    parser.add_argument("--out", default="runs/ppo", help="output folder (model.zip, logs)")
    parser.add_argument("--quick", action="store_true", help="a short run (under 3 minutes)")
    parser.add_argument("--n-envs", type=positive_int, default=2, help="parallel environments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompts",
        help="comma-separated prompt sets (default: ShareGPT and five AlpacaEval "
        "models' lengths, drawn per episode; see ppo_train.TRAIN_SCENARIOS)",
    )
    parser.add_argument(
        "--arrivals", help="comma-separated arrival specs (default: azure-conv, poisson, gamma:2)"
    )
    parser.add_argument(
        "--load",
        help="training load range LOW,HIGH (default: 0.5-1.1 without the bands around "
        "0.7 and 0.9, held out for evaluation)",
    )
    parser.add_argument("--batch-caps", help="primary batch caps LOW,HIGH (default 4,64)")
    parser.add_argument("--learning-rate", type=positive_float, default=3e-4, help="PPO's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--max-minutes", type=positive_float, help="stop (and save) after this long"
    )
    parser.add_argument(
        "--initial-action",
        help="start the actor at this action (a warm start): comma-separated numbers, a "
        "benchmarks/studies/start_action.py JSON (its chosen action per regime, with and "
        "without a secondary executor), or a knob_ceiling.py --family action3 JSON (its best "
        "single action)",
    )
    parser.add_argument(
        "--reference", choices=("heuristic",),
        help="reward each epoch relative to this policy serving the same requests (an "
        "input-dependent baseline: less variance in PPO's advantages); default absolute rewards",
    )
    parser.add_argument(
        "--tail-weight", type=non_negative_float, metavar="W",
        help="also penalise the tail of the response times (needs --reference): each epoch "
        "loses W times the requests' excess over the reference's --tail-quantile response "
        "time, the agent's minus the reference's (a CVaR bound); W=1 weighs a second of the "
        "tail's mean like a second of the mean response time (default 0: no tail term)",
    )
    parser.add_argument(
        "--tail-quantile", type=open_unit_float, metavar="Q",
        help="where the tail starts, a quantile in (0, 1) of the response times (default 0.95)",
    )
    parser.add_argument(
        "--model-format", type=int, choices=(2, 3, 4, 5, 6),
        help="the observation and action map to learn with (default 4; 5 scales the offload "
        "threshold to the prompt mix's typical predicted length; 6 adds the heuristic's hard "
        "aging bound to format 4's knobs)",
    )
    parser.add_argument(
        "--init-model", metavar="PATH",
        help="start from a trained model (an SB3 .zip whose observation has the same size, "
        "e.g. a format-4 model carried into format 5); excludes --initial-action",
    )
    parser.add_argument(
        "--log-std-init", type=float,
        help="the exploration noise's initial log standard deviation (default -0.5)",
    )
