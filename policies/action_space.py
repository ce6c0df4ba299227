"""The one mapping between a learned policy's numbers and the controller's Knobs.

The RL environment (:class:`rtlm_adapt.envs.ServingEnv`) and the deployed
:class:`~rtlm_adapt.policies.ppo.PPOPolicy` both go through :class:`KnobsActionMap` and
:func:`observation_array`, so a policy trained in the environment decides exactly the same way
inside a live controller. Only numpy here: ``rtlm_adapt.policies`` stays importable without
gymnasium.

Action: a vector in ``[-1, 1]^6`` (SB3's recommended normalised Box), each entry mapped to a knob:

=====  ======================  =====================================================
index  knob                    mapping of ``a`` in [-1, 1]
=====  ======================  =====================================================
0      ``length_weight``       linear to [0, 1]
1      ``uncertainty_weight``  linear to [0, 2]
2      ``wait_weight``         log-linear to [1e-3, 1] (aging, per second waited)
3      ``slack_weight``        linear to [0, 1]
4      ``max_batch_size``      fraction in [1/16, 1] of the primary's maximum, rounded
5      ``offload_threshold``   log-linear to [32, 4096] predicted tokens (4096 ~ off)
=====  ======================  =====================================================

Log scales where a knob spans orders of magnitude (aging, token thresholds); the batch cap is a
fraction so one policy fits executors of any size. That is format 1 (:class:`KnobsActionMap`);
format 2 (:class:`RelativeKnobsActionMap`) scales the last two entries by the knee batch and the
queue's median predicted length; format 3 (:class:`LogKnobsActionMap`) maps them on log scales
that reach the full batch cap and 8 predicted tokens, whatever the queue; format 5
(:class:`TypicalLengthActionMap`, opt-in) scales that token threshold to the prompt
mix's typical predicted length.

>>> amap = KnobsActionMap()
>>> knobs = amap.to_knobs([1, 0, -1, -1, 1, 1], primary_max_batch=16)
>>> knobs.length_weight, knobs.uncertainty_weight, round(knobs.wait_weight, 6), knobs.max_batch_size
(1.0, 1.0, 0.001, 16)
>>> [round(float(x), 6) for x in amap.to_action(knobs, primary_max_batch=16)]
[1.0, 0.0, -1.0, -1.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from rtlm_adapt.knobs import Knobs
from rtlm_adapt.observation import Observation

from .heuristic import hard_aging_bound_s

#: Names of the action entries, in order.
ACTION_FIELDS = (
    "length_weight",
    "uncertainty_weight",
    "wait_weight",
    "slack_weight",
    "batch_fraction",
    "offload_threshold",
)

#: Bounds of the observation vector: features are squashed to about [0, 1] (slack to [-1, 1]);
#: the log-scaled ones can exceed 1 under extreme overload, so the vector is clipped to these.
OBS_LOW, OBS_HIGH = -1.0, 2.0


#: Model formats, by number: the observation vector a learned policy reads and its field names
#: (the action map of each is :data:`ACTION_MAPS`). Format 3 reads format 2's scale-free vector
#: and differs in its action map only; format 4 adds the secondary's slowdown to the vector and
#: keeps format 3's map; format 5 reads format 4's vector and scales the offload threshold to
#: the prompt mix; format 6 reads format 4's vector and adds the heuristic's hard aging bound to
#: format 4's knobs; 1-4 are kept so older models still run.
OBSERVATION_FORMATS: dict[int, tuple[Callable[[Observation], list[float]], tuple[str, ...]]] = {
    1: (Observation.as_vector, Observation.VECTOR_FIELDS),
    2: (Observation.scale_free_vector, Observation.SCALE_FREE_FIELDS),
    3: (Observation.scale_free_vector, Observation.SCALE_FREE_FIELDS),
    4: (Observation.scale_free_speed_vector, Observation.SCALE_FREE_SPEED_FIELDS),
    5: (Observation.scale_free_speed_vector, Observation.SCALE_FREE_SPEED_FIELDS),
    6: (Observation.scale_free_speed_vector, Observation.SCALE_FREE_SPEED_FIELDS),
}
#: The format the environment (and so every newly trained model) uses unless told otherwise.
OBSERVATION_FORMAT = 4


def observation_format_for_size(size: int) -> int:
    """The oldest format whose vector has ``size`` entries (how a model file without the number
    is read: such files predate format 3); a ValueError naming the sizes known otherwise."""
    for number, (_, names) in OBSERVATION_FORMATS.items():
        if len(names) == size:
            return number
    known = ", ".join(f"{len(names)} (format {n})" for n, (_, names) in OBSERVATION_FORMATS.items())
    raise ValueError(
        f"the model reads observations of {size} numbers, which no observation format has "
        f"(known: {known}); it was trained on an observation this version cannot build: "
        "retrain it with examples/train_ppo.py"
    )


def observation_vector(obs: Observation, fmt: int = OBSERVATION_FORMAT) -> list[float]:
    """The observation in format ``fmt``, clipped to ``[OBS_LOW, OBS_HIGH]``, as plain floats."""
    return [min(OBS_HIGH, max(OBS_LOW, x)) for x in OBSERVATION_FORMATS[fmt][0](obs)]


def observation_array(obs: Observation, fmt: int = OBSERVATION_FORMAT) -> np.ndarray:
    """:func:`observation_vector` as float32 (the env's Box)."""
    return np.array(observation_vector(obs, fmt), dtype=np.float32)


def _signed(u: float) -> float:
    """[0, 1] -> [-1, 1], clipped."""
    return min(1.0, max(-1.0, 2.0 * float(u) - 1.0))


class KnobsActionMap:
    """Maps an action vector in ``[-1, 1]^6`` to :class:`Knobs` and back (see module docstring).

    Parameters
    ----------
    max_uncertainty_weight, wait_range, max_slack_weight, min_batch_fraction, offload_range
        The ranges the entries are mapped to; the defaults suit the packaged profiles.
    """

    size = len(ACTION_FIELDS)

    def __init__(
        self,
        *,
        max_uncertainty_weight: float = 2.0,
        wait_range: tuple[float, float] = (1e-3, 1.0),
        max_slack_weight: float = 1.0,
        min_batch_fraction: float = 1.0 / 16.0,
        offload_range: tuple[float, float] = (32.0, 4096.0),
    ) -> None:
        if not (0 < wait_range[0] < wait_range[1]) or not (0 < offload_range[0] < offload_range[1]):
            raise ValueError("wait_range and offload_range must be (low, high) with 0 < low < high")
        if not 0 < min_batch_fraction <= 1:
            raise ValueError(f"min_batch_fraction must be in (0, 1], got {min_batch_fraction!r}")
        self.max_uncertainty_weight = float(max_uncertainty_weight)
        self.max_slack_weight = float(max_slack_weight)
        self.min_batch_fraction = float(min_batch_fraction)
        self._log_wait = (math.log(wait_range[0]), math.log(wait_range[1]))
        self._log_offload = (math.log(offload_range[0]), math.log(offload_range[1]))

    def to_knobs(self, action: Sequence[float] | np.ndarray, primary_max_batch: int) -> Knobs:
        """Knobs for one action; entries outside [-1, 1] are clipped (SB3 samples a Gaussian),
        so any action is valid."""
        if len(action) != self.size:
            raise ValueError(f"expected an action of {self.size} numbers, got {len(action)}")
        # plain floats: for six numbers Python arithmetic beats numpy's per-call overhead, and
        # this runs every epoch inside the controller
        values = action.tolist() if isinstance(action, np.ndarray) else list(action)
        u = [(min(1.0, max(-1.0, float(a))) + 1.0) / 2.0 for a in values]
        lo, hi = self._log_wait
        wait = math.exp(lo + u[2] * (hi - lo))
        frac = self.min_batch_fraction + u[4] * (1.0 - self.min_batch_fraction)
        batch = max(1, min(primary_max_batch, round(frac * max(1, primary_max_batch))))
        lo, hi = self._log_offload
        threshold = math.exp(lo + u[5] * (hi - lo))
        return Knobs(
            length_weight=u[0],
            uncertainty_weight=u[1] * self.max_uncertainty_weight,
            wait_weight=wait,
            slack_weight=u[3] * self.max_slack_weight,
            max_batch_size=int(batch),
            offload_threshold=threshold,
        )

    def to_action(self, knobs: Knobs, primary_max_batch: int) -> np.ndarray:
        """The action closest to ``knobs`` (knobs outside the ranges are clipped to them)."""
        lo_w, hi_w = self._log_wait
        lo_o, hi_o = self._log_offload
        batch = knobs.max_batch_size or primary_max_batch
        frac = batch / max(1, primary_max_batch)
        threshold = min(knobs.offload_threshold, math.exp(hi_o))  # inf (off) -> the top
        return np.array(
            [
                _signed(knobs.length_weight),
                _signed(knobs.uncertainty_weight / self.max_uncertainty_weight),
                _signed((math.log(max(knobs.wait_weight, 1e-12)) - lo_w) / (hi_w - lo_w)),
                _signed(knobs.slack_weight / self.max_slack_weight),
                _signed((frac - self.min_batch_fraction) / (1.0 - self.min_batch_fraction)),
                _signed((math.log(threshold) - lo_o) / (hi_o - lo_o)),
            ],
            dtype=np.float32,
        )

    def knobs(self, action: Sequence[float] | np.ndarray, obs: Observation) -> Knobs:
        """Knobs for ``action`` taken at ``obs`` (this map reads only the primary's maximum)."""
        return self.to_knobs(action, max(1, obs.primary_max_batch))


class RelativeKnobsActionMap(KnobsActionMap):
    """Action format 2: the weights as in format 1, the two knobs with a scale relative to what
    the observation says, so the same action means the same on any executor and prompt mix.

    - batch cap: the primary's knee batch times ``2 ** (batch_octaves * a)`` (a = 0: the knee,
      the heuristic's choice), within [1, the primary's maximum]; the maximum where the knee is
      unknown;
    - offload threshold: the median predicted length of the waiting requests times
      ``2 ** (offload_octaves * a)`` (a = 0: the longer half of the queue, the heuristic's choice
      under load); offloading off for ``a >= off_above``, with no queue, or no secondary.

    >>> from rtlm_adapt.observation import Observation
    >>> obs = Observation(now=0.0, queue_length=9, primary_running=4, primary_max_batch=64,
    ...     secondary_running=0, secondary_max_batch=4, pred_len_mean=250.0, pred_len_p90=600.0,
    ...     uncertainty_mean=0.3, oldest_wait_s=5.0, min_slack_s=9.0, arrival_rate=1.0,
    ...     service_time_s=10.0, load=0.9, recent_response_s=20.0, recent_miss_rate=0.0,
    ...     step_time_s=0.1, primary_knee_batch=16, pred_len_p50=200.0)
    >>> k = RelativeKnobsActionMap().knobs([1, 0, 0, -1, 0, 0], obs)
    >>> k.max_batch_size, k.offload_threshold
    (16, 200.0)
    >>> RelativeKnobsActionMap().knobs([1, 0, 0, -1, 1, 1], obs).offload_threshold
    inf
    """

    def __init__(
        self, *, batch_octaves: float = 2.0, offload_octaves: float = 3.0,
        off_above: float = 0.9, **kwargs: float
    ) -> None:
        super().__init__(**kwargs)
        self.batch_octaves = float(batch_octaves)
        self.offload_octaves = float(offload_octaves)
        self.off_above = float(off_above)

    def knobs(self, action: Sequence[float] | np.ndarray, obs: Observation) -> Knobs:
        cap = max(1, obs.primary_max_batch)
        base = self.to_knobs(action, cap)  # the weights; batch and threshold replaced below
        a_batch = min(1.0, max(-1.0, float(action[4])))
        a_offload = min(1.0, max(-1.0, float(action[5])))
        knee = obs.primary_knee_batch if obs.primary_knee_batch > 0 else cap
        batch = max(1, min(cap, round(knee * 2.0 ** (self.batch_octaves * a_batch))))
        median = obs.pred_len_p50 if obs.pred_len_p50 > 0 else obs.pred_len_mean
        threshold = math.inf
        if a_offload < self.off_above and median > 0 and obs.secondary_max_batch > 0:
            threshold = median * 2.0 ** (self.offload_octaves * a_offload)
        return base.replace(max_batch_size=int(batch), offload_threshold=threshold)


class LogKnobsActionMap(KnobsActionMap):
    """Action format 3: the weights as in format 1; the batch cap and the offload threshold on
    log scales that need nothing from the queue, so an empty queue changes neither.

    - batch cap: the primary's maximum times ``2 ** (batch_octaves * (a - full_above) /
      (1 + full_above))`` for ``a < full_above``, the maximum itself for ``a >= full_above``
      (a plateau: a noisy actor still gets the full cap); defaults: ``a = -1`` is 1/16 of it,
      ``a = 0`` 0.57 of it, ``a >= 0.25`` all of it;
    - offload threshold: ``min_offload * 2 ** (offload_octaves * (a + 1) / 2)`` predicted
      tokens; defaults: 8 tokens at ``a = -1``, 32 at -0.5, 128 at 0, 1024 at 0.75; offloading
      off for ``a >= off_above`` and without a secondary.

    A token count belongs to the prompts and the model's tokenizer, not to the executor, so the
    threshold means the same on a CPU and a GPU; the observation stays format 2's scale-free
    vector.

    >>> from rtlm_adapt.observation import Observation
    >>> empty = Observation(now=0.0, queue_length=0, primary_running=4, primary_max_batch=64,
    ...     secondary_running=0, secondary_max_batch=4, pred_len_mean=0.0, pred_len_p90=0.0,
    ...     uncertainty_mean=0.0, oldest_wait_s=0.0, min_slack_s=float("inf"), arrival_rate=1.0,
    ...     service_time_s=10.0, load=0.9, recent_response_s=20.0, recent_miss_rate=0.0,
    ...     step_time_s=0.1, primary_knee_batch=16)
    >>> amap = LogKnobsActionMap()
    >>> k = amap.knobs([1, 0, 0, -1, 0.5, -0.5], empty)  # the queue is empty: still offloads
    >>> k.max_batch_size, k.offload_threshold
    (64, 32.0)
    >>> k = amap.knobs([1, 0, 0, -1, -1, 1], empty)
    >>> k.max_batch_size, k.offload_threshold
    (4, inf)
    >>> [round(float(x), 3) for x in amap.to_action(amap.to_knobs([1, 0, 0, -1, 0, 0], 64), 64)]
    [1.0, 0.0, 0.0, -1.0, 0.003, 0.0]
    """

    def __init__(
        self,
        *,
        batch_octaves: float = 4.0,
        full_above: float = 0.25,
        min_offload: float = 8.0,
        offload_octaves: float = 8.0,
        off_above: float = 0.9,
        **kwargs: float,
    ) -> None:
        super().__init__(**kwargs)
        if batch_octaves <= 0 or offload_octaves <= 0 or min_offload <= 0:
            raise ValueError("batch_octaves, offload_octaves and min_offload must be positive")
        if not -1 < full_above <= 1 or not -1 < off_above:
            raise ValueError("full_above must be in (-1, 1] and off_above above -1")
        self.batch_octaves = float(batch_octaves)
        self.full_above = float(full_above)
        self.min_offload = float(min_offload)
        self.offload_octaves = float(offload_octaves)
        self.off_above = float(off_above)

    def to_knobs(self, action: Sequence[float] | np.ndarray, primary_max_batch: int) -> Knobs:
        base = super().to_knobs(action, primary_max_batch)  # the weights; the rest below
        a_batch = min(1.0, max(-1.0, float(action[4])))
        a_offload = min(1.0, max(-1.0, float(action[5])))
        cap = max(1, primary_max_batch)
        octaves = self.batch_octaves * (min(a_batch, self.full_above) - self.full_above)
        batch = max(1, min(cap, round(cap * 2.0 ** (octaves / (1.0 + self.full_above)))))
        threshold = math.inf
        if a_offload < self.off_above:
            threshold = self.min_offload * 2.0 ** (self.offload_octaves * (a_offload + 1) / 2)
        return base.replace(max_batch_size=int(batch), offload_threshold=threshold)

    def to_action(self, knobs: Knobs, primary_max_batch: int) -> np.ndarray:
        action = super().to_action(knobs, primary_max_batch)  # the weights; the rest below
        cap = max(1, primary_max_batch)
        frac = min(1.0, (knobs.max_batch_size or cap) / cap)
        below = math.log2(frac) * (1.0 + self.full_above) / self.batch_octaves  # <= 0
        action[4] = min(self.full_above, max(-1.0, self.full_above + below))
        threshold = knobs.offload_threshold
        if math.isfinite(threshold):
            octaves = math.log2(max(threshold, self.min_offload) / self.min_offload)
            action[5] = min(self.off_above, 2.0 * octaves / self.offload_octaves - 1.0)
        else:
            action[5] = 1.0
        return action

    def knobs(self, action: Sequence[float] | np.ndarray, obs: Observation) -> Knobs:
        """Knobs for ``action`` taken at ``obs``: the primary's maximum sets the batch cap's
        scale; without a secondary nothing is offloaded."""
        knobs = self.to_knobs(action, max(1, obs.primary_max_batch))
        if obs.secondary_max_batch <= 0 and math.isfinite(knobs.offload_threshold):
            knobs = replace(knobs, offload_threshold=math.inf)
        return knobs


class TypicalLengthActionMap(LogKnobsActionMap):
    """Action format 5: format 3's map with the offload threshold scaled to the prompt mix.

    Format 3's threshold is a token count, and token counts belong to the prompts: a policy
    trained where a typical answer is 250-500 tokens offloads almost nothing of a mix whose
    answers are 70 tokens (BENCHMARKS.md 4.5). Here the threshold is format 3's times
    ``typical_len / reference_len``, with ``typical_len`` the smoothed predicted length of the
    requests arriving (:attr:`Observation.typical_len`, known with an empty queue too). At the
    reference length (256 tokens, within the training mixes' range) both maps agree, so a
    format-4 model's weights start a format-5 run where they stood; before the first arrival the
    reference length stands in.

    >>> from rtlm_adapt.observation import Observation
    >>> short = Observation(now=0.0, queue_length=0, primary_running=4, primary_max_batch=64,
    ...     secondary_running=0, secondary_max_batch=4, pred_len_mean=0.0, pred_len_p90=0.0,
    ...     uncertainty_mean=0.0, oldest_wait_s=0.0, min_slack_s=float("inf"), arrival_rate=1.0,
    ...     service_time_s=10.0, load=0.9, recent_response_s=20.0, recent_miss_rate=0.0,
    ...     step_time_s=0.1, primary_knee_batch=16, typical_len=64.0)
    >>> action = [1, 0, 0, -1, 0.5, 0]             # format 3: offload above 128 tokens
    >>> TypicalLengthActionMap().knobs(action, short).offload_threshold   # a mix 4x shorter
    32.0
    >>> TypicalLengthActionMap().knobs(action, replace(short, typical_len=0.0)).offload_threshold
    128.0
    """

    def __init__(self, *, reference_len: float = 256.0, **kwargs: float) -> None:
        super().__init__(**kwargs)
        if not reference_len > 0:
            raise ValueError(f"reference_len must be positive, got {reference_len!r}")
        self.reference_len = float(reference_len)

    def knobs(self, action: Sequence[float] | np.ndarray, obs: Observation) -> Knobs:
        knobs = super().knobs(action, obs)
        if obs.typical_len > 0 and math.isfinite(knobs.offload_threshold):
            scaled = knobs.offload_threshold * obs.typical_len / self.reference_len
            knobs = replace(knobs, offload_threshold=scaled)
        return knobs


class AgingBoundActionMap(LogKnobsActionMap):
    """Action format 6: format 3's (and 4's) map, with the RT-LM heuristic's hard aging bound
    (:func:`~rtlm_adapt.policies.heuristic.hard_aging_bound_s`) as the knobs' ``max_wait_s``.

    The action has no entry for the bound, so the other maps leave it off: a learned policy
    then bounds no request's wait, and over long runs its p99 was no better than the
    heuristic's (BENCHMARKS.md 4.6). The bound comes from the observation, as the heuristic's
    does.

    >>> from rtlm_adapt.observation import Observation
    >>> obs = Observation(now=0.0, queue_length=3, primary_running=4, primary_max_batch=16,
    ...     secondary_running=0, secondary_max_batch=0, pred_len_mean=200.0, pred_len_p90=400.0,
    ...     uncertainty_mean=0.2, oldest_wait_s=5.0, min_slack_s=9.0, arrival_rate=1.0,
    ...     service_time_s=2.0, load=0.9, recent_response_s=10.0, recent_miss_rate=0.0,
    ...     step_time_s=0.05)
    >>> action = [1, 0, 0, -1, 0.5, 0]
    >>> LogKnobsActionMap().knobs(action, obs).max_wait_s
    inf
    >>> AgingBoundActionMap().knobs(action, obs).max_wait_s
    30.0
    """

    def knobs(self, action: Sequence[float] | np.ndarray, obs: Observation) -> Knobs:
        return replace(super().knobs(action, obs), max_wait_s=hard_aging_bound_s(obs))


#: The action map of each model format (the same numbers as the observation formats).
ACTION_MAPS: dict[int, type[KnobsActionMap]] = {
    1: KnobsActionMap,
    2: RelativeKnobsActionMap,
    3: LogKnobsActionMap,
    4: LogKnobsActionMap,
    5: TypicalLengthActionMap,
    6: AgingBoundActionMap,
}
