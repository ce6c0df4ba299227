"""The gateway's settings: one record, from the command line or a TOML file.

A TOML file holds the same settings as the flags, plus per-backend options::

    policy = "heuristic"
    max_inflight = 4          # default in-flight cap per backend
    max_queue = 1000
    state = "gateway-state.bin"
    shed = false
    profile = "http-engine-prior"   # where the backends' latency models start

    [[backends]]
    url = "http://127.0.0.1:8000"
    send_priority = true      # the backend runs vLLM with --scheduling-policy priority

    [[backends]]
    url = "http://10.0.0.7:8000"
    role = "secondary"        # takes offloaded (long or uncertain) requests
    max_inflight = 2

>>> cfg = GatewayConfig(backends=(BackendConfig("http://127.0.0.1:8000"),))
>>> cfg.backends[0].name, cfg.backends[0].role
('127.0.0.1:8000', 'primary')
>>> BackendConfig("localhost:8000")
Traceback (most recent call last):
...
ValueError: backend url must start with http:// or https://, got 'localhost:8000'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROLES = ("primary", "secondary")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream OpenAI-compatible server.

    Attributes
    ----------
    url
        Base URL, without the ``/v1`` suffix (``http://host:port``).
    role
        ``primary`` serves everything; ``secondary`` only takes requests the policy offloads.
    max_inflight
        Requests sent to it at once (None: the gateway's default). The policy's batch cap
        lowers it further on primaries: that is consolidation at the gateway.
    send_priority
        Send the controller's priority as vLLM's ``priority`` field. Only for backends that
        accept it (vLLM; it takes effect under ``--scheduling-policy priority``).
    name
        Label in metrics and logs (default: host:port).
    """

    url: str
    role: str = "primary"
    max_inflight: int | None = None
    send_priority: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {self.url!r}")
        parts = urlsplit(self.url)
        if not parts.netloc:
            raise ValueError(f"backend url has no host: {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/").removesuffix("/v1"))
        if self.role not in ROLES:
            raise ValueError(f"backend role must be one of {ROLES}, got {self.role!r}")
        if self.max_inflight is not None:
            _check_int("backend max_inflight", self.max_inflight)
        if not isinstance(self.send_priority, bool):
            raise TypeError(
                f"backend send_priority must be true or false, got {self.send_priority!r}"
            )
        if not self.name:
            object.__setattr__(self, "name", parts.netloc)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything ``rtlm-adapt serve`` needs.

    Attributes
    ----------
    backends
        The upstream servers (at least one primary).
    policy
        A policy name (``heuristic``, ``fcfs``, ``sjf``, ``ppo:PATH``, ...).
    max_inflight
        Default in-flight cap per backend (match vLLM's ``--max-num-seqs``).
    max_queue
        Waiting requests beyond which new ones get 429.
    state
        File where the learned state is autosaved and from which a restart resumes.
    state_every
        Autosave after this many ended requests (and at shutdown).
    shed
        Reject at arrival (503) a request whose deadline the prediction says cannot be met.
    profile
        The cost profile (a packaged name or a JSON path) each backend's latency model starts
        from; it then learns the backend's pace from every request's time per output token.
        The default, ``http-engine-prior``, is a generic continuous-batching engine that the
        fit leaves within a few dozen requests; pass a measured profile to start closer.
    tier
        The length predictor: ``lexical`` (the prompt's words; microseconds, the default) or
        ``encoder`` (adds a prompt embedding: a better offline ranking for 12-14 ms of one CPU
        thread per request with MiniLM here, computed off the event loop; needs torch and
        transformers);
        ``encoder:NAME`` picks the encoder (``minilm``, ``smollm2-l16``).
    request_timeout_s
        Upstream read timeout: no byte for this long counts as a backend failure.
    health_interval_s
        Seconds between backend health checks.
    max_body_bytes
        Larger request bodies get 413.
    host, port
        Where the gateway listens.
    """

    backends: tuple[BackendConfig, ...] = ()
    policy: str = "heuristic"
    max_inflight: int = 4
    max_queue: int = 10_000
    state: str | None = None
    state_every: int = 100
    shed: bool = False
    profile: str = "http-engine-prior"
    tier: str = "lexical"
    request_timeout_s: float = 600.0
    health_interval_s: float = 2.0
    max_body_bytes: int = 4 * 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8080

    def __post_init__(self) -> None:
        backends = tuple(self.backends)
        if not all(isinstance(b, BackendConfig) for b in backends):
            raise TypeError("GatewayConfig.backends must be BackendConfig records")
        object.__setattr__(self, "backends", backends)
        if not any(b.role == "primary" for b in backends):
            raise ValueError("the gateway needs at least one primary backend (--backend URL)")
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique, got {names}")
        if not isinstance(self.policy, str) or not self.policy:
            raise ValueError(f"policy must be a policy name, got {self.policy!r}")
        for name in ("max_inflight", "max_queue", "state_every", "max_body_bytes"):
            _check_int(name, getattr(self, name))
        for name in ("request_timeout_s", "health_interval_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (0 < value < math.inf)
            ):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.shed, bool):
            raise TypeError(f"shed must be true or false, got {self.shed!r}")
        if not isinstance(self.profile, str) or not self.profile:
            raise ValueError(f"profile must be a profile name or path, got {self.profile!r}")
        check_tier(self.tier)
        if (
            isinstance(self.port, bool)
            or not isinstance(self.port, int)
            or not (0 <= self.port <= 65535)
        ):
            raise ValueError(f"port must be an int in 0..65535, got {self.port!r}")

    def inflight_cap(self, backend: BackendConfig) -> int:
        """The backend's own cap, or the gateway's default."""
        return backend.max_inflight if backend.max_inflight is not None else self.max_inflight

    def replace(self, **changes: Any) -> GatewayConfig:
        return replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> GatewayConfig:
        """Settings from a parsed TOML document (unknown keys are an error, not ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown gateway setting(s) {unknown}; known: {sorted(known)}")
        settings = dict(data)
        settings["backends"] = tuple(
            _backend_from_mapping(i, b) for i, b in enumerate(data.get("backends", ()))
        )
        return cls(**settings)

    @classmethod
    def from_file(cls, path: str | Path) -> GatewayConfig:
        """Settings from a TOML file."""
        import tomllib

        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_mapping(data)


def _backend_from_mapping(index: int, data: Any) -> BackendConfig:
    if isinstance(data, str):
        return BackendConfig(data)
    if not isinstance(data, Mapping):
        raise TypeError(f"backends[{index}] must be a table or a URL string, got {data!r}")
    known = {f.name for f in fields(BackendConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"backends[{index}]: unknown setting(s) {unknown}; known: {sorted(known)}")
    return BackendConfig(**data)


def backends_from_urls(
    primaries: Sequence[str], secondaries: Sequence[str] = (), *, send_priority: bool = False
) -> tuple[BackendConfig, ...]:
    """Backend records from ``--backend`` and ``--secondary`` URLs."""
    return tuple(
        BackendConfig(u, "primary", send_priority=send_priority) for u in primaries
    ) + tuple(BackendConfig(u, "secondary", send_priority=send_priority) for u in secondaries)


def check_tier(tier: Any) -> str:
    """``tier`` if the gateway can predict with it, else ValueError naming the choices.

    >>> check_tier("encoder:minilm")
    'encoder:minilm'
    >>> check_tier("bert")
    Traceback (most recent call last):
    ...
    ValueError: tier must be lexical, encoder or encoder:NAME, got 'bert'
    """
    from rtlm_adapt.encoder import check_encoder_name

    kind, _, name = tier.partition(":") if isinstance(tier, str) else ("", "", "")
    if kind not in ("lexical", "encoder"):
        raise ValueError(f"tier must be lexical, encoder or encoder:NAME, got {tier!r}")
    if kind == "lexical" and name:
        raise ValueError(f"the lexical tier has no encoder, got {tier!r}")
    if name:
        check_encoder_name(name)
    return tier


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


__all__ = ["ROLES", "BackendConfig", "GatewayConfig", "backends_from_urls"]
