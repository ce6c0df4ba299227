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

import sys

from rtlm_adapt.cli import main

if __name__ == "__main__":
    # the same options and run as `rtlm-adapt train`, which calls
    # rtlm_adapt.policies.ppo_train.train
    raise SystemExit(main(["train", *sys.argv[1:]]))
