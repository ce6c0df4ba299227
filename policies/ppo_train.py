"""Training PPO on ServingEnvs: what ``examples/train_ppo.py`` and ``rtlm-adapt train`` run.

:func:`train` builds ``n_envs`` vectorised :class:`~rtlm_adapt.envs.ServingEnv` (subprocesses),
trains SB3's PPO on them with TensorBoard logging and a progress bar, saves checkpoints, and
every ``eval_freq`` steps evaluates the current policy against the RT-LM heuristic and FCFS
(:class:`BaselineEvalCallback`) on windows of the trace that training never draws from. The
final model is ``OUT/model.zip`` (the best evaluated one ``OUT/best_model.zip``), the evaluation
log ``OUT/evaluations.json``.

Imports gymnasium and stable-baselines3: keep it out of the serving path.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.experiment import Workload, run_policy

#: Trace fractions: training windows start in the first, evaluation windows in the second.
TRAIN_SLICE = (0.0, 0.8)
EVAL_SLICE = (0.8, 1.0)


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``OUT/config.json``).

    ``max_minutes`` stops training early (wall clock, evaluations included); the model is saved
    as usual. ``env`` holds ServingEnv options (``prompts``, ``arrivals``, ``load``, ``n_requests``,
    ``epoch_s``, ``batching``, ...); ``trace_slice`` is forced to :data:`TRAIN_SLICE`.
    """

    timesteps: int = 300_000
    out: str = "runs/ppo"
    n_envs: int = 2
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)
    n_steps: int = 512
    batch_size: int = 256
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    log_std_init: float = -0.5
    eval_freq: int = 20_000
    eval_loads: tuple[float, ...] = (0.9, 1.0)
    eval_windows: int = 4
    checkpoint_freq: int = 50_000
    vec_env: str = "subproc"
    progress_bar: bool = True
    max_minutes: float | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> TrainConfig:
        """A run that finishes in a couple of minutes on two shared cores (a smoke test)."""
        base = dict(timesteps=16_384, n_steps=256, eval_freq=8_192, eval_windows=2,
                    checkpoint_freq=8_192, env={"n_requests": 60})
        base.update(overrides)
        return cls(**base)


def make_config(
    *,
    out: str = "runs/ppo",
    timesteps: int | None = None,
    quick: bool = False,
    prompts: str = "alpaca:gpt4_1106_preview",
    load: str | tuple[float, float] = (0.6, 1.1),
    **overrides: Any,
) -> TrainConfig:
    """The config that the command-line front ends build (``load`` may be "LOW,HIGH")."""
    if isinstance(load, str):
        low, _, high = load.partition(",")
        load = (float(low), float(high or low))
    overrides["out"] = out
    if timesteps:
        overrides["timesteps"] = timesteps
    config = TrainConfig.quick(**overrides) if quick else TrainConfig(**overrides)
    config.env.update({"prompts": prompts, "load": tuple(load)})
    return config


def eval_workloads(
    env_options: dict[str, Any], loads: tuple[float, ...], windows: int, seed: int = 10_000
) -> list[Workload]:
    """Evaluation workloads: ``windows`` per load from :data:`EVAL_SLICE` (unseen in training)."""
    from rtlm_adapt.envs.episodes import EpisodeSampler

    opts = {k: env_options[k] for k in ("prompts", "arrivals", "n_requests", "slo")
            if k in env_options}
    cost = StepCost.load(env_options.get("profile", "smollm2-135m-cpu2"))
    sampler = EpisodeSampler(trace_slice=EVAL_SLICE, cost=cost, **opts)
    rng = np.random.default_rng(seed)
    return [sampler.sample(rng, load=load) for load in loads for _ in range(windows)]


def evaluate(
    policy: Any, workloads: list[Workload], env_options: dict[str, Any]
) -> dict[str, float]:
    """Mean response time and deadline-miss rate of ``policy`` over ``workloads`` (the same
    controller, loop and simulated executors as ``rtlm-adapt simulate``)."""
    from rtlm_adapt.envs.episodes import shared_scorer

    primary = StepCost.load(env_options.get("profile", "smollm2-135m-cpu2"))
    second = env_options.get("secondary_profile", "smollm2-135m-cpu2-secondary")
    secondary = StepCost.load(second) if second else None
    factory = functools.partial(
        AdaptiveController, epoch_s=env_options.get("epoch_s", 5.0), scorer=shared_scorer()
    )
    rts, misses = [], []
    for wl in workloads:
        run = run_policy(policy, wl, batching=env_options.get("batching", "continuous"),
                         primary_cost=primary, secondary_cost=secondary,
                         controller_factory=factory)
        rts.append(run.summary.mean_rt_s)
        misses.append(run.summary.deadline_miss_rate)
    return {"mean_rt_s": float(np.mean(rts)), "miss_rate": float(np.mean(misses))}


def _make_callbacks(config: TrainConfig, out: Path) -> list[Any]:
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

    from .ppo import PPOPolicy

    class BaselineEvalCallback(BaseCallback):
        """Every ``eval_freq`` steps: the current policy vs the heuristic and FCFS, on unseen
        windows; logs to TensorBoard (``eval/*``) and ``evaluations.json``; keeps the best."""

        def __init__(self) -> None:
            super().__init__()
            self.workloads = eval_workloads(config.env, config.eval_loads, config.eval_windows)
            self.baselines = {name: evaluate(name, self.workloads, config.env)
                              for name in ("heuristic", "fcfs")}
            self.history: list[dict[str, Any]] = []
            self.best = float("inf")
            self._next = 0

        def _on_step(self) -> bool:
            if self.num_timesteps >= self._next:
                self._next = self.num_timesteps + config.eval_freq
                self._evaluate()
            return True

        def _on_training_end(self) -> None:
            self._evaluate()

        def _evaluate(self) -> None:
            ppo = evaluate(PPOPolicy.from_model(self.model), self.workloads, config.env)
            heur = self.baselines["heuristic"]
            row = {"timesteps": int(self.num_timesteps), "time_s": time.time() - started,
                   "ppo": ppo, **self.baselines}
            self.history.append(row)
            rel = ppo["mean_rt_s"] / heur["mean_rt_s"]
            self.logger.record("eval/ppo_mean_rt_s", ppo["mean_rt_s"])
            self.logger.record("eval/ppo_miss_rate", ppo["miss_rate"])
            self.logger.record("eval/heuristic_mean_rt_s", heur["mean_rt_s"])
            self.logger.record("eval/fcfs_mean_rt_s", self.baselines["fcfs"]["mean_rt_s"])
            self.logger.record("eval/ppo_over_heuristic_rt", rel)
            (out / "evaluations.json").write_text(json.dumps(self.history, indent=1) + "\n")
            if ppo["mean_rt_s"] < self.best:
                self.best = ppo["mean_rt_s"]
                self.model.save(out / "best_model.zip")

    class TimeBudgetCallback(BaseCallback):
        """Stops training (and lets ``train`` save the model) once ``max_minutes`` have passed."""

        def _on_step(self) -> bool:
            return config.max_minutes is None or time.time() - started < 60 * config.max_minutes

    started = time.time()
    return [
        BaselineEvalCallback(),
        TimeBudgetCallback(),
        CheckpointCallback(
            max(1, config.checkpoint_freq // config.n_envs), str(out / "checkpoints"), "ppo"
        ),
    ]


def train(config: TrainConfig) -> Path:
    """Train PPO as ``config`` says; returns the path of the saved ``model.zip``."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    torch.set_num_threads(1)  # a 64x64 MLP gains nothing from threads on two shared cores
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    # render_mode=None: SB3 otherwise asks for "rgb_array", which ServingEnv does not render
    env_kwargs = {**config.env, "trace_slice": TRAIN_SLICE, "render_mode": None}
    vec_cls = SubprocVecEnv if config.vec_env == "subproc" and config.n_envs > 1 else DummyVecEnv
    # "module:id" makes gymnasium import rtlm_adapt.envs (the registration) in each subprocess
    venv = make_vec_env("rtlm_adapt.envs:rtlm_adapt/Serving-v0", n_envs=config.n_envs,
                        seed=config.seed, env_kwargs=env_kwargs, vec_env_cls=vec_cls)
    # Returns run to hundreds; normalising rewards (not observations: those are already scaled,
    # and the deployed actor must see the raw vector) keeps the value targets near unit scale.
    venv = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=config.gamma)
    model = PPO(
        "MlpPolicy", venv, n_steps=config.n_steps, batch_size=config.batch_size,
        n_epochs=config.n_epochs, learning_rate=config.learning_rate, gamma=config.gamma,
        gae_lambda=config.gae_lambda, ent_coef=config.ent_coef, seed=config.seed,
        policy_kwargs={"log_std_init": config.log_std_init}, tensorboard_log=str(out / "tb"),
        device="cpu", verbose=0,
    )
    try:
        model.learn(config.timesteps, callback=_make_callbacks(config, out),
                    progress_bar=config.progress_bar, tb_log_name="ppo")
    finally:
        venv.close()
    path = out / "model.zip"
    model.save(path)
    return path
