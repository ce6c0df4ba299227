"""Online latency model of one executor: recursive least squares on the StepCost linear form.

A :class:`~rtlm_adapt.calibration.step_cost.StepCost` profile is measured once, offline; the
machine it serves on then drifts (thermal throttling, a noisy neighbour, another model sharing the
GPU). :class:`LatencyModel` starts from the profile and refits its five coefficients from every
observed executor step, with exponential forgetting so that old timings fade out.

Why these choices:

* **RLS in relative units** -- the coefficients span six orders of magnitude (seconds per step
  vs. seconds per context token), so each is estimated as a multiple of its prior value, which
  keeps the covariance well conditioned and makes "prior_rel_std=1" mean the same for all five.
  Each observation is divided by the duration the *prior* predicts for it, so the fit minimizes
  (roughly) relative error: timing noise grows with the step time, and a 10 ms step should
  count as much as a 1 s step. The weights are fixed (not the current estimate's prediction):
  otherwise, after a 2x slowdown, new observations would count 4x less than the old ones and
  tracking would lag.
* **bounded covariance** -- with forgetting, directions the workload never excites (e.g. batch
  size stuck at 16) would see their covariance grow without bound and then jump on the first
  unusual step ("wind-up"). After every update each variance is capped at its prior value by a
  diagonal congruence, which keeps the matrix positive semi-definite.
* **clipped innovations** -- a GC pause or a preempted step can take 10x longer; the innovation is
  clipped at a few robust standard deviations so one outlier cannot swing the fit, while a
  lasting slowdown still gets through (the scale estimate grows within a few steps).

>>> from rtlm_adapt.calibration.step_cost import StepCost
>>> prior = StepCost("cpu", 0.02, 0.002, 1e-6, 0.01, 2e-4)
>>> m = LatencyModel(prior)
>>> round(m.step_time(batch_size=4, context_tokens=1000), 6) == round(prior.step_time(4, 1000), 6)
True
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from rtlm_adapt.calibration.step_cost import StepCost

logger = logging.getLogger(__name__)

#: A single iteration longer than this is treated as a broken clock, not a measurement.
MAX_ITERATION_S = 600.0

_COEF_NAMES = (
    "decode_s_base",
    "decode_s_per_seq",
    "decode_s_per_ctx_token",
    "prefill_s_base",
    "prefill_s_per_token",
)


class LatencyModel:
    """Step-time model of one executor, refit online from observed timings.

    Parameters
    ----------
    prior
        The profile to start from; its non-coefficient fields (name, max batch size, ...) are
        carried into :meth:`coefficients`.
    forgetting
        RLS forgetting factor in (0, 1]; observations older than about ``1 / (1 - forgetting)``
        steps have faded (200 steps at the default).
    prior_rel_std
        Prior standard deviation of each coefficient, relative to its prior value. Also caps how
        uncertain a coefficient may become under forgetting.
    noise_rel_std
        Assumed relative timing noise of one observation; the ratio of the two sets how much the
        first observations move the estimate.
    typical_context_tokens, typical_prefill_tokens
        Only used to give a coefficient that is 0 in the prior a scale (1% of a typical step at
        these magnitudes), so that it can still be learned.
    outlier_sigmas
        Innovations are clipped at this many robust standard deviations.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(0)
    >>> true = StepCost("gpu", 0.010, 0.001, 2e-6, 0.005, 1e-4)
    >>> m = LatencyModel(StepCost("guess", 0.02, 0.002, 1e-6, 0.01, 2e-4))
    >>> for _ in range(1000):
    ...     b, ctx, pre = rng.randint(1, 16), rng.randint(0, 8000), rng.choice([0, 0, 0, 300])
    ...     ok = m.learn_step(b, ctx, pre, true.step_time(b, ctx, pre) * rng.uniform(0.95, 1.05))
    >>> abs(m.step_time(8, 4000) / true.step_time(8, 4000) - 1) < 0.03
    True
    >>> m.learn_step(1, 10, 0, float("nan"))
    False
    """

    def __init__(
        self,
        prior: StepCost,
        forgetting: float = 0.995,
        *,
        prior_rel_std: float = 1.0,
        noise_rel_std: float = 0.1,
        typical_context_tokens: float | None = None,
        typical_prefill_tokens: float = 512.0,
        outlier_sigmas: float = 5.0,
    ) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        for name, value in (
            ("prior_rel_std", prior_rel_std),
            ("noise_rel_std", noise_rel_std),
            ("typical_prefill_tokens", typical_prefill_tokens),
            ("outlier_sigmas", outlier_sigmas),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.prior = prior
        self.forgetting = float(forgetting)
        self.outlier_sigmas = float(outlier_sigmas)
        b = float(prior.max_batch_size)
        ctx = float(typical_context_tokens) if typical_context_tokens else b * 512.0
        typical_x = np.array([1.0, b, ctx, 1.0, float(typical_prefill_tokens)])
        typical_step = prior.step_time(prior.max_batch_size, int(ctx))
        theta0 = np.array([getattr(prior, k) for k in _COEF_NAMES], dtype=float)
        # We estimate theta = coefficient / _coef_scale (1 at the prior). A zero prior
        # coefficient gets the scale of a term worth 1% of a typical step.
        self._coef_scale = np.maximum(theta0, 0.01 * typical_step / typical_x)
        self._prior_coef = theta0
        self._theta = theta0 / self._coef_scale
        # RLS keeps P = Cov / noise variance; the prior variance in those units is the ratio.
        self._p_max = (prior_rel_std / noise_rel_std) ** 2
        self._P = np.eye(5) * self._p_max
        # Robust scale of the normalized innovation (EWMA of |e|), for outlier clipping.
        self._abs_err = noise_rel_std
        self._n_learned = 0
        self._refresh()

    # -- learning ---------------------------------------------------------------------------
    @property
    def n_learned(self) -> int:
        """Number of observations accepted by :meth:`learn_step`."""
        return self._n_learned

    def learn_step(
        self,
        batch_size: int,
        context_tokens: int,
        prefill_tokens: int,
        duration_s: float,
        iterations: int = 1,
    ) -> bool:
        """Learn from one observed executor call; return False (and log why) if rejected.

        Parameters
        ----------
        batch_size
            Sequences decoded per iteration (constant over a fused call).
        context_tokens
            Total context tokens of the batch at the first iteration; it grows by
            ``batch_size`` per iteration.
        prefill_tokens
            Tokens prefilled, all in the first iteration.
        duration_s
            Wall time of the whole call, covering all ``iterations``.
        iterations
            Fused decode iterations in the call; the per-iteration average is what we fit.
        """
        try:
            ok = (
                _is_count(batch_size, minimum=1)
                and _is_count(context_tokens)
                and _is_count(prefill_tokens)
                and _is_count(iterations, minimum=1)
                and not isinstance(duration_s, bool)
                and math.isfinite(duration_s)
                and 0.0 <= duration_s <= MAX_ITERATION_S * iterations
            )
        except TypeError:
            ok = False
        if not ok:
            logger.warning(
                "LatencyModel: rejected step (batch=%r, context=%r, prefill=%r, duration=%r, "
                "iterations=%r)",
                batch_size,
                context_tokens,
                prefill_tokens,
                duration_s,
                iterations,
            )
            return False

        k = float(iterations)
        # Average regressors over the k iterations: the context grows by batch_size per
        # iteration and the prefill happens once, so its indicator and tokens count 1/k.
        mean_ctx = context_tokens + batch_size * (k - 1.0) / 2.0
        has_prefill = 1.0 if prefill_tokens > 0 else 0.0
        raw = np.array([1.0, batch_size, mean_ctx, has_prefill / k, prefill_tokens / k])
        # Divide by the prior's predicted duration (> 0, StepCost guarantees it): relative error
        # with fixed weights, see the module docstring.
        weight = 1.0 / float(raw @ self._prior_coef)
        x = raw * self._coef_scale * weight
        y = duration_s / k * weight

        P, lam = self._P, self.forgetting
        Px = P @ x
        denom = lam + x @ Px
        err = y - x @ self._theta
        # 1.25 * mean|e| ~ std for normal e; the floor keeps a noise-free stream adaptable.
        limit = self.outlier_sigmas * max(1.25 * self._abs_err, 1e-3)
        clipped = max(-limit, min(limit, err))
        # Update the scale from the clipped error: a lasting shift still inflates it by a
        # factor of up to 1 + 0.05 * (limit / scale - 1) per step, so big drifts get through.
        self._abs_err += 0.05 * (abs(clipped) - self._abs_err)
        gain = Px / denom
        self._theta = self._theta + gain * clipped
        P = (P - np.outer(gain, Px)) / lam
        # Anti-wind-up: cap each variance at the prior's with a diagonal congruence D P D,
        # which keeps P symmetric positive semi-definite.
        diag = np.diag(P)
        if diag.max() > self._p_max:
            d = np.sqrt(np.minimum(1.0, self._p_max / np.maximum(diag, 1e-300)))
            P = P * d[:, None] * d[None, :]
        self._P = 0.5 * (P + P.T)
        self._n_learned += 1
        self._refresh()
        return True

    # -- prediction -------------------------------------------------------------------------
    def step_time(self, batch_size: int, context_tokens: int = 0, prefill_tokens: int = 0) -> float:
        """Predicted seconds for one iteration (same form as :meth:`StepCost.step_time`)."""
        t = self._c_base + self._c_seq * batch_size + self._c_ctx * context_tokens
        if prefill_tokens > 0:
            t += self._c_pbase + self._c_ptok * prefill_tokens
        return t

    def service_time(self, prompt_tokens: int, output_tokens: float, batch_size: int = 1) -> float:
        """Predicted seconds to serve one request in a steady batch of ``batch_size`` requests.

        Steady state means the other ``batch_size - 1`` slots hold requests like this one: the
        batch context is ``batch_size`` times this request's, and every slot turns over once
        during its life, so it sits through ``batch_size`` prefills. With ``batch_size=1`` this
        equals :meth:`StepCost.isolated_service_time` under the current coefficients.
        """
        n = output_tokens if output_tokens > 1.0 else 1.0
        b = batch_size if batch_size > 1 else 1
        return (
            n * (self._c_base + self._c_seq * b)
            + self._c_ctx * b * (n * prompt_tokens + n * (n - 1.0) * 0.5)
            + b * (self._c_pbase + self._c_ptok * prompt_tokens)
        )

    def coefficients(self) -> StepCost:
        """The current estimate as a StepCost (other fields copied from the prior)."""
        values = dict(
            zip(
                _COEF_NAMES,
                (self._c_base, self._c_seq, self._c_ctx, self._c_pbase, self._c_ptok),
                strict=True,
            )
        )
        return dataclasses.replace(
            self.prior,
            source=f"online RLS from {self.prior.name!r} after {self._n_learned} steps",
            **values,
        )

    # -- internals --------------------------------------------------------------------------
    def _refresh(self) -> None:
        # Precompute plain-float coefficients (clipped at 0: a negative cost is estimation
        # noise) so step_time/service_time are a handful of float operations.
        c = np.maximum(self._theta, 0.0) * self._coef_scale
        self._c_base, self._c_seq, self._c_ctx, self._c_pbase, self._c_ptok = map(float, c)
        if self._c_base + self._c_seq <= 0.0:
            # StepCost requires a decode step to cost something; keep a token floor.
            self._c_base = 1e-9


def _is_count(value: object, minimum: int = 0) -> bool:
    """An integer (numpy ints too, not bool) >= minimum."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
