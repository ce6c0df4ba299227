"""ServingEnv steps per second and PPOPolicy decision cost.

    python benchmarks/env_speed.py --model ppo
    python benchmarks/env_speed.py --profile vllm-cpu-smollm2-135m --secondary-profile none
    python benchmarks/env_speed.py --scenarios --reference heuristic   # as training with it

Steps: one env (no vectorisation, no wrappers), random actions, episodes reset as they end;
the best of ``--repeats`` timed blocks (the machine is shared); with ``--scenarios`` each episode
draws its deployment from the training space (``ppo_train.TRAIN_SCENARIOS``), as in training.
Decision cost: ``PPOPolicy.decide`` (guarded, as deployed) on a live Observation — the
observation vector, the numpy MLP, the action mapping and Knobs validation — best and median of
the timed blocks, plus the controller's whole epoch (``observe`` + ``decide`` + re-keying the
queue) inside a running loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import numpy as np

from rtlm_adapt.envs import ServingEnv
from rtlm_adapt.policies import make_policy
from rtlm_adapt.policies.ppo_train import TRAIN_SCENARIOS


def env_steps_per_s(steps: int, repeats: int, scenarios: bool = False, **env_kwargs) -> list[float]:
    if scenarios:
        env_kwargs["scenarios"] = TRAIN_SCENARIOS
    env = ServingEnv(**env_kwargs)
    env.reset(seed=0)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, 6)).astype(np.float32)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        rates.append(steps / (time.perf_counter() - t))
    return rates


def decide_us(model: str, repeats: int, number: int = 2000) -> tuple[list[float], list[float]]:
    policy = make_policy(model if model.startswith("ppo") else f"ppo:{model}")  # guarded
    env = ServingEnv()
    env.reset(seed=0)
    for _ in range(30):  # a queue and running batches to observe
        env.step(np.zeros(6, dtype=np.float32))
    obs = env.observation()
    decide = timeit.repeat(lambda: policy.decide(obs), number=number, repeat=repeats)
    ctl, now = env.controller, env.loop.now

    def epoch() -> None:
        ctl.set_knobs(policy.decide(ctl.observe(now)), hold=True)

    whole = timeit.repeat(epoch, number=number, repeat=repeats)
    return [t / number * 1e6 for t in decide], [t / number * 1e6 for t in whole]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", help="PPO model (.zip, .npz, or 'ppo': the packaged one) for the decision cost"
    )
    parser.add_argument("--scenarios", action="store_true",
                        help="episodes drawn from the training space")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", help="primary cost profile (default: the env's)")
    parser.add_argument("--secondary-profile", help="secondary profile, or 'none'")
    parser.add_argument("--reference", choices=("heuristic",),
                        help="rewards relative to this policy (each reset also serves the "
                        "episode with it, as training with --reference does)")
    args = parser.parse_args()
    env_kwargs: dict[str, object] = {"reference": args.reference}
    if args.profile:
        env_kwargs["profile"] = args.profile
    if args.secondary_profile:
        env_kwargs["secondary_profile"] = (
            None if args.secondary_profile == "none" else args.secondary_profile
        )
    rates = env_steps_per_s(args.steps, args.repeats, args.scenarios, **env_kwargs)
    print(
        f"env steps/s: best {max(rates):.0f}, median {statistics.median(rates):.0f} "
        f"({args.repeats} x {args.steps} steps)"
    )
    if args.model:
        decide, whole = decide_us(args.model, args.repeats)
        print(
            f"PPOPolicy.decide: best {min(decide):.1f} us, "
            f"median {statistics.median(decide):.1f} us"
        )
        print(
            f"controller epoch (observe + decide + set_knobs): best {min(whole):.1f} us, "
            f"median {statistics.median(whole):.1f} us"
        )


if __name__ == "__main__":
    main()
