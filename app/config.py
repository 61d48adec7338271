"""The user's config file: TOML in the user config dir (platformdirs), defaults written on first use.

`load_config()` returns a `Config`; `main.py chat --model … --policy …` overrides its fields.
The file is small and flat, so the writer is hand-written (tomllib only reads).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from platformdirs import user_cache_dir, user_config_dir, user_data_dir

from app.runtime.paths import APP


class ConfigError(ValueError):
    """The config file cannot be used; the message names the file and the bad key."""


@dataclass
class Config:
    model: str = ""  # HF id, model directory or GGUF path; "" = the embedded default model
    policy: str = "auto"  # KV-cache policy spec, e.g. "locret:budget=2048+kivi"; auto: chosen per conversation
    theme: str = "textual-dark"
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    data_dir: str = ""  # where conversations are saved; "" = the user data dir
    doc_cache_gib: float = 4.0  # caches of read documents kept (least recently used go first); 0 = off
    sources: bool = True  # each answer names the passages it read most (app/runtime/evidence.py); false = off
    model_dirs: list[str] = field(default_factory=list)  # folders `main.py models` and /model also search
    keymap: dict[str, str] = field(default_factory=dict)  # binding id -> keys, e.g. {"policy": "f3"}

    def conversations_dir(self) -> Path:
        return Path(self.data_dir or user_data_dir(APP)) / "conversations"

    def doc_cache(self):
        """The kept caches of read documents (app/runtime/doc_cache.py) under the user cache
        dir, or $VRAMCHAT_CACHE_DIR (tests set it), capped at `doc_cache_gib`."""
        from app.runtime.doc_cache import DocCache
        root = Path(os.environ.get("VRAMCHAT_CACHE_DIR") or user_cache_dir(APP))
        return DocCache(root / "documents", int(self.doc_cache_gib * 2**30))


_COMMENTS = {
    "model": 'HF id, model directory, .gguf path or a `main.py models` name (ollama:qwen2.5:7b); "" = the embedded default model',
    "policy": 'KV-cache policy spec, e.g. "auto" (chosen for the conversation), "full", "locret:budget=2048+kivi"',
    "theme": "any Textual theme: textual-dark, textual-light, nord, gruvbox, ...",
    "max_new_tokens": "longest answer, in tokens",
    "temperature": "0 = greedy decoding",
    "top_p": "nucleus sampling threshold (used when temperature > 0)",
    "data_dir": 'saved conversations go under DATA_DIR/conversations; "" = the user data dir',
    "doc_cache_gib": "GiB of caches of read documents kept (a re-read document restores instead; least "
                     "recently used go first; `main.py cache list|clear`); 0 = off",
    "sources": "each answer names the passages of the documents it attended to most (folded under it in the "
               "app; Enter opens one); false = off, and no time spent finding them",
    "model_dirs": 'folders of models (model folders, .gguf files) for `main.py models` and /model, e.g. ["~/models"]',
}

_KEYMAP_HELP = """\
# Override key bindings: binding id = "keys" (comma-separate several keys).
# Ids: send, newline, stop, quit, load, policy, save, clear, copy_answer, copy_code, help.
# Example:
# policy = "f3"
# copy_answer = "ctrl+shift+c"
"""


def config_path() -> Path:
    return Path(user_config_dir(APP)) / "config.toml"


def _toml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def to_toml(config: Config) -> str:
    """The config as a commented TOML document (round-trips through `tomllib`)."""
    lines = ["# vramchat configuration; `main.py chat --model ... --policy ...` overrides it.", ""]
    for f in fields(Config):
        if f.name == "keymap":
            continue
        lines.append(f"# {_COMMENTS[f.name]}")
        lines.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
        lines.append("")
    lines.append("[keymap]")
    lines.append(_KEYMAP_HELP.rstrip("\n"))
    for key, keys in config.keymap.items():
        lines.append(f"{key} = {_toml_value(keys)}")
    return "\n".join(lines) + "\n"


def write_config(config: Config, path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_toml(config), encoding="utf-8")
    os.replace(tmp, path)


def parse_config(data: dict, where: str = "config") -> Config:
    """Validate a decoded TOML table into a Config; unknown keys and wrong types are errors."""
    config = Config()
    kinds = {f.name: type(getattr(config, f.name)) for f in fields(Config)}
    for key, value in data.items():
        if key not in kinds:
            raise ConfigError(f"{where}: unknown key `{key}` (known: {', '.join(kinds)})")
        want = kinds[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: `{key}` must be a {want.__name__}, got {value!r}")
        if key == "keymap":
            bad = [k for k, v in value.items() if not isinstance(v, str)]
            if bad:
                raise ConfigError(f'{where}: keymap entry `{bad[0]}` must be a string like "f3"')
        if key == "model_dirs" and not all(isinstance(v, str) for v in value):
            raise ConfigError(f'{where}: `model_dirs` must be a list of folder paths like ["~/models"]')
        setattr(config, key, value)
    if config.max_new_tokens < 1:
        raise ConfigError(f"{where}: `max_new_tokens` must be at least 1, got {config.max_new_tokens}")
    if config.doc_cache_gib < 0:
        raise ConfigError(f"{where}: `doc_cache_gib` must be >= 0 (0 = off), got {config.doc_cache_gib}")
    if config.temperature < 0:
        raise ConfigError(f"{where}: `temperature` must be >= 0, got {config.temperature}")
    return config


def load_config(path: Path | None = None) -> Config:
    """Read the config file, writing the defaults there first if it does not exist."""
    path = path or config_path()
    if not path.exists():
        config = Config()
        try:
            write_config(config, path)
        except OSError:
            pass  # a read-only home still gets the defaults
        return config
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix it or delete it to get the defaults") from None
    return parse_config(data, str(path))


load = load_config  # `app.config.load()`: the name the CLI uses
