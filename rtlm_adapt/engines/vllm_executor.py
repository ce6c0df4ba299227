"""VLLMExecutor: vLLM's engine inside this process, behind the library's executor seam.

The controller decides who joins vLLM's batch and when (``admit``), exactly as it does for the
simulator and the transformers executor; vLLM does the rest. One ``step`` is one vLLM engine
iteration (``LLMEngine.step``): its wall time, the requests that ran, the tokens each got and
the prompt tokens that joined come back as a :class:`~rtlm_adapt.serving.base.StepResult`, so
the controller's latency model learns vLLM's real step cost. ``abort`` is vLLM's abort.

Why the synchronous ``LLMEngine`` and not ``AsyncLLM``: the executor seam is step by step, and
``LLMEngine`` with its engine core in this process (``multiprocess_mode=False``) runs exactly
one scheduler iteration per ``step()`` call, so a step's duration is the iteration's. (With the
engine core in a process of its own, it runs ahead and ``step()`` only collects its outputs.)
vLLM still runs the model in a worker process of its own.

Use it under :class:`~rtlm_adapt.serving.realtime.RealTimeLoop`, or in your own loop
(``examples/embed_vllm.py``)::

    executor = VLLMExecutor.from_model("smollm2", max_num_seqs=4)
    ...
    executor.close()

A request's ``metadata`` may carry ``"priority"`` (an int, lower first: vLLM's queue order when
more requests are admitted than ``max_num_seqs``), ``"temperature"`` (default 0: greedy) and
``"ignore_eos"`` (generate exactly ``max_tokens``). vLLM is imported only by
:meth:`VLLMExecutor.from_model`; this module imports neither torch nor vLLM.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rtlm_adapt.engines.vllm_server import INSTALL_HINT, vllm_available
from rtlm_adapt.request import Completion, FailureReason, Request
from rtlm_adapt.serving.base import StepResult


@dataclass
class _Running:
    """One request inside vLLM: what the executor has seen of it so far."""

    request: Request
    prompt_tokens: int
    admitted_at: float
    first_token_time: float | None = None
    output_tokens: int = 0
    text: str = ""
    #: An error found at admission (prompt too long, bad parameters): it ends at the next step.
    error: str | None = None

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.output_tokens


class VLLMExecutor:
    """An :class:`~rtlm_adapt.serving.base.Executor` over a vLLM ``LLMEngine`` in this process.

    Parameters
    ----------
    engine
        A vLLM V1 ``LLMEngine``, best built with ``multiprocess_mode=False`` (see the module
        docstring); :meth:`from_model` builds one.
    max_batch_size
        Most requests admitted at once: the engine's ``max_num_seqs``, so that every admitted
        request runs and vLLM's own queue stays empty (the controller holds the queue).
    name
        The executor's name in completions and in the controller's view.
    clock
        Wall clock for step durations; injectable for tests.
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_batch_size: int,
        name: str = "vllm",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.name = name
        self.clock = clock
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = int(engine.model_config.max_model_len)
        self._running: dict[str, _Running] = {}
        self._joined: list[str] = []  # admitted since the last step: their prompts prefill next

    @classmethod
    def from_model(
        cls,
        model: str = "smollm2",
        *,
        max_num_seqs: int = 8,
        max_model_len: int = 2048,
        kv_cache_gib: int = 2,
        dtype: str = "bfloat16",
        scheduling_policy: str = "priority",
        name: str = "vllm",
        **engine_args: Any,
    ) -> VLLMExecutor:
        """Start vLLM on ``model`` (``"smollm2"``: the packaged SmolLM2; a folder; a hub id).

        Eager mode (torch.compile's warm-up costs a minute on a CPU); ``kv_cache_gib`` sets
        ``VLLM_CPU_KVCACHE_SPACE`` where it is not set (CPU only). Other keyword arguments go to
        vLLM's ``EngineArgs``. Takes about 25-35 s on the 2-core machine. Call this under
        ``if __name__ == "__main__":``: vLLM starts its worker with spawn.
        """
        if not vllm_available():
            raise ImportError(INSTALL_HINT)
        from rtlm_adapt.engines.models import prepare_model

        path = prepare_model(model)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on these machines; a local folder
        from vllm.engine.arg_utils import EngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine
        from vllm.v1.executor import Executor

        args = EngineArgs(
            model=str(path),
            served_model_name=model if model == "smollm2" else None,
            enforce_eager=True,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            scheduling_policy=scheduling_policy,
            disable_log_stats=True,
            **engine_args,
        )
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        engine = LLMEngine(
            vllm_config=config,
            executor_class=Executor.get_class(config),
            log_stats=False,
            multiprocess_mode=False,
        )
        return cls(engine, max_batch_size=max_num_seqs, name=name)

    # -- the Executor protocol --------------------------------------------------------------------
    def running(self) -> int:
        return len(self._running)

    def running_ids(self) -> list[str]:
        return list(self._running)

    def admit(self, requests: Sequence[Request], now: float) -> None:
        """Hand requests to vLLM; they join its batch at the next step."""
        if self.running() + len(requests) > self.max_batch_size:
            raise ValueError(
                f"{self.name}: admitting {len(requests)} requests would exceed max_batch_size "
                f"{self.max_batch_size} ({self.running()} running)"
            )
        for request in requests:
            if request.id in self._running:
                raise ValueError(f"{self.name}: request {request.id!r} is already running")
        for request in requests:
            self._running[request.id] = self._submit(request, now)
            self._joined.append(request.id)

    def step(self, now: float, until: float = math.inf) -> StepResult:
        """Run one vLLM iteration; report its time, tokens and finished requests."""
        t0 = self.clock()
        result = StepResult(
            duration_s=0.0,
            iterations=1,
            batch_size=len(self._running),
            prefill_tokens=sum(self._running[rid].prompt_tokens for rid in self._joined),
            context_tokens=sum(live.context for live in self._running.values()),
        )
        self._joined = []
        ended: list[tuple[str, str | None]] = [
            (rid, live.error) for rid, live in self._running.items() if live.error is not None
        ]
        if len(ended) < len(self._running):
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - an engine failure ends the step's requests
                # vLLM does not say which requests survive an engine error: end them all
                error = FailureReason.EXECUTOR_FAILURE.error(f"{type(exc).__name__}: {exc}")
                ended = [(rid, live.error or error) for rid, live in self._running.items()]
                self._abort_in_engine([rid for rid, _ in ended if not self._running[rid].error])
                outputs = []
            for output in outputs:
                live = self._running.get(output.request_id)
                if live is None:
                    continue  # aborted by us after vLLM produced it
                piece = output.outputs[0]
                if piece.token_ids:
                    if live.first_token_time is None:
                        live.first_token_time = now + (self.clock() - t0)
                    live.output_tokens += len(piece.token_ids)
                    live.text += piece.text
                    result.new_tokens[output.request_id] = len(piece.token_ids)
                if output.finished:
                    ended.append((output.request_id, None))
        result.duration_s = self.clock() - t0
        end = now + result.duration_s
        result.finished = [
            self._completion(self._running.pop(rid), end, error) for rid, error in ended
        ]
        return result

    def abort(self, request_id: str, now: float) -> Completion | None:
        """Abort a request in vLLM; return its error completion (None if it is not running)."""
        live = self._running.pop(request_id, None)
        if live is None:
            return None
        if request_id in self._joined:
            self._joined.remove(request_id)
        if live.error is None:
            self._abort_in_engine([request_id])
        return self._completion(live, now, FailureReason.CANCELLED.error("aborted in vLLM"))

    def close(self) -> None:
        """Stop vLLM's engine and its worker (the executor cannot step afterwards)."""
        shutdown = getattr(self.engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> VLLMExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as the model's chat template renders one user message, in token ids."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _submit(self, request: Request, now: float) -> _Running:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = self.prompt_ids(request.prompt)
        live = _Running(request, prompt_tokens=len(ids), admitted_at=now)
        if len(ids) + 1 > self.max_model_len:
            live.error = FailureReason.REJECTED.error(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}"
            )
            return live
        meta = request.metadata
        try:
            params = SamplingParams(
                # vLLM refuses a request whose prompt + max_tokens exceed the model length
                max_tokens=min(request.max_tokens, self.max_model_len - len(ids)),
                temperature=float(meta.get("temperature", 0.0)),
                ignore_eos=bool(meta.get("ignore_eos", False)),
                output_kind=RequestOutputKind.DELTA,  # each step's new tokens only
            )
            self.engine.add_request(
                request.id,
                {"prompt_token_ids": ids},
                params,
                priority=int(meta.get("priority", 0)),
            )
        except (ValueError, TypeError) as exc:
            live.error = FailureReason.REJECTED.error(f"vLLM refused the request: {exc}")
        return live

    def _abort_in_engine(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine.abort_request(request_ids)

    def _completion(self, live: _Running, end: float, error: str | None) -> Completion:
        return Completion.of(
            live.request,
            output_tokens=live.output_tokens,
            start_time=live.admitted_at,
            finish_time=max(end, live.admitted_at),
            executor=self.name,
            prompt_tokens=live.prompt_tokens,
            first_token_time=live.first_token_time,
            text=live.text,
            error=error,
        )
