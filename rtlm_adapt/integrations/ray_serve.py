"""Scale-out on Ray Serve: an OpenAI-compatible ingress, engine replicas, one shared learner.

::

    HTTP -> Ingress (FastAPI; N replicas)           predict, key, offload flag (Front)
              |  handle.generate.remote(body, rtlm_predicted_tokens=..., rtlm_priority=...,
              |                         rtlm_offload=...)
              v  LengthAwareRouter (in each ingress process)
           Engine replicas (M)                       own priority queue (lowest key first)
              |  answer with usage
           Ingress -> LearnerActor.learn([(features, true tokens)])  (one, detached, restartable)
                   <- LearnerActor.model(version)  every pull_every_s: a fresh predictor copy

Serve has no priority queue of its own: the ordering lives inside each engine replica, whose
queue takes the ingress's key as vLLM takes ``priority``. The engine here is the paced stand-in
(:class:`~rtlm_adapt.integrations.paced_engine.PacedEngine`): the point of this layer is the
routing, and the stand-in makes it measurable on a CPU.

``build_app`` makes the application for ``serve run`` (see ``examples/ray_serve_config.yaml``)::

    serve run examples.ray_serve_app:app
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from rtlm_adapt.gateway.errors import APIError, error_response
from rtlm_adapt.gateway.paced_backend import token_text
from rtlm_adapt.gateway.schemas import ChatCompletionRequest, CompletionRequest, prompt_text
from rtlm_adapt.integrations.front import Front, openai_answer
from rtlm_adapt.integrations.learner import SharedLearner
from rtlm_adapt.integrations.paced_engine import QUEUE_ORDERS, PacedEngine, speed_for_rank
from rtlm_adapt.integrations.ray_router import LengthAwareRouter
from rtlm_adapt.knobs import Knobs
from rtlm_adapt.predictor import LengthPredictor

logger = logging.getLogger(__name__)

ROUTERS = ("length-aware", "power-of-two")
#: Requests a replica takes at once before Serve queues them in the caller: high, so that
#: requests wait in the engine's own priority queue, where the key orders them.
MAX_ONGOING = 1000


@dataclass(frozen=True)
class ScaleOutSettings:
    """Everything ``build_app`` needs (the ``args`` of a ``serve run`` config).

    Attributes
    ----------
    engine_replicas, slots, tokens_per_s, ttft_s
        Engine replicas, and each one's concurrent generations, decode speed per generation
        and time to first token (the paced engine).
    queue_order
        How each engine orders its waiting requests: ``priority`` (the ingress's key, as vLLM's
        ``--scheduling-policy priority``) or ``fcfs`` (arrival order, vLLM's default).
    replica_speed_factors
        Unequal replicas: the engine of replica rank ``i`` runs at ``tokens_per_s *
        replica_speed_factors[i]`` (ranks beyond the list at ``tokens_per_s``; empty: all
        equal). Each replica reports its own speed to the router.
    router
        ``length-aware`` (:class:`LengthAwareRouter`) or ``power-of-two`` (Serve's default).
    long_replicas
        Engine replicas reserved for offload-eligible requests (length-aware router only).
    offload_threshold
        Predicted tokens at or above which a request is offload-eligible (inf: never).
    ingress_replicas
        Ingress replicas (each predicts with its own copy of the shared predictor).
    learner_name, learner_state_dir, pull_every_s
        The shared learner actor's name, its snapshot/journal folder, and how often each
        ingress pulls a fresh predictor. With ``learner_state_dir`` None the learner keeps its
        state in memory only: a restarted learner starts again from the pretrained predictor.
    model
        The model name the API reports.
    routing_stats_period_s
        How often Serve polls each engine's ``record_routing_stats``.
    engine_cpus, engine_gpus, ingress_cpus
        Ray resources per replica (a real engine on a GPU node: ``engine_gpus=1``).
    """

    engine_replicas: int = 2
    slots: int = 4
    tokens_per_s: float = 200.0
    ttft_s: float = 0.0
    queue_order: str = "priority"
    replica_speed_factors: tuple[float, ...] = ()
    router: str = "length-aware"
    long_replicas: int = 0
    offload_threshold: float = math.inf
    ingress_replicas: int = 1
    learner_name: str = "rtlm-learner"
    learner_state_dir: str | None = None
    pull_every_s: float = 2.0
    model: str = "paced"
    routing_stats_period_s: float = 1.0
    engine_cpus: float = 0.5
    engine_gpus: float = 0.0
    ingress_cpus: float = 0.25

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.engine_replicas < 1 or self.ingress_replicas < 1:
            raise ValueError("need at least one engine and one ingress replica")
        if self.queue_order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order must be one of {QUEUE_ORDERS}, got {self.queue_order!r}")
        # A YAML config gives a list; keep the frozen settings hashable.
        object.__setattr__(self, "replica_speed_factors", tuple(self.replica_speed_factors))
        if any(f <= 0 for f in self.replica_speed_factors):
            raise ValueError("replica_speed_factors must all be > 0")
        self.knobs()  # a bad threshold fails here, at build time, not in every replica

    def knobs(self) -> Knobs:
        """The policy knobs the ingress keys and flags requests with."""
        return Knobs(offload_threshold=self.offload_threshold)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ScaleOutSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**args)

    def router_config(self) -> RequestRouterConfig:
        """The engine deployment's router (Serve's default for ``power-of-two``)."""
        if self.router == "power-of-two":
            return RequestRouterConfig(request_routing_stats_period_s=self.routing_stats_period_s)
        return RequestRouterConfig(
            request_router_class=LengthAwareRouter,
            request_router_kwargs={
                "long_replicas": self.long_replicas,
                # Other ingress replicas' requests show only in the replicas' reports.
                "count_reported_backlog": self.ingress_replicas > 1,
            },
            request_routing_stats_period_s=self.routing_stats_period_s,
        )


# -- the shared learner --------------------------------------------------------------------------
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LearnerActor:
    """The one :class:`SharedLearner`, as a restartable actor (state under ``state_dir``)."""

    def __init__(self, state_dir: str | None) -> None:
        self.learner = SharedLearner(state_dir)

    def learn(self, examples: list[tuple[Any, int]]) -> int:
        return self.learner.learn(examples)

    def model(self, have: int = -1) -> tuple[int, bytes] | None:
        return self.learner.model(have)

    def learned(self) -> int:
        return self.learner.learned

    def info(self) -> dict[str, Any]:
        """What it has learned, and which process it runs in (a restart changes it)."""
        return {"learned": self.learner.learned, "pid": os.getpid()}

    def save(self) -> None:
        self.learner.save()


def learner_actor(name: str, state_dir: str | None) -> ray.actor.ActorHandle:
    """The named learner, created on first use. Detached: it must outlive whichever ingress
    replica happened to create it (an owned actor dies with its owner)."""
    return LearnerActor.options(
        name=name, namespace="rtlm", lifetime="detached", get_if_exists=True
    ).remote(state_dir)


class LearnerLink:
    """An ingress replica's side of the learner: teach it, pull its predictor now and then."""

    def __init__(self, actor: ray.actor.ActorHandle, front: Front, pull_every_s: float) -> None:
        self.actor = actor
        self.front = front
        self.pull_every_s = pull_every_s
        self.version = -1
        self._next_pull = 0.0
        self._pending: set[asyncio.Task[Any]] = set()

    def teach(self, features: Any, tokens: int) -> None:
        """Send one finished request (in the background; Ray retries it through a restart)."""
        task = asyncio.ensure_future(self._send(features, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, features: Any, tokens: int) -> None:
        try:
            await self.actor.learn.remote([(features, tokens)])
        except Exception:  # the request is answered already; say what was not learned
            logger.exception("the learner did not take an example")

    async def maybe_pull(self) -> None:
        """Replace the local predictor with the learner's if it is newer (every pull_every_s)."""
        now = time.monotonic()
        if now < self._next_pull:
            return
        self._next_pull = now + self.pull_every_s
        try:
            fresh = await self.actor.model.remote(self.version)
        except (RayActorError, ActorUnavailableError):
            logger.warning("the learner is unavailable; predicting with the last copy")
            return
        if fresh is not None:
            self.version, blob = fresh
            self.front.predictor = pickle.loads(blob)


# -- the engine ----------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class Engine:
    """One engine replica: the paced stand-in with its queue (by priority or first come)."""

    def __init__(
        self,
        slots: int,
        tokens_per_s: float,
        ttft_s: float,
        queue_order: str = "priority",
        speed_factors: tuple[float, ...] = (),
    ) -> None:
        context = serve.get_replica_context()
        rank = getattr(context.rank, "rank", context.rank)  # a ReplicaRank in Ray 2.60
        speed = speed_for_rank(tokens_per_s, speed_factors, int(rank))
        self.engine = PacedEngine(slots, speed, ttft_s, queue_order)
        self.replica = context.replica_id.unique_id

    async def generate(
        self,
        body: dict[str, Any],
        *,
        rtlm_predicted_tokens: float = 0.0,
        rtlm_priority: int = 0,
        rtlm_offload: bool = False,
    ) -> dict[str, Any]:
        """Generate ``body["max_tokens"]`` tokens; the answer says which replica ran it."""
        max_tokens = int(body.get("max_tokens") or 16)
        result = await self.engine.generate(
            max_tokens, priority=int(rtlm_priority), predicted_tokens=float(rtlm_predicted_tokens)
        )
        return {
            "replica": self.replica,
            "text": "".join(token_text(i) for i in range(min(result.output_tokens, 64))),
            "completion_tokens": result.output_tokens,
            "queued_s": result.queued_s,
            "service_s": result.service_s,
            "offload": bool(rtlm_offload),
            "tokens_per_s": self.engine.tokens_per_s,  # per slot: tells unequal replicas apart
        }

    def record_routing_stats(self) -> dict[str, float]:
        """Polled by Serve; read by LengthAwareRouter as ``RunningReplica.routing_stats``."""
        return self.engine.stats()


# -- the ingress ---------------------------------------------------------------------------------
app = FastAPI(title="rtlm-adapt on Ray Serve", version="0.1.0")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    return error_response(400, str(first.get("msg", "invalid request")))


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
@serve.ingress(app)
class Ingress:
    """The OpenAI-compatible front: predicts, keys and flags each request, then calls an
    engine replica through the handle (the router picks which), and teaches the learner."""

    def __init__(self, engine: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.settings = ScaleOutSettings.from_args(settings)
        self.engine = engine
        self.front = Front(
            LengthPredictor.pretrained(), self.settings.knobs(), self.settings.tokens_per_s
        )
        actor = learner_actor(self.settings.learner_name, self.settings.learner_state_dir)
        self.learner = LearnerLink(actor, self.front, self.settings.pull_every_s)
        self.ended = {"completed": 0, "failed": 0}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> JSONResponse:
        return await self._serve(body, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> JSONResponse:
        return await self._serve(body, "chat.completion")

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.settings.model, "object": "model"}]}

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "learner_version": self.learner.version, **self.ended}

    @app.get("/v1/rtlm/settings")
    async def describe(self) -> dict[str, Any]:
        return asdict(self.settings)

    async def _serve(
        self, body: ChatCompletionRequest | CompletionRequest, kind: str
    ) -> JSONResponse:
        if body.stream:
            raise APIError(400, "stream=true is not supported on the Ray Serve ingress yet")
        await self.learner.maybe_pull()
        text = prompt_text(body).strip() or "?"
        plan = self.front.plan(text)
        payload = body.model_dump(exclude_unset=True)
        answer = await self._call_engine(payload, plan.handle_kwargs())
        tokens = int(answer["completion_tokens"])
        self.learner.teach(plan.features, tokens)
        self.ended["completed"] += 1
        prompt_tokens = max(1, int(plan.features.get("prompt_tokens_est", 1)))
        reply = openai_answer(kind, self.settings.model, answer["text"], prompt_tokens, tokens)
        headers = {
            "x-rtlm-replica": str(answer["replica"]),
            "x-rtlm-predicted-tokens": f"{plan.predicted_tokens:.1f}",
            "x-rtlm-offload": str(plan.offload).lower(),
        }
        return JSONResponse(reply, headers=headers)

    async def _call_engine(self, payload: dict[str, Any], kwargs: dict[str, Any]) -> dict:
        """One retry on another replica if the first dies under the request; then a 502 whose
        message starts with the failure reason."""
        for attempt in (1, 2):
            try:
                return await self.engine.generate.remote(payload, **kwargs)
            except (RayActorError, ActorUnavailableError) as exc:
                logger.warning("engine replica lost a request (attempt %d): %s", attempt, exc)
        self.ended["failed"] += 1
        message = "executor_failure: the engine replica died twice"
        raise APIError(502, message, kind="upstream_error")


def engine_app(settings: ScaleOutSettings) -> serve.Application:
    """The engine replicas alone, behind the chosen router (callers use the handle)."""
    return Engine.options(
        num_replicas=settings.engine_replicas,
        request_router_config=settings.router_config(),
        ray_actor_options={"num_cpus": settings.engine_cpus, "num_gpus": settings.engine_gpus},
    ).bind(
        settings.slots,
        settings.tokens_per_s,
        settings.ttft_s,
        settings.queue_order,
        settings.replica_speed_factors,
    )


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application (``serve run module:build_app`` with ``args`` from the config)."""
    settings = ScaleOutSettings.from_args(dict(args or {}))
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": settings.ingress_cpus},
    ).bind(engine_app(settings), asdict(settings))


__all__ = [
    "ROUTERS",
    "Engine",
    "Ingress",
    "LearnerActor",
    "LearnerLink",
    "ScaleOutSettings",
    "build_app",
    "engine_app",
    "learner_actor",
]
