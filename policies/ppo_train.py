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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtlm_adapt.calibration.step_cost import DEFAULT_PROFILE, DEFAULT_SECONDARY_PROFILE, StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.experiment import Workload, run_policy
from rtlm_adapt.metrics import Summary
from rtlm_adapt.observation import Observation
from rtlm_adapt.policies.action_space import OBSERVATION_FORMAT
from rtlm_adapt.policies.ppo import REGIMES, regime_for, untrained_regimes

#: Trace fractions: training windows start in the first, evaluation windows in the second.
TRAIN_SLICE = (0.0, 0.8)
EVAL_SLICE = (0.8, 1.0)

#: The deployments training covers, one drawn per episode (``envs.scenarios.ScenarioSpace``
#: fields). Held out for ``benchmarks/ppo_eval.py``: the prompt sets :data:`HELD_OUT_PROMPTS`,
#: the traces :data:`HELD_OUT_ARRIVALS` and the load bands around 0.7 and 0.9.
TRAIN_SCENARIOS: dict[str, Any] = {
    "prompts": ["sharegpt", "alpaca:gpt4_1106_preview", "alpaca:claude-2",
                "alpaca:Mixtral-8x7B-Instruct-v0.1", "alpaca:llama-2-7b-chat-hf",
                "alpaca:zephyr-7b-beta"],
    "arrivals": ["azure-conv", "poisson", "gamma:2"],
    "loads": [[0.5, 0.65], [0.75, 0.85], [0.95, 1.1]],
    "batch_caps": [4, 64],
    "secondary_prob": 0.5,
    # the batch model of the transformers executor, and the engine model of vLLM (a step that
    # hardly grows with the batch: shrinking the batch there only loses throughput)
    "profiles": ["smollm2-135m-cpu2", "vllm-cpu-smollm2-135m"],
}
HELD_OUT_PROMPTS = ("alpaca:Yi-34B-Chat", "alpaca:phi-2")
HELD_OUT_ARRIVALS = ("azure-code", "gamma:4")
HELD_OUT_LOADS = (0.7, 0.9)
#: ``benchmarks/ppo_eval.py``'s grid seeds cell ``i``'s windows with ``HELD_OUT_SEED + i``
#: (training draws seeds 0.., its evaluation callback 10_000, validation 30_000), so studies of
#: the grid serve the very same requests per cell.
HELD_OUT_SEED = 20_000


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved as ``OUT/config.json``).

    ``max_minutes`` stops training early (wall clock, evaluations included); the model is saved
    as usual. ``env`` holds ServingEnv options (``prompts``, ``arrivals``, ``load``, ``n_requests``,
    ``epoch_s``, ``batching``, ...); ``trace_slice`` is forced to :data:`TRAIN_SLICE`.
    ``model_format`` is the observation and action map the policy learns with
    (:data:`~rtlm_adapt.policies.action_space.ACTION_MAPS`; loading the model reads it back from
    ``config.json``). ``initial_action`` starts the actor at that action (a warm start, e.g.
    from :func:`best_constant_action`); such a run also saves the untrained model as
    ``checkpoints/ppo_0_steps.zip``, so :func:`validate_checkpoints` can choose "no change".
    """

    timesteps: int = 300_000
    out: str = "runs/ppo"
    n_envs: int = 2
    seed: int = 0
    env: dict[str, Any] = field(
        default_factory=lambda: {"scenarios": json.loads(json.dumps(TRAIN_SCENARIOS))}
    )
    n_steps: int = 512
    batch_size: int = 256
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    log_std_init: float = -0.5
    eval_freq: int = 20_000
    #: Evaluation episodes: scenarios drawn from the training space (its held-out windows).
    eval_episodes: int = 12
    checkpoint_freq: int = 50_000
    vec_env: str = "subproc"
    progress_bar: bool = True
    max_minutes: float | None = None
    model_format: int = OBSERVATION_FORMAT
    #: Warm start: the actor's mean action before training, whatever the observation (see
    #: :func:`start_at_action`), or one per regime, ``{"with_secondary": [...],
    #: "without_secondary": [...]}``; None: SB3's random initialisation.
    initial_action: list[float] | dict[str, list[float]] | None = None
    #: Warm start from a trained model (an SB3 ``.zip`` reading the same observation size): its
    #: actor and critic replace the fresh ones, e.g. to carry a format-4 model into format 5,
    #: whose vector is the same. Excludes ``initial_action``.
    init_model: str | None = None

    @classmethod
    def quick(cls, **overrides: Any) -> TrainConfig:
        """A run that finishes in a couple of minutes on two shared cores (a smoke test)."""
        base: dict[str, Any] = dict(timesteps=16_384, n_steps=256, eval_freq=8_192,
                                    eval_episodes=4, checkpoint_freq=8_192)
        base.update(overrides)
        config = cls(**base)
        config.env.setdefault("n_requests", 60)
        return config


def _csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def make_config(
    *,
    out: str = "runs/ppo",
    timesteps: int | None = None,
    quick: bool = False,
    prompts: str | None = None,
    arrivals: str | None = None,
    load: str | tuple[float, float] | None = None,
    batch_caps: str | None = None,
    reference: str | None = None,
    tail_weight: float | None = None,
    tail_quantile: float | None = None,
    **overrides: Any,
) -> TrainConfig:
    """The config that the command-line front ends build: the training space
    :data:`TRAIN_SCENARIOS`, with comma-separated ``prompts`` / ``arrivals``, a ``load``
    "LOW,HIGH" and ``batch_caps`` "LOW,HIGH" replacing its fields where given; ``reference``,
    ``tail_weight`` and ``tail_quantile`` the environment's reward options (``ServingEnv``'s),
    set only where given."""
    overrides["out"] = out
    if timesteps:
        overrides["timesteps"] = timesteps
    config = TrainConfig.quick(**overrides) if quick else TrainConfig(**overrides)
    space = config.env["scenarios"]
    if prompts:
        space["prompts"] = _csv(prompts)
    if arrivals:
        space["arrivals"] = _csv(arrivals)
    if load:
        low, _, high = load.partition(",") if isinstance(load, str) else map(str, load)
        space["loads"] = [[float(low), float(high or low)]]
    if batch_caps:
        low, _, high = batch_caps.partition(",")
        space["batch_caps"] = [int(low), int(high or low)]
    reward = {"reference": reference, "tail_weight": tail_weight, "tail_quantile": tail_quantile}
    config.env.update({name: value for name, value in reward.items() if value is not None})
    return config


@dataclass
class EvalCase:
    """One evaluation episode: the deployment and its requests."""

    scenario: Any  # envs.scenarios.Scenario
    workload: Workload


def scenario_cases(
    scenarios: list[Any], windows: int, env_options: dict[str, Any], seed: int
) -> list[EvalCase]:
    """``windows`` workloads per scenario; trace windows from :data:`EVAL_SLICE` (unseen in
    training), other arrivals with seeds training never draws."""
    from rtlm_adapt.envs.episodes import EpisodeSampler
    from rtlm_adapt.envs.scenarios import scenario_cost

    rng = np.random.default_rng(seed)
    cases = []
    for sc in scenarios:
        cost = scenario_cost(sc, env_options.get("profile", DEFAULT_PROFILE))
        sampler = EpisodeSampler(sc.prompts, arrivals=sc.arrivals, trace_slice=EVAL_SLICE,
                                 cost=cost, n_requests=env_options.get("n_requests", 100),
                                 slo=env_options.get("slo", "0.7:2,0.3:10"))
        cases += [EvalCase(sc, sampler.sample(rng, load=sc.load)) for _ in range(windows)]
    return cases


def held_out_cells(
    windows: int, requests: int, *, caps: Sequence[int] = (4, 16, 64), profile: str | None = None
) -> Iterator[tuple[Any, list[EvalCase]]]:
    """``benchmarks/ppo_eval.py``'s default grid (held-out prompts, traces and loads, caps 4, 16
    and 64, with the secondary): each cell whose cap is in ``caps``, with its ``windows``
    windows of ``requests`` requests, seeded as the grid seeds them (cell ``i``:
    ``HELD_OUT_SEED + i``), so a study serves the very windows of the grid's cells."""
    from rtlm_adapt.envs.scenarios import grid

    cells = grid(HELD_OUT_PROMPTS, HELD_OUT_ARRIVALS, HELD_OUT_LOADS, [4, 16, 64],
                 secondary=True, profile=profile)
    for i, cell in enumerate(cells):
        if cell.max_batch in caps:
            yield cell, scenario_cases([cell], windows, {"n_requests": requests},
                                       seed=HELD_OUT_SEED + i)


def training_eval_cases(config: TrainConfig, seed: int = 10_000) -> list[EvalCase]:
    """What the training callback evaluates: scenarios drawn from the training space."""
    from rtlm_adapt.envs.scenarios import ScenarioSpace

    space = ScenarioSpace.from_options(config.env.get("scenarios", {}))
    rng = np.random.default_rng(seed)
    scenarios = [space.sample(rng) for _ in range(config.eval_episodes)]
    return scenario_cases(scenarios, 1, config.env, seed)


def run_summary(policy: Any, case: EvalCase, env_options: dict[str, Any]) -> Summary:
    """One episode served by ``policy`` (the same controller, loop and simulated executors as
    ``rtlm-adapt simulate``): its summary. A callable ``policy`` is a factory: each episode
    gets a fresh policy (a guard's judgement does not carry over)."""
    from rtlm_adapt.envs.episodes import shared_scorer
    from rtlm_adapt.envs.scenarios import scenario_cost

    primary = scenario_cost(case.scenario, env_options.get("profile", DEFAULT_PROFILE))
    second = env_options.get("secondary_profile", DEFAULT_SECONDARY_PROFILE)
    secondary = StepCost.load(second) if second and case.scenario.secondary else None
    factory = functools.partial(
        AdaptiveController, epoch_s=env_options.get("epoch_s", 5.0), scorer=shared_scorer()
    )
    if callable(policy) and not hasattr(policy, "decide"):
        policy = policy()
    run = run_policy(policy, case.workload, batching=env_options.get("batching", "continuous"),
                     primary_cost=primary,
                     secondary_cost=secondary, controller_factory=factory)
    return run.summary


def run_case(policy: Any, case: EvalCase, env_options: dict[str, Any]) -> tuple[float, float]:
    """Mean response time and deadline-miss rate of one episode (see :func:`run_summary`)."""
    summary = run_summary(policy, case, env_options)
    return summary.mean_rt_s, summary.deadline_miss_rate


def evaluate(policy: Any, cases: list[EvalCase], env_options: dict[str, Any]) -> dict[str, float]:
    """Mean response time and deadline-miss rate of ``policy``, averaged over ``cases``."""
    runs = [run_case(policy, case, env_options) for case in cases]
    return {"mean_rt_s": float(np.mean([r for r, _ in runs])),
            "miss_rate": float(np.mean([m for _, m in runs]))}


def _make_callbacks(config: TrainConfig, out: Path) -> list[Any]:
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

    from .ppo import PPOPolicy

    class BaselineEvalCallback(BaseCallback):
        """Every ``eval_freq`` steps: the current policy vs the heuristic and FCFS, on unseen
        windows; logs to TensorBoard (``eval/*``) and ``evaluations.json``; keeps the best."""

        def __init__(self) -> None:
            super().__init__()
            self.workloads = training_eval_cases(config)
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
            actor = PPOPolicy.from_model(self.model).actor
            ppo = evaluate(
                lambda: PPOPolicy(actor, guard=None, observation_format=config.model_format),
                self.workloads, config.env,
            )
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


def build_model(config: TrainConfig, env: Any, tensorboard_log: str | None = None) -> Any:
    """SB3's PPO on ``env`` with ``config``'s settings, started at ``config.initial_action``
    where one is given."""
    from stable_baselines3 import PPO

    model = PPO(
        "MlpPolicy", env, n_steps=config.n_steps, batch_size=config.batch_size,
        n_epochs=config.n_epochs, learning_rate=config.learning_rate, gamma=config.gamma,
        gae_lambda=config.gae_lambda, ent_coef=config.ent_coef, seed=config.seed,
        policy_kwargs={"log_std_init": config.log_std_init}, tensorboard_log=tensorboard_log,
        device="cpu", verbose=0,
    )
    if config.initial_action is not None and config.init_model:
        raise ValueError("give initial_action or init_model, not both")
    if config.initial_action is not None:
        start_at_action(model, config.initial_action)
    if config.init_model:
        model.set_parameters(config.init_model, exact_match=True, device="cpu")
    return model


def start_at_action(model: Any, action: list[float] | dict[str, list[float]]) -> None:
    """Make ``model``'s deterministic action ``action`` whatever the observation: the actor's
    last layer (``action_net``, the Gaussian's mean) gets zero weights and ``action`` as its
    bias. Its gradients still reach the hidden layers once the weights move off zero.

    Given one action per regime (:data:`REGIMES`), the actor reads the observation's
    ``has_secondary`` (0 or 1) through the first unit of each hidden layer (every other input
    weight of those two units zero) and the last layer turns that unit into the difference
    between the two actions: exactly one action per regime, whatever else the observation says.
    """
    import torch

    net = model.policy.action_net
    per_regime = action if isinstance(action, dict) else dict.fromkeys(REGIMES, action)
    if sorted(per_regime) != sorted(REGIMES):
        raise ValueError(f"initial action per regime needs exactly {REGIMES}, got "
                         f"{sorted(per_regime)}")
    with_s, without = (torch.as_tensor(per_regime[r], dtype=net.bias.dtype) for r in REGIMES)
    if len(with_s) != net.out_features or len(without) != net.out_features:
        raise ValueError(f"initial action has {len(with_s)} and {len(without)} numbers, "
                         f"the actor {net.out_features}")
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(without)
        if torch.equal(with_s, without):
            return
        hidden = [layer for layer in model.policy.mlp_extractor.policy_net
                  if isinstance(layer, torch.nn.Linear)]
        if not issubclass(model.policy.activation_fn, torch.nn.Tanh) or (
            hidden[0].in_features < len(Observation.SCALE_FREE_FIELDS)
        ):
            raise ValueError("a per-regime start needs Tanh hidden layers reading the "
                             "scale-free observation (model format 2, 3 or 4)")
        column = Observation.SCALE_FREE_FIELDS.index("has_secondary")
        unit = torch.tensor(1.0)  # the carrier's value with a secondary, layer by layer
        for i, layer in enumerate(hidden):
            layer.weight[0].zero_()
            layer.bias[0] = 0.0
            layer.weight[0, column if i == 0 else 0] = 2.0
            unit = torch.tanh(2.0 * unit)
        net.weight[:, 0] = (with_s - without) / unit


def best_constant_action(spec: str) -> list[float] | dict[str, list[float]]:
    """An initial action from ``spec``: comma-separated numbers; a
    ``benchmarks/studies/start_action.py`` JSON, whose chosen action per regime it reads; or a
    ``benchmarks/studies/knob_ceiling.py --family action3`` JSON, whose best single action in
    hindsight (``summary.action3.single_hindsight.best``) it reads."""
    path = Path(spec)
    if not path.is_file():
        return [float(x) for x in spec.split(",")]
    study = json.loads(path.read_text())
    if "regimes" in study:
        return {r: [float(x) for x in study["regimes"][r]["best"]["action"]] for r in REGIMES}
    setting = study["summary"]["action3"]["single_hindsight"]["best"]
    return [float(x) for x in setting["setting"].split()[1:]]  # "action3 +1.00 +0.00 ..."


def train(config: TrainConfig) -> Path:
    """Train PPO as ``config`` says; returns the path of the saved ``model.zip``."""
    import torch
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    torch.set_num_threads(1)  # a 64x64 MLP gains nothing from threads on two shared cores
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    # render_mode=None: SB3 otherwise asks for "rgb_array", which ServingEnv does not render
    env_kwargs = {**config.env, "trace_slice": TRAIN_SLICE, "render_mode": None,
                  "model_format": config.model_format}
    vec_cls = SubprocVecEnv if config.vec_env == "subproc" and config.n_envs > 1 else DummyVecEnv
    # "module:id" makes gymnasium import rtlm_adapt.envs (the registration) in each subprocess
    venv = make_vec_env("rtlm_adapt.envs:rtlm_adapt/Serving-v0", n_envs=config.n_envs,
                        seed=config.seed, env_kwargs=env_kwargs, vec_env_cls=vec_cls)
    # Returns run to hundreds; normalising rewards (not observations: those are already scaled,
    # and the deployed actor must see the raw vector) keeps the value targets near unit scale.
    venv = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=config.gamma)
    model = build_model(config, venv, tensorboard_log=str(out / "tb"))
    if config.initial_action is not None or config.init_model:  # the start, for validation
        (out / "checkpoints").mkdir(exist_ok=True)
        model.save(out / "checkpoints" / "ppo_0_steps.zip")
    try:
        model.learn(config.timesteps, callback=_make_callbacks(config, out),
                    progress_bar=config.progress_bar, tb_log_name="ppo")
    finally:
        venv.close()
    path = out / "model.zip"
    model.save(path)
    return path


def export_model(
    run: str | Path, dest: str | Path, model: str = "best_model.zip",
    validation: list[tuple[str, float]] | None = None,
    by_regime: dict[str, float] | None = None,
    min_gain: float = 0.01,
    formats: list[dict[str, float]] | None = None,
) -> Path:
    """Write a training run's model (a file in the run folder) as the numpy ``.npz`` that
    :meth:`PPOPolicy.load` reads without torch, with the run's config and learning curve in its
    metadata and as ``DEST.json`` beside it, with ``validation`` (from
    :func:`validate_checkpoints`) if given.

    ``by_regime`` (from :func:`validate_by_regime`) is the model's mean response time over the
    heuristic's per regime: where it is above ``1 - min_gain`` (less than 1% better, by
    default), and in any regime training never drew, the exported policy leaves the knobs to
    the heuristic (``PPOPolicy.heuristic_regimes``). ``formats`` (from
    :func:`validate_formats`, best first) reads the model in the best one. How the packaged
    model is made::

        ranked = validate_checkpoints("runs/ppo24")
        regimes = validate_by_regime("runs/ppo24", ranked[0][0])
        formats = validate_formats("runs/ppo24", ranked[0][0])
        export_model("runs/ppo24", "policies/models/ppo.npz", ranked[0][0], ranked, regimes,
                     formats=formats)
    """
    from .ppo import PPOPolicy

    run, dest = Path(run), Path(dest)
    config = json.loads((run / "config.json").read_text())
    curve_file = run / "evaluations.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    heuristic_regimes = set(untrained_regimes(config))
    heuristic_regimes |= {r for r, ratio in (by_regime or {}).items() if ratio > 1.0 - min_gain}
    fmt = int(formats[0]["observation_format"]) if formats else None
    policy = PPOPolicy.load(run / model, guard=None, heuristic_regimes=heuristic_regimes,
                            observation_format=fmt)
    # best_model.zip is the evaluation with the lowest mean response time (the callback's rule)
    best = min(curve, key=lambda row: row["ppo"]["mean_rt_s"]) if curve else {}
    chosen = best if model == "best_model.zip" else (curve[-1] if curve else {})
    steps = chosen.get("timesteps", config.get("timesteps"))
    if model.startswith("checkpoints/"):  # ppo_500000_steps.zip
        steps = int(Path(model).stem.split("_")[1])
    training = {"run": str(run), "model": model, "config": config, "timesteps": steps,
                "trained_timesteps": curve[-1]["timesteps"] if curve else None}
    policy.save(dest, training={k: v for k, v in training.items() if k != "config"})
    extra: dict[str, Any] = {"validation_rt_over_heuristic": validation} if validation else {}
    if by_regime:
        extra["validation_by_regime"] = {"rt_over_heuristic": by_regime, "min_gain": min_gain}
    if formats:
        extra["validation_by_format"] = formats
    dest.with_suffix(".json").write_text(
        json.dumps({**training, **extra, "learning_curve": curve}, indent=1) + "\n"
    )
    return dest


@dataclass
class Validation:
    """A run's validation episodes (the training space's held-out windows) and the heuristic's
    summary on each, for scoring the run's models against."""

    config: TrainConfig
    cases: list[EvalCase]
    heuristic: list[Summary]

    @classmethod
    def of_run(cls, run: str | Path, episodes: int = 48, seed: int = 30_000) -> Validation:
        config = TrainConfig(**{**json.loads((Path(run) / "config.json").read_text()),
                                "eval_episodes": episodes})
        cases = training_eval_cases(config, seed=seed)
        return cls(config, cases, [run_summary("heuristic", c, config.env) for c in cases])

    def summaries(self, model: str | Path, observation_format: int | None = None) -> list[Summary]:
        """The model's (the actor alone) summary per episode, read in ``observation_format``
        if given. The guard is off: its judgement would blur the comparison."""
        from .ppo import PPOPolicy

        loaded = PPOPolicy.load(model, guard=None, observation_format=observation_format)
        actor, fmt = loaded.actor, loaded.observation_format
        return [run_summary(PPOPolicy(actor, guard=None, observation_format=fmt), case,
                            self.config.env) for case in self.cases]

    def ratios(self, model: str | Path, observation_format: int | None = None) -> list[float]:
        """The model's mean response time over the heuristic's, per episode."""
        return [s.mean_rt_s / h.mean_rt_s
                for s, h in zip(self.summaries(model, observation_format), self.heuristic,
                                strict=True)]


def validate_formats(
    run: str | Path, model: str, formats: Sequence[int] = (4, 6), episodes: int = 48,
    seed: int = 30_000,
) -> list[dict[str, float]]:
    """A run's ``model`` read in each of ``formats`` (the same observation, other knobs: format
    6 adds the heuristic's hard aging bound) on :func:`validate_checkpoints`' episodes: its mean
    response time and its p99 over the heuristic's (means over episodes), and ``score``, the
    average of the two, which weighs the tail as much as the mean. Best score first."""
    validation = Validation.of_run(run, episodes, seed)
    rows = []
    for fmt in formats:
        runs = list(zip(validation.summaries(Path(run) / model, fmt), validation.heuristic,
                        strict=True))
        mean = float(np.mean([s.mean_rt_s / h.mean_rt_s for s, h in runs]))
        p99 = float(np.mean([s.p99_rt_s / h.p99_rt_s for s, h in runs]))
        rows.append({"observation_format": fmt, "mean_rt_over_heuristic": mean,
                     "p99_over_heuristic": p99, "score": (mean + p99) / 2})
    return sorted(rows, key=lambda row: row["score"])


def validate_checkpoints(
    run: str | Path, episodes: int = 48, seed: int = 30_000
) -> list[tuple[str, float]]:
    """Rank a run's checkpoints by their mean response time over the heuristic's, averaged over
    ``episodes`` validation episodes drawn from the *training* space (held-out windows, a seed
    neither training nor ``benchmarks/ppo_eval.py`` uses), so a model can be chosen without
    looking at the held-out grid. Returns ``(model file, mean ratio)``, best first."""
    run = Path(run)
    validation = Validation.of_run(run, episodes, seed)
    files = sorted((run / "checkpoints").glob("*.zip")) + [run / "best_model.zip",
                                                           run / "model.zip"]
    ranked = [(str(file.relative_to(run)), float(np.mean(validation.ratios(file))))
              for file in files if file.is_file()]
    return sorted(ranked, key=lambda item: item[1])


def validate_by_regime(
    run: str | Path, model: str, episodes: int = 96, seed: int = 30_000
) -> dict[str, float]:
    """A run's ``model``'s (the actor alone) mean response time over the heuristic's, per
    regime (:data:`~rtlm_adapt.policies.ppo.REGIMES`), over ``episodes`` validation episodes
    drawn from the training space (the first of them are :func:`validate_checkpoints`')."""
    validation = Validation.of_run(run, episodes, seed)
    ratios: dict[str, list[float]] = {}
    for case, ratio in zip(validation.cases, validation.ratios(Path(run) / model), strict=True):
        ratios.setdefault(regime_for(case.scenario.secondary), []).append(ratio)
    return {regime: float(np.mean(r)) for regime, r in ratios.items()}
