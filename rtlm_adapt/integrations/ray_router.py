"""``LengthAwareRouter``: a Ray Serve request router that ranks replicas by predicted work.

Select it on the engine deployment::

    from ray.serve.config import RequestRouterConfig
    from rtlm_adapt.integrations.ray_router import LengthAwareRouter

    @serve.deployment(
        num_replicas=2,
        request_router_config=RequestRouterConfig(
            request_router_class=LengthAwareRouter,
            request_router_kwargs={"long_replicas": 1},
            request_routing_stats_period_s=1.0,
        ),
    )
    class Engine: ...

and call the handle with the prediction as keyword arguments (the engine method receives them
too)::

    await handle.generate.remote(payload, rtlm_predicted_tokens=412.0, rtlm_priority=9,
                                 rtlm_offload=False)

What it does with Serve's hooks (a :class:`~rtlm_adapt.integrations.routing.WorkBook` holds the
state; every process holding a handle has its own router and so its own book):

- ``choose_replicas``: ranks the candidates, least predicted seconds of work first (the
  offload-eligible to the long group first), one replica per rank so the order holds, and
  reserves the request's predicted tokens on the first choice at once, so that a burst of
  concurrent requests does not all see the same idle replica;
- ``on_request_routed``: moves the reservation to the replica that took the request;
- ``on_request_completed``: releases it;
- replicas' ``record_routing_stats`` (read from ``RunningReplica.routing_stats``): each
  replica's speed, so the ranking is in seconds, and with ``count_reported_backlog`` (several
  ingress replicas) its backlog from all callers. Serve polls the stats every
  ``request_routing_stats_period_s``: a backlog that old misleads a single caller, whose own
  book is exact (measured here, 2 replicas, one caller: mean response time 1.06x
  power-of-two's with it, 1.02x without).

Requests without ``rtlm_predicted_tokens`` count as ``default_tokens``.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from rtlm_adapt.integrations.routing import OFFLOAD_KW, PREDICTED_TOKENS_KW, WorkBook


class LengthAwareRouter(RequestRouter):
    """Least predicted outstanding work first, long requests to the long replica group."""

    def initialize_state(
        self,
        long_replicas: int = 0,
        default_tokens: float = 256.0,
        count_reported_backlog: bool = False,
        **_: Any,
    ) -> None:
        """Settings from ``RequestRouterConfig.request_router_kwargs``.

        Parameters
        ----------
        long_replicas
            How many replicas (the last in id order) form the long group; 0: none.
        default_tokens
            Predicted tokens of a request that carries no prediction.
        count_reported_backlog
            Count each replica's reported backlog (other callers' requests) too.
        """
        self.long_replicas = int(long_replicas)
        self.default_tokens = float(default_tokens)
        self.count_reported_backlog = bool(count_reported_backlog)
        self.book = WorkBook()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        for replica in candidate_replicas:
            if replica.routing_stats:
                self.book.report(
                    replica.replica_id.unique_id,
                    replica.routing_stats,
                    backlog=self.count_reported_backlog,
                )
        tokens, offload = self._inputs(pending_request)
        ranked = self.book.rank(list(by_id), offload=offload, long_replicas=self.long_replicas)
        if ranked and pending_request is not None:
            self.book.reserve(
                pending_request.metadata.internal_request_id, ranked[0], tokens, confirmed=False
            )
        return [[by_id[r]] for r in ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        tokens, _ = self._inputs(pending_request)
        self.book.reserve(
            pending_request.metadata.internal_request_id,
            replica_id.unique_id,
            tokens,
            confirmed=True,
        )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.book.release(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        book = getattr(self, "book", None)  # Serve may call this before initialize_state
        if book is not None:
            book.forget([r.replica_id.unique_id for r in replicas])

    def _inputs(self, pending_request: PendingRequest | None) -> tuple[float, bool]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        tokens = kwargs.get(PREDICTED_TOKENS_KW)
        try:
            tokens = float(tokens) if tokens is not None else self.default_tokens
        except (TypeError, ValueError):
            tokens = self.default_tokens
        return max(0.0, tokens), bool(kwargs.get(OFFLOAD_KW, False))


__all__ = ["LengthAwareRouter"]
