"""Request and Completion records: what a user submits and what the serving loop reports back.

Both are validated on construction so that a bad value fails where it was made, with a message
that names the field, instead of corrupting a scheduling decision later.

>>> r = Request(id="a", prompt="Name one prime.", arrival_time=0.0, deadline=2.0, max_tokens=16)
>>> r.slack(now=0.5)
1.5
>>> Request(id="b", prompt="", arrival_time=0.0)
Traceback (most recent call last):
...
ValueError: Request.prompt must be a non-empty string

A request that ends without a result carries a :class:`FailureReason`; its value is the label
users see (metrics, JSON reports):

>>> failed = Completion("a", 0, 0.0, 1.0, 1.0, "gpu", error="timed_out: step ran past 30 s",
...                     failure=FailureReason.TIMED_OUT)
>>> failed.failure.value, failed.ok
('timed_out', False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

#: Metadata key under which benchmarks store a request's true output length (tokens). The
#: simulated executor reads it to know when a request ends; schedulers must not, except the
#: oracle baselines that exist to show the limit of what a perfect predictor could buy.
TRUE_LENGTH_KEY = "true_output_tokens"


class FailureReason(str, Enum):
    """Why a request ended without a result. The value is the label users see: metrics, the
    JSON ``failed`` counts, a failed Completion's error text (``"timed_out: ..."``)."""

    #: Not accepted: the queue was full, a deadline could not be met, the backend refused it.
    REJECTED = "rejected"
    #: An executor step ran past its time limit.
    TIMED_OUT = "timed_out"
    #: The executor raised, returned garbage or lost the request.
    EXECUTOR_FAILURE = "executor_failure"
    #: The client cancelled it (or went away).
    CANCELLED = "cancelled"
    #: The controller or loop was shutting down (or restarted: the request was live then).
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value

    def error(self, detail: str) -> str:
        """A failed Completion's error text: the reason, then what happened.

        >>> FailureReason.CANCELLED.error("client disconnected")
        'cancelled: client disconnected'
        """
        return f"{self.value}: {detail}"

    @classmethod
    def of_error(cls, error: str) -> FailureReason:
        """The reason an error text written as ``"<reason>: <detail>"`` names; any other text is
        an ``executor_failure``. Only for executors that report bare text: a Completion classifies
        its ``error`` once, on construction, when it is given no ``failure``.

        >>> [str(FailureReason.of_error(text)) for text in ("timed_out: slow", "CUDA error")]
        ['timed_out', 'executor_failure']
        """
        head = error.split(":", 1)[0].strip()
        try:
            return cls(head)
        except ValueError:
            return cls.EXECUTOR_FAILURE


#: Every failure reason, in a stable order (metrics show each from the start).
FAILURE_REASONS: tuple[FailureReason, ...] = tuple(FailureReason)


class RequestRefused(RuntimeError):
    """The controller did not accept a request; ``reason`` says why (it is counted as failed)."""

    reason: ClassVar[FailureReason]


class QueueFullError(RequestRefused):
    """The controller's queue is at ``max_queue``: the request was not accepted."""

    reason = FailureReason.REJECTED


class ControllerClosedError(RequestRefused):
    """The controller was closed (shutdown): the request was not accepted."""

    reason = FailureReason.SHUTDOWN


def _check_time(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


@dataclass(slots=True)
class Request:
    """One inference request.

    Parameters
    ----------
    id
        Unique id (a string; unique within one controller).
    prompt
        The user's prompt text (non-empty).
    arrival_time
        When the request arrived, in seconds on the serving loop's clock.
    deadline
        Absolute time (same clock) by which the response should be complete, or None.
    max_tokens
        Upper bound on generated tokens.
    prompt_tokens
        The prompt's length in the served model's tokens, when the caller knows it; otherwise
        the controller estimates it from the text.
    metadata
        Free-form extra data, carried along untouched.
    """

    id: str
    prompt: str
    arrival_time: float
    deadline: float | None = None
    max_tokens: int = 512
    prompt_tokens: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise TypeError(f"Request.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("Request.prompt must be a non-empty string")
        _check_time("Request.arrival_time", self.arrival_time)
        _check_time("Request.deadline", self.deadline, allow_none=True)
        if self.deadline is not None and self.deadline < self.arrival_time:
            raise ValueError(
                f"Request.deadline ({self.deadline}) is before arrival_time ({self.arrival_time})"
            )
        _check_positive_int("Request.max_tokens", self.max_tokens)
        if self.prompt_tokens is not None:
            _check_positive_int("Request.prompt_tokens", self.prompt_tokens)
        if not isinstance(self.metadata, Mapping):
            raise TypeError(
                f"Request.metadata must be a mapping, got {type(self.metadata).__name__}"
            )

    def slack(self, now: float) -> float:
        """Seconds left until the deadline (infinite when there is none)."""
        return math.inf if self.deadline is None else self.deadline - now

    @property
    def true_output_tokens(self) -> int | None:
        """The true output length, when a benchmark attached it (see TRUE_LENGTH_KEY)."""
        value = self.metadata.get(TRUE_LENGTH_KEY)
        return None if value is None else int(value)


@dataclass(slots=True)
class Completion:
    """A finished request, as reported by an executor.

    ``error`` is None for a success; otherwise it says what went wrong (and ``output_tokens``
    counts what was generated before that), and ``failure`` why the request ended without a
    result. An executor that reports only the text leaves ``failure`` out: it is then taken from
    the text (:meth:`FailureReason.of_error`).
    """

    request_id: str
    output_tokens: int
    arrival_time: float
    start_time: float
    finish_time: float
    executor: str
    prompt_tokens: int = 0
    first_token_time: float | None = None
    deadline: float | None = None
    text: str | None = None
    error: str | None = None
    failure: FailureReason | None = None

    def __post_init__(self) -> None:
        if self.error is not None and self.failure is None:
            self.failure = FailureReason.of_error(self.error)
        if isinstance(self.output_tokens, bool) or not isinstance(self.output_tokens, int):
            raise TypeError(
                f"Completion.output_tokens must be an int, got {type(self.output_tokens).__name__}"
            )
        if self.output_tokens < 0:
            raise ValueError(f"Completion.output_tokens must be >= 0, got {self.output_tokens}")
        _check_time("Completion.arrival_time", self.arrival_time)
        _check_time("Completion.start_time", self.start_time)
        _check_time("Completion.finish_time", self.finish_time)
        if self.finish_time < self.start_time:
            raise ValueError(
                f"Completion.finish_time ({self.finish_time}) is before "
                f"start_time ({self.start_time})"
            )

    @classmethod
    def of(
        cls,
        request: Request,
        *,
        output_tokens: int,
        start_time: float,
        finish_time: float,
        executor: str,
        prompt_tokens: int = 0,
        first_token_time: float | None = None,
        text: str | None = None,
        error: str | None = None,
        failure: FailureReason | None = None,
    ) -> Completion:
        """The completion of ``request``: its id, arrival time and deadline come from it.

        >>> r = Request("a", "Hi there.", arrival_time=1.0, deadline=4.0)
        >>> c = Completion.of(r, output_tokens=5, start_time=1.5, finish_time=3.0, executor="gpu")
        >>> c.request_id, c.arrival_time, c.deadline, c.response_time
        ('a', 1.0, 4.0, 2.0)
        """
        return cls(
            request_id=request.id,
            output_tokens=output_tokens,
            arrival_time=request.arrival_time,
            start_time=start_time,
            finish_time=finish_time,
            executor=executor,
            prompt_tokens=prompt_tokens,
            first_token_time=first_token_time,
            deadline=request.deadline,
            text=text,
            error=error,
            failure=failure,
        )

    @classmethod
    def failed(
        cls, request: Request, reason: FailureReason, detail: str, now: float, executor: str = ""
    ) -> Completion:
        """``request`` ended at ``now`` without a result, for ``reason`` (``detail`` says what
        happened); ``executor`` is where it was running, if anywhere.

        >>> r = Request("a", "Hi there.", arrival_time=1.0)
        >>> Completion.failed(r, FailureReason.SHUTDOWN, "loop shut down", now=3.0).error
        'shutdown: loop shut down'
        """
        t = max(now, request.arrival_time)
        return cls.of(
            request,
            output_tokens=0,
            start_time=t,
            finish_time=t,
            executor=executor,
            error=reason.error(detail),
            failure=reason,
        )

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def response_time(self) -> float:
        """Arrival to finish, in seconds: what the user waited."""
        return self.finish_time - self.arrival_time

    @property
    def missed_deadline(self) -> bool:
        return self.deadline is not None and self.finish_time > self.deadline
