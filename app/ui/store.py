"""Saved conversations: JSON (what `Runtime.restore` reads) plus a Markdown copy to read.

Files live under `Config.conversations_dir()`, are private (0600, directory 0700) and are
written atomically (temp file + os.replace) so a crash mid-save never leaves half a file.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from app.runtime.files import atomic_write_text
from app.runtime.types import VramchatError


def new_name() -> str:
    return time.strftime("chat-%Y%m%d-%H%M%S")


def safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    if name.endswith(".json"):
        name = name[:-5]
    return name or new_name()


def to_markdown(data: dict) -> str:
    """A readable transcript of a `Runtime.to_json()` conversation."""
    out = ["# vramchat conversation", "", f"- model: `{data.get('model', '?')}`",
           f"- policy: `{data.get('policy', '?')}`", ""]
    if data.get("system"):
        out += ["## System", "", str(data["system"]), ""]
    for m in data.get("messages", []):
        role = m.get("role")
        if role == "document":
            out += [f"## Document: {m.get('name', '?')} ({m.get('tokens', 0):,} tokens)", "",
                    "<details><summary>text</summary>", "", str(m.get("content", "")), "", "</details>", ""]
        elif role == "user":
            out += ["## You", "", str(m.get("content", "")), ""]
        elif role == "assistant":
            out += ["## Assistant" + (" (stopped, partial)" if m.get("partial") else ""), "",
                    str(m.get("content", "")), ""]
            if m.get("stats"):
                out += [f"_{stats_line(m['stats'])}_", ""] + sources_lines(m["stats"])
    return "\n".join(out)


def sources_lines(stats: dict) -> list[str]:
    """An answer's sources (`TurnResult.sources`, best first) and its note, as Markdown lines."""
    from .sources import shorten, where
    got, note = stats.get("sources") or [], stats.get("sources_note") or ""
    if not got and not note:
        return []
    out = ["Sources:", ""] + [f"- {s.get('weight', 0.0):.0%} · {where(s)} · {s.get('tier', '?')} — "
                              f"“{shorten(s.get('text', ''), 120)}”" for s in got]
    return out + ([f"- _{note}_"] if note else []) + [""]


def stats_line(stats: dict) -> str:
    """Tokens, TTFT, decode speed and policy of one answer (a TurnResult as a dict)."""
    parts = [f"{stats.get('new_tokens', 0):,} tokens",
             f"TTFT {stats.get('ttft_s', 0.0):.2f} s",
             f"{stats.get('decode_tok_s', 0.0):.1f} tok/s",
             f"policy {stats.get('policy', '?')}"]
    if stats.get("ffn_skip_ratio") is not None:
        parts.append(f"FFN skipped {stats['ffn_skip_ratio']:.0%}")
    if stats.get("stopped"):
        parts.append("stopped (partial)")
    elif stats.get("finish") == "length":
        parts.append("hit max_new_tokens")
    return " · ".join(parts)


def save(directory: Path, name: str, data: dict) -> Path:
    """Write NAME.json and NAME.md; returns the JSON path."""
    path = directory / f"{safe_name(name)}.json"
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1))
    atomic_write_text(path.with_suffix(".md"), to_markdown(data))
    return path


def cache_path(json_path: Path) -> Path:
    """The cache file saved beside a conversation (NAME.cache.safetensors, app/runtime/snapshot.py)."""
    return json_path.with_suffix(".cache.safetensors")


def list_saved(directory: Path) -> list[Path]:
    """Saved conversations, newest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def resolve(directory: Path, name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    candidate = directory / f"{safe_name(name_or_path)}.json"
    if candidate.is_file():
        return candidate
    raise VramchatError(f"no saved conversation `{name_or_path}` (looked in {directory}); "
                        "`/open` with no name lists them")


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VramchatError(f"cannot read conversation {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise VramchatError(f"{path} is not a vramchat conversation (no `messages` list)")
    return data
