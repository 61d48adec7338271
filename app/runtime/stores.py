"""Models already on disk: the Hugging Face hub cache, Ollama's store, LM Studio's models
folder, and folders the config names (`model_dirs`). Nothing here loads weights: a
model's facts come from its config.json, safetensors headers or GGUF header.

Names, each what `--model` accepts:
- hub cache: `owner/name` (resolved to the cached snapshot folder, so no network is tried)
- Ollama: `ollama:MODEL:TAG` (`ollama:qwen2.5:7b`; the tag defaults to `latest`; models
  outside the `library` namespace keep it: `ollama:user/model:tag`). A manifest at
  `manifests/<registry>/<namespace>/<model>/<tag>` lists layers; the one with media type
  `application/vnd.ollama.image.model` is the GGUF, stored as `blobs/sha256-<hex>`.
- LM Studio: `lmstudio:publisher/repo/file.gguf` (or `lmstudio:publisher/repo` where the
  folder holds one GGUF, or is a safetensors model folder).
- config folders: the path of the model folder or .gguf file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .facts import folder_facts, gguf_facts
from .paths import DEFAULT_MODEL, default_gguf, trained_dir
from .types import VramchatError

OLLAMA_HOST = "registry.ollama.ai"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
# architectures the conformance suite runs every policy on (tests/test_architectures.py)
TESTED = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3_text"}


@dataclass
class Entry:
    """One model on disk. `error` (one line) marks an entry that cannot be loaded."""

    name: str  # what --model accepts
    source: str  # embedded | hf | ollama | lmstudio | folder
    path: str  # a model folder (config.json) or a .gguf file
    arch: str = ""
    params: int | None = None
    quant: str = ""
    size: int = 0  # bytes on disk
    context: int | None = None  # native context window
    heads: bool = False  # retaining heads fit it (locret): shipped or trained here
    channels: bool = False  # offload / doublesparse channels fit it: shipped or made here
    note: str = ""
    error: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Roots:
    """Where each store lives on this machine (absent ones are skipped)."""

    hf: Path
    ollama: list[Path]
    lmstudio: list[Path]
    folders: list[Path] = field(default_factory=list)


def roots(model_dirs=(), env=None) -> Roots:
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    hf = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub") if env.get("HF_HOME") else "")
    ollama = [Path(env["OLLAMA_MODELS"])] if env.get("OLLAMA_MODELS") else [
        home / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]  # the Linux service's home
    lms = [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    pointer = home / ".lmstudio-home-pointer"  # LM Studio moved its home: the file names it
    try:
        lms.insert(0, Path(pointer.read_text().strip()) / "models")
    except OSError:
        pass
    return Roots(Path(hf) if hf else home / ".cache" / "huggingface" / "hub", ollama, lms,
                 [Path(d).expanduser() for d in model_dirs])


def _size(paths) -> int:
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size  # follows the hub cache's symlinks to blobs
        except OSError:
            pass
    return total


def _shipped_keys() -> list[tuple[str, str, set[str]]]:
    """(kind, model-key shape prefix, names) of every heads / channels file a model can use:
    the shipped ones and the ones made on this machine (`train-heads`, `calibrate` kept in the
    user data folder, where `policies.files.find_file` looks first)."""
    from policies.files import norm_name, read_meta
    from policies.locret import HEADS_DIR
    from offload.calibrate import CHANNELS_DIR
    out = []
    for kind, shipped in (("heads", HEADS_DIR), ("channels", CHANNELS_DIR)):
        made = trained_dir() / kind
        files = sorted(shipped.glob("*.safetensors")) + sorted(made.glob("*/*/*.safetensors"))
        for f in files:
            if f.name == "checkpoint.safetensors":
                continue  # an unfinished training run
            try:
                meta = read_meta(f)
            except Exception:
                continue
            names = {norm_name(n) for n in json.loads(meta.get("names", "[]"))}
            out.append((kind, meta.get("model_key", "").rsplit("-v", 1)[0], names))
    return out


def _shape_key(facts: dict) -> str:
    """`policies.files.model_key` without the vocabulary, from config facts."""
    c = facts["config"]
    if facts.get("gguf"):
        hidden, layers = c.get("embedding_length"), c.get("block_count")
        q, kv = c.get("attention.head_count"), c.get("attention.head_count_kv")
        d = c.get("attention.key_length") or c.get("rope.dimension_count") or (hidden // q if hidden and q else 0)
    else:
        hidden, layers = c.get("hidden_size"), c.get("num_hidden_layers")
        q = c.get("num_attention_heads")
        kv = c.get("num_key_value_heads") or q
        d = c.get("head_dim") or (hidden // q if hidden and q else 0)
    return f"h{hidden}-L{layers}-q{q}-kv{kv}-d{d}"


def _mark_files(e: Entry, facts: dict, shipped, ident: str) -> None:
    """Shipped files fit a model of the same shapes whose name starts with a listed one (as
    `policies.files.find_shipped` matches them once the model is loaded)."""
    from policies.files import norm_name
    key, name = _shape_key(facts), norm_name(ident)
    for kind, k, names in shipped:
        if k == key and any(name.startswith(n) for n in names if n):
            setattr(e, kind, True)


def _entry(name: str, source: str, path: Path, shipped, weights=None, ident: str = "") -> Entry:
    """ident: the name shipped files list for this model (default: the file or folder name)."""
    e = Entry(name, source, str(path))
    try:
        if path.is_file():  # a .gguf file, or an Ollama blob (no suffix)
            facts = dict(gguf_facts(path), gguf=True)
            e.size = _size([path])
        else:
            facts = folder_facts(path)
            e.size = _size(weights if weights is not None else [p for p in path.iterdir() if p.is_file()])
    except VramchatError as err:
        e.error = str(err)
        return e
    except OSError as err:
        e.error = f"unreadable ({err.strerror or err})"
        return e
    e.arch, e.params, e.quant, e.context = facts["arch"], facts["params"], facts["quant"], facts["context"]
    if e.arch not in TESTED:
        e.note = "architecture not in the tested matrix"
    _mark_files(e, facts, shipped, ident or path.name)
    return e


# ---- the stores ---------------------------------------------------------------------

def _hub(root: Path, shipped) -> list[Entry]:
    out = []
    for repo in sorted(root.glob("models--*")):
        name = repo.name[len("models--"):].replace("--", "/")
        try:
            rev = (repo / "refs" / "main").read_text().strip()
            snap = repo / "snapshots" / rev
        except OSError:
            snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if (repo / "snapshots").is_dir() else []
            snap = snaps[-1] if snaps else None
        if snap is None or not snap.is_dir():
            out.append(Entry(name, "hf", str(repo), error="no snapshot in the cache (an interrupted download?)"))
            continue
        if (snap / "config.json").exists():
            out.append(_entry(name, "hf", snap, shipped, ident=name))
        for f in _gguf_files(snap):  # GGUF-only repos (…-GGUF): one entry per file
            err = _split_error(f)
            gname = f"hf:{name}/{f.name}"
            out.append(Entry(gname, "hf", str(f), error=err) if err else _entry(gname, "hf", f, shipped))
    return out


def ollama_name(rel: Path) -> str:
    """manifests-relative path registry/namespace/model/tag -> `ollama:` name."""
    host, ns, model, tag = rel.parts[-4:]
    if host == OLLAMA_HOST:
        return f"ollama:{model}:{tag}" if ns == "library" else f"ollama:{ns}/{model}:{tag}"
    return f"ollama:{host}/{ns}/{model}:{tag}"


def ollama_blob(root: Path, manifest: Path) -> Path:
    """The GGUF blob a manifest names; VramchatError saying what is wrong."""
    try:
        man = json.loads(manifest.read_text())
        layers = man["layers"]
        digest = next(l["digest"] for l in layers if l.get("mediaType") == OLLAMA_MODEL)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VramchatError(f"malformed manifest {manifest} ({type(e).__name__}: {str(e)[:60]})") from None
    except StopIteration:
        raise VramchatError(f"manifest {manifest} has no model layer ({OLLAMA_MODEL})") from None
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise VramchatError(f"manifest {manifest}: model digest {digest!r} is not sha256:<hex>")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise VramchatError(f"blob {blob.name} is missing from {root / 'blobs'} (re-pull the model with "
                            "`ollama pull`)")
    return blob


def _ollama(root: Path, shipped) -> list[Entry]:
    out = []
    base = root / "manifests"
    for man in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = man.relative_to(base)
        if len(rel.parts) != 4:
            continue
        name = ollama_name(rel)
        try:
            blob = ollama_blob(root, man)
        except VramchatError as e:
            out.append(Entry(name, "ollama", str(man), error=str(e)))
            continue
        out.append(_entry(name, "ollama", blob, shipped, ident=rel.parts[-2]))
    return out


def _gguf_files(folder: Path) -> list[Path]:
    """Loadable-looking GGUF files: vision projectors (mmproj) are not language models."""
    return sorted(p for p in folder.glob("*.gguf") if not p.name.lower().startswith("mmproj"))


def _split_error(p: Path) -> str:
    stem = p.stem
    if "-of-" in stem and stem.rsplit("-", 3)[-2] == "of":
        return ("a split GGUF (one part of several) cannot be loaded; merge the parts with "
                "`llama-gguf-split --merge` and list the merged file")
    return ""


def _lmstudio(root: Path, shipped) -> list[Entry]:
    out = []
    for repo in sorted(p for p in root.glob("*/*") if p.is_dir()):
        rel = repo.relative_to(root).as_posix()
        if (repo / "config.json").exists():
            out.append(_entry(f"lmstudio:{rel}", "lmstudio", repo, shipped))
        for f in _gguf_files(repo):
            name = f"lmstudio:{rel}/{f.name}"
            err = _split_error(f)
            out.append(Entry(name, "lmstudio", str(f), error=err) if err else _entry(name, "lmstudio", f, shipped))
    return out


def _folder(root: Path, shipped) -> list[Entry]:
    out = []
    items = [root] if (root / "config.json").exists() or root.suffix == ".gguf" else sorted(root.iterdir())
    for p in items:
        if p.is_dir() and (p / "config.json").exists():
            out.append(_entry(str(p), "folder", p, shipped))
        elif p.suffix == ".gguf" and p.is_file() and not p.name.lower().startswith("mmproj"):
            err = _split_error(p)
            out.append(Entry(str(p), "folder", str(p), error=err) if err else _entry(str(p), "folder", p, shipped))
        elif p.is_dir():
            for f in _gguf_files(p):
                err = _split_error(f)
                out.append(Entry(str(f), "folder", str(f), error=err) if err else _entry(str(f), "folder", f, shipped))
    return out


def scan(model_dirs=(), env=None) -> tuple[list[Entry], list[tuple[str, Path, bool]]]:
    """-> (every model found, [(store, root, present)]). A bad entry carries `error`; one bad
    entry never hides the others."""
    r = roots(model_dirs, env)
    shipped = _shipped_keys()
    found: list[Entry] = []
    searched = []
    plan = [("hf", r.hf, _hub)] + [("ollama", p, _ollama) for p in r.ollama] + \
        [("lmstudio", p, _lmstudio) for p in r.lmstudio] + [("folder", p, _folder) for p in r.folders]
    try:
        found.append(_entry(DEFAULT_MODEL, "embedded", default_gguf(), shipped, ident=DEFAULT_MODEL))
    except VramchatError:
        pass  # not installed: nothing to list
    seen = set()
    for store, root, fn in plan:
        present = root.is_dir() or (store == "folder" and root.is_file())
        searched.append((store, root, present))
        if not present or root.resolve() in seen:
            continue
        seen.add(root.resolve())
        try:
            found += fn(root, shipped)
        except OSError as e:
            found.append(Entry(str(root), store, str(root), error=f"cannot read the store ({e.strerror or e})"))
    return found, searched


def names(model_dirs=(), env=None) -> list[str]:
    """Every loadable name (for completion)."""
    return [e.name for e in scan(model_dirs, env)[0] if not e.error]
