"""Train the PPO knob policy on vectorised ServingEnvs.

    python examples/train_ppo.py --timesteps 300000 --out runs/ppo
    python examples/train_ppo.py --quick --out runs/ppo-quick      # ~1.5 minutes, a smoke test

Writes OUT/model.zip (evaluate it with
``rtlm-adapt simulate --policies heuristic,ppo:OUT/model.zip``), OUT/best_model.zip,
OUT/evaluations.json (the learning curve vs the heuristic and FCFS), OUT/checkpoints/ and
TensorBoard logs in OUT/tb (``tensorboard --logdir OUT/tb``). ``rtlm-adapt train`` is the same
run; both call :func:`rtlm_adapt.policies.ppo_train.train`.
"""

from __future__ import annotations

import argparse

from rtlm_adapt.policies.ppo_train import make_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the PPO knob policy on ServingEnvs.")
    parser.add_argument("--timesteps", type=int, help="environment steps (default 300000)")
    parser.add_argument("--out", default="runs/ppo", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a short run (under 3 minutes)")
    parser.add_argument("--n-envs", type=int, default=2, help="parallel environments")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default="alpaca:gpt4_1106_preview", help="prompt set")
    parser.add_argument("--load", default="0.6,1.1", help="training load range LOW,HIGH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-minutes", type=float, help="stop (and save) after this long")
    args = parser.parse_args()
    config = make_config(
        out=args.out, timesteps=args.timesteps, quick=args.quick, prompts=args.prompts,
        load=args.load, n_envs=args.n_envs, seed=args.seed, progress_bar=not args.no_progress,
        max_minutes=args.max_minutes,
    )
    print(f"saved {train(config)}")


if __name__ == "__main__":
    main()
