"""The real executor over a transformers causal LM (imports torch and transformers).

- :mod:`~rtlm_adapt.serving.hf.executor`: :class:`HFExecutor`, continuous batching;
- :mod:`~rtlm_adapt.serving.hf.kv_cache`: the running batch's KV cache (batch layout);
- :mod:`~rtlm_adapt.serving.hf.loading`: models and tokenizers (local folder, hub id, the packaged
  SmolLM2, a tiny random model for tests);
- :mod:`~rtlm_adapt.serving.hf.timing`: what the profiler measures on an executor.
"""

from rtlm_adapt.serving.hf.executor import HFExecutor, TokenCallback
from rtlm_adapt.serving.hf.loading import (
    SMOLLM2_GGUF,
    cache_dir,
    chat_prompt_ids,
    load_smollm2,
    tiny_tokenizer,
)

__all__ = [
    "HFExecutor",
    "SMOLLM2_GGUF",
    "TokenCallback",
    "cache_dir",
    "chat_prompt_ids",
    "load_smollm2",
    "tiny_tokenizer",
]
