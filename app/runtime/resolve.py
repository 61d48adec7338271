"""Resolving a model name from a local store to what loads: `ollama:…` and `lmstudio:…`
names, hub ids in the local Hugging Face cache (stores.py finds where those live)."""
from __future__ import annotations

from pathlib import Path

from .facts import gguf_facts
from .stores import OLLAMA_HOST, Roots, _gguf_files, _split_error, ollama_blob, roots
from .types import VramchatError


def resolve(model: str, env=None) -> tuple[Path, str] | None:
    """`ollama:…`, `lmstudio:…` or a hub id found in the local hub cache -> (model folder or
    .gguf file, the id to show). None for anything else (paths, ids not cached). A store
    name that cannot be found is a VramchatError saying where it looked."""
    r = roots((), env)
    if model.startswith("ollama:"):
        return _resolve_ollama(model, r), model
    if model.startswith("lmstudio:"):
        return _resolve_lmstudio(model, r), model
    name = model[3:] if model.startswith("hf:") else model
    parts = name.split("/")
    if model.startswith("hf:") and len(parts) == 3 and parts[2].endswith(".gguf"):
        for snap in _hub_one(r.hf / f"models--{parts[0]}--{parts[1]}", need_config=False):
            if (snap / parts[2]).is_file():
                err = _split_error(snap / parts[2]) or _gguf_error(snap / parts[2])
                if err:
                    raise VramchatError(f"{model}: {err}")
                return snap / parts[2], model
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
        repo = r.hf / f"models--{parts[0]}--{parts[1]}"
        if repo.is_dir():
            for e in _hub_one(repo):
                return e, name
    if model.startswith("hf:"):
        raise VramchatError(f"{name} is not in the Hugging Face cache at {r.hf}; download it where there is "
                            "network (`huggingface-cli download ID`) and pass the folder with --model PATH")
    return None


def _hub_one(repo: Path, need_config: bool = True):
    """The snapshot `refs/main` points at (a model folder unless need_config=False)."""
    try:
        snap = repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except OSError:
        return
    if snap.is_dir() and (not need_config or (snap / "config.json").exists()):
        yield snap


def _resolve_ollama(model: str, r: Roots) -> Path:
    name = model[len("ollama:"):]
    base, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        base, tag = name, "latest"
    parts = base.split("/")
    rel = {1: (OLLAMA_HOST, "library", *parts), 2: (OLLAMA_HOST, *parts), 3: tuple(parts)}.get(len(parts))
    if rel is None or not all(rel):
        raise VramchatError(f"{model!r} is not an Ollama name: use ollama:MODEL[:TAG], e.g. ollama:qwen2.5:7b")
    looked = []
    for root in r.ollama:
        man = root / "manifests" / Path(*rel) / tag
        looked.append(str(root))
        if man.is_file():
            blob = ollama_blob(root, man)
            err = _gguf_error(blob)
            if err:
                raise VramchatError(f"{model}: {err}")
            return blob
    raise VramchatError(f"{model}: no such model in Ollama's store ({', '.join(looked)}); "
                        "`main.py models` lists what is there")


def _resolve_lmstudio(model: str, r: Roots) -> Path:
    rel = model[len("lmstudio:"):].strip("/")
    for root in r.lmstudio:
        p = root / rel
        if p.is_file() and p.suffix == ".gguf":
            err = _split_error(p) or _gguf_error(p)
            if err:
                raise VramchatError(f"{model}: {err}")
            return p
        if p.is_dir():
            if (p / "config.json").exists():
                return p
            files = _gguf_files(p)
            if len(files) == 1:
                return files[0]
            if files:
                raise VramchatError(f"{model} holds {len(files)} GGUF files ({', '.join(f.name for f in files[:4])}); "
                                    f"name one: lmstudio:{rel}/{files[0].name}")
    raise VramchatError(f"{model}: not found in LM Studio's models folder ({', '.join(map(str, r.lmstudio))}); "
                        "`main.py models` lists what is there")


def _gguf_error(path: Path) -> str:
    try:
        gguf_facts(path)
    except VramchatError as e:
        return str(e)
    return ""
