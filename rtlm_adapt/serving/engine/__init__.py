"""An engine model of vLLM's V1 scheduler for the simulator.

- :mod:`~rtlm_adapt.serving.engine.sequence`: a request inside the engine (tokens computed,
  generated, blocks held);
- :mod:`~rtlm_adapt.serving.engine.waiting_queue`: the waiting queue, FCFS or by (priority,
  arrival);
- :mod:`~rtlm_adapt.serving.engine.kv_cache`: the KV cache as a pool of blocks;
- :mod:`~rtlm_adapt.serving.engine.scheduler`: one step's choice of work, with chunked prefill
  and preemption by recompute;
- :mod:`~rtlm_adapt.serving.engine.executor`: all of it behind the Executor seam, with step
  costs from the profile.

A profile with an ``engine`` block selects it
(:func:`rtlm_adapt.serving.simulated.simulated_executor`).
"""
