"""Model loading: the embedded default, a Hugging Face id or directory, a .gguf file, or a
name from a local model store (`ollama:qwen2.5:7b`, `lmstudio:…`: app/runtime/stores.py).

GGUF weights are dequantized once (~20-30 s on CPU) and cached as safetensors in the
user cache dir, checked by a manifest of sizes and SHA-256 so a truncated or corrupt
cache is detected and rebuilt rather than loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .paths import DEFAULT_MODEL, cache_root, default_gguf  # noqa: F401  (loader.DEFAULT_MODEL: callers')
from .resolve import resolve
from .types import VramchatError

WEIGHTS = ("auto", "bf16", "fp16", "fp32", "8bit", "4bit")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

Status = Callable[[str], None]


def resolve_device(device: str) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VramchatError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VramchatError(f"--device {device}: no CUDA GPU is visible to torch on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise VramchatError(f"--device {device}: only cpu and cuda are supported")
    return dev


def resolve_weights(weights: str, dev: torch.device) -> str:
    if weights not in WEIGHTS:
        raise VramchatError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights in ("8bit", "4bit") and dev.type != "cuda":
        raise VramchatError(f"--weights {weights} needs bitsandbytes on a CUDA GPU; this run is on "
                            f"{dev.type}. Use --weights fp32 or bf16 on CPU.")
    if weights == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return weights


def _manifest(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != "manifest.json":
            out[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_cached(folder: Path, full: bool = False) -> bool:
    """True when `folder` holds every file its manifest lists, at the listed sizes
    (and hashes, with full=True)."""
    try:
        man = json.loads((folder / "manifest.json").read_text())
        for name, meta in man.items():
            f = folder / name
            if f.stat().st_size != meta["size"]:
                return False
            if full and _sha256(f) != meta["sha256"]:
                return False
        return bool(man)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, status: Status | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors folder in the cache; return it."""
    target = gguf_cache_dir(gguf)
    if check_cached(target):
        return target
    if target.exists():
        if status:
            status(f"cached weights at {target} are incomplete or corrupt; converting again")
        shutil.rmtree(target, ignore_errors=True)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if status:
        status(f"dequantizing {gguf.name} once (about 30 s); later starts load the cached copy")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # gguf parse errors come as many types
        raise VramchatError(f"could not read GGUF file {gguf}: {e}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps(_manifest(tmp), indent=1))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def load(model: str | None = None, device: str = "auto", weights: str = "auto",
         trust_remote_code: bool = False, status: Status | None = None):
    """-> (hf_model, tokenizer, model_id, device, weights_label). Errors are VramchatError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    label = resolve_weights(weights, dev)
    if model in (None, "", "default", DEFAULT_MODEL):
        folder, model_id = convert_gguf(default_gguf(), status), DEFAULT_MODEL
    else:
        # ollama:/lmstudio: names; hub ids already in the local cache (a path on disk wins)
        found = None if Path(model).expanduser().exists() else resolve(model)
        path = found[0] if found else Path(model).expanduser()
        if path.suffix == ".gguf" or (found and path.is_file()):  # an Ollama blob has no suffix
            if not path.is_file():
                raise VramchatError(f"GGUF file {path} does not exist")
            folder, model_id = convert_gguf(path, status), found[1] if found else path.name
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise VramchatError(f"{path} is a directory without config.json: not a Hugging Face model folder")
            folder, model_id = path, found[1] if found else str(path)
        elif path.exists():
            raise VramchatError(f"{path} is a file; pass a model folder, a .gguf file or a Hugging Face id")
        elif _is_hub_id(model):
            folder, model_id = model, model
        else:
            raise VramchatError(f"model {model!r} not found: no such folder or .gguf file, and not a "
                                "Hugging Face id (owner/name) or a local store's name (`main.py models` "
                                "lists them: ollama:…, lmstudio:…)")
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if label in _DTYPES:
        kwargs["dtype"] = _DTYPES[label]
    else:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if label == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16))
        kwargs["device_map"] = {"": dev.index or 0}
    if status:
        status(f"loading {model_id} ({label}) on {dev}")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        hf = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(e).lower() or "connect" in str(e).lower()
        hint = (" and it is not in the local Hugging Face cache; this machine cannot download it. Download it "
                "where there is network (`huggingface-cli download ID`) and pass the folder with --model PATH"
                if offline or isinstance(folder, str) else "")
        raise VramchatError(f"could not load model {model_id!r}{hint} ({e.__class__.__name__}: {str(e)[:300]})") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise VramchatError(f"model {model_id!r} needs its own code; vramchat does not run a model's code "
                                "unless you pass --trust-remote-code") from e
        raise VramchatError(f"could not load model {model_id!r}: {e}") from e
    if label in _DTYPES:
        hf = hf.to(dev)
    hf.eval()
    if tok.chat_template is None:
        raise VramchatError(f"model {model_id!r} has no chat template; use an instruct/chat model")
    return hf, tok, model_id, dev, label
