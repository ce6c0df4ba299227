"""The gateway's controller: restored from its ``--state`` file, or a new one.

A new controller gets the configured policy, predictor tier and cost profile. A restored one keeps
what it learned; its policy can change at a restart, its predictor's tier cannot (the model's
features differ), so a mismatch is an error that says what to pass.

A learned policy's shadow guard judges on a worker thread here
(:func:`judge_in_background`): the gateway's event loop drives the controller, and must not
pause for the guard's replays.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rtlm_adapt.calibration.step_cost import StepCost
from rtlm_adapt.controller import AdaptiveController
from rtlm_adapt.gateway.config import GatewayConfig
from rtlm_adapt.predictor import LengthPredictor

logger = logging.getLogger(__name__)


def check_state_tier(predictor: LengthPredictor, tier: str, state: str) -> None:
    """A resumed predictor must be the tier asked for: its model cannot change tier."""
    kind, _, name = tier.partition(":")
    learned = predictor.tier
    if learned == "encoder":
        learned = f"encoder:{predictor.prior.encoder_name}"
    if kind != predictor.tier or (name and learned != tier):
        raise ValueError(
            f"the state in {state} was learned with the {learned} tier, not {tier}: "
            f"serve with --tier {learned}, or start a new --state"
        )


def judge_in_background(controller: AdaptiveController) -> AdaptiveController:
    """Have the policy's guard, if it replays traffic, judge off the event loop."""
    guard = getattr(controller.policy, "guard", None)
    if hasattr(guard, "background"):
        guard.background = True
    return controller


def make_controller(config: GatewayConfig) -> AdaptiveController:
    """The controller ``config`` asks for: resumed from ``config.state`` when that file exists,
    its guard judging in the background (:func:`judge_in_background`)."""
    state = config.state
    if state is not None and Path(state).exists():
        controller = AdaptiveController.load(
            state, autosave_path=state, autosave_every=config.state_every
        )
        check_state_tier(controller.predictor, config.tier, state)
        if controller.policy.name != config.policy:
            from rtlm_adapt.policies import make_policy

            logger.info(
                "state %s had policy %s; using %s", state, controller.policy.name, config.policy
            )
            controller.policy = make_policy(config.policy)
        controller.max_queue = config.max_queue
        logger.info("resumed the learned state from %s", state)
        return judge_in_background(controller)
    # Each backend's latency model starts from the configured profile, not the library's
    # default (the transformers executor's, whose prefill cost the gateway never observes).
    prior = StepCost.load(config.profile)
    return judge_in_background(AdaptiveController(
        config.policy,
        predictor=LengthPredictor.pretrained(config.tier),
        profiles={backend.name: prior for backend in config.backends},
        max_queue=config.max_queue,
        autosave_path=state,
        autosave_every=config.state_every,
    ))
