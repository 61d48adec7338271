"""Files trained or calibrated for one model (locret heads, outlier channels): how a
file names the model it fits, and how the shipped one for a model is found."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .base import ModelInfo
from .registry import SpecError


def model_key(info: ModelInfo) -> str:
    """Identity of a model's shapes: a file made for one fits only models with this key."""
    vocab = len(info.tokenizer) if info.tokenizer is not None else 0
    return (f"h{info.hidden_size}-L{info.n_layers}-q{info.n_q_heads}-kv{info.n_kv_heads}"
            f"-d{info.head_dim}-v{vocab}")


def norm_name(name: str) -> str:
    base = Path(name.rstrip("/")).name.lower()
    return base[:-5] if base.endswith(".gguf") else base


def read_meta(path: str | Path) -> dict:
    """The string metadata of a safetensors file; a truncated or garbage file is a SpecError
    naming the path (safe_open checks the header and that the data covers every tensor)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SpecError(f"{path}: not a readable safetensors file, truncated or corrupt ({e}); "
                        "re-create it") from None


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names and bytes, in name order: written into the metadata
    of every file we save, checked on load (a flipped byte keeps every shape)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + b"\0")
        h.update(state[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_digest(path: str | Path, state: dict[str, torch.Tensor], meta: dict, hint: str) -> None:
    """Refuse a file whose tensors no longer match the checksum written with them. Files
    written before checksums existed carry none and get the shape checks only."""
    want = meta.get("sha256")
    if want is not None and digest(state) != want:
        raise SpecError(f"{path}: checksum mismatch: the file changed after it was written (corrupt "
                        f"on disk or edited); {hint}")


def user_folder(root: str | Path, kind: str, info: ModelInfo) -> Path:
    """Where a file of `kind` ("heads", "channels") made on this machine for this model lives:
    one folder per model (shapes and name), so two models of one shape (a base model and its
    fine-tune) never share training features or a resume checkpoint."""
    return Path(root) / kind / model_key(info) / (norm_name(info.model_id or "") or "unnamed")


def find_file(kind: str, shipped: Path, info: ModelInfo) -> Path | None:
    """The file of `kind` for this model: one made on this machine (info.search_dirs) first,
    else the shipped one in `shipped`; None if neither exists."""
    for root in info.search_dirs:
        folder = user_folder(root, kind, info)
        if folder.is_dir():
            found = find_shipped(folder, info)
            if found is not None:
                return found
    return find_shipped(shipped, info)


def find_shipped(folder: Path, info: ModelInfo) -> Path | None:
    """The safetensors file in `folder` whose model key and a listed name match, or None."""
    want, name = model_key(info), norm_name(info.model_id or "")
    for f in sorted(folder.glob("*.safetensors")):
        meta = read_meta(f)
        names = [norm_name(n) for n in json.loads(meta.get("names", "[]"))]
        if meta.get("model_key") == want and any(name.startswith(n) for n in names if n):
            return f
    return None
