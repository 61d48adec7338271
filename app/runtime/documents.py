"""Reading documents (.txt, .md and other text, .pdf) with errors a person can act on.

Nothing is ever truncated: a document is read whole or refused with the reason.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil

from .types import VramchatError, fmt_bytes

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ".csv", ".json", ".log", ".py", ".tex", ".html", ".xml"}
# Refuse files over this fraction of available host memory before reading them: the text,
# its tokens and the cache all need room too.
_MAX_FRACTION = 0.25


def max_bytes() -> int:
    return int(psutil.virtual_memory().available * _MAX_FRACTION)


def read_document(path: str | os.PathLike) -> str:
    """Return the text of `path`, or raise VramchatError naming the problem."""
    return read_pages(path)[0]


def message(path: str | os.PathLike) -> dict:
    """The conversation's message for the document at `path`: its name, text and absolute
    path; a PDF's `pages` too ([(char offset, page number)]: a source names its page)."""
    text, pages = read_pages(path)
    msg = {"role": "document", "name": Path(path).name, "content": text, "path": str(Path(path).resolve())}
    if pages:
        msg["pages"] = pages
    return msg


def read_pages(path: str | os.PathLike) -> tuple[str, list | None]:
    """-> (the text of `path`, [(char offset, page number)] where each PDF page with text
    begins; None for other files). Raises VramchatError naming the problem."""
    p = Path(path).expanduser()
    try:
        st = p.stat()  # follows symlinks; a loop raises OSError(ELOOP)
    except FileNotFoundError:
        raise VramchatError(f"{p}: no such file") from None
    except OSError as e:
        raise VramchatError(f"{p}: cannot be opened ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise VramchatError(f"{p} is a directory; load the files in it one at a time")
    if not stat.S_ISREG(st.st_mode):
        raise VramchatError(f"{p} is not a regular file (a device, FIFO or socket); vramchat reads only files")
    limit = max_bytes()
    if st.st_size > limit:
        raise VramchatError(
            f"{p} is {fmt_bytes(st.st_size)}; this machine can take at most {fmt_bytes(limit)} "
            "(a quarter of the available memory). Split the document or free memory.")
    pages = None
    if p.suffix.lower() == ".pdf":
        text, pages = _read_pdf(p, limit)
    else:
        text = _read_text(p, st.st_size, limit)
    if not text.strip():
        raise VramchatError(f"{p} is empty (no text to read)")
    return text, pages


def _read_text(p: Path, size: int, limit: int) -> str:
    try:
        with open(p, "rb") as fh:
            data = fh.read(limit + 1)  # a file that grows past the limit while read is refused too
    except OSError as e:
        raise VramchatError(f"{p}: cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise VramchatError(f"{p} grew past {fmt_bytes(limit)} while being read; refused")
    head = data[:8192]
    if b"\x00" in head or (head and sum(b < 9 or 13 < b < 32 for b in head) / len(head) > 0.1):
        raise VramchatError(f"{p} looks like a binary file, not text; load .txt, .md or .pdf files")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise VramchatError(
            f"{p} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}). "
            "Convert it, e.g. `iconv -f latin1 -t utf-8`.") from None
    return text.replace("\r\n", "\n")


def _read_pdf(p: Path, limit: int) -> tuple[str, list]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(p))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")
            except Exception:
                ok = 0
            if not ok:
                raise VramchatError(f"{p} is an encrypted PDF; save an unencrypted copy and load that")
        pages = [(page.extract_text() or "") for page in reader.pages]
    except VramchatError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise VramchatError(f"{p} is not a readable PDF ({e})") from None
    kept = [(i + 1, t.strip()) for i, t in enumerate(pages) if t.strip()]
    text, starts = "", []
    for number, t in kept:
        if text:
            text += "\n\n"
        starts.append((len(text), number))
        text += t
    if not text:
        raise VramchatError(
            f"{p} has {len(pages)} page(s) but no text layer (a scanned PDF?); run OCR on it first")
    if len(text.encode()) > limit:
        raise VramchatError(f"{p}: its text is larger than {fmt_bytes(limit)}; refused")
    return text, starts
