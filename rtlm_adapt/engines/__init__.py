"""Real serving engines run next to the scheduler: a vLLM OpenAI-compatible server started as a
subprocess (:mod:`rtlm_adapt.engines.vllm_server`) and the model folders it loads
(:mod:`rtlm_adapt.engines.models`).

Nothing here imports torch or vLLM at import time; they are needed only when a model is
converted or a server is started.
"""
