"""Sources of an answer: where in the documents the model looked while it answered.

While an answer decodes, `Recorder` keeps the queries of its tokens (and of the question's
last token, which chose the first answer token) at a few layers (`LAYERS`). After the answer,
`sources` computes those queries' attention over what each of those layers held: the tokens
kept on the device (`LayerCache.positions()` gives each one's place in the conversation) and
the ones offload recalled from the host for this question (`OffloadSpill.recalled`). The
mass each conversation position received is summed over those layers, heads and queries,
then over passages (the document's lines, long lines cut at sentence ends); passages are
ranked by their share of the mass that fell on documents.

Evidence, not proof: attention says what the model read while it answered, not why it
answered so. A passage the policy evicted before the question was never read and cannot be
a source; where the question's rare words occur only in such passages, `note` says so.

Cost: a copy of one query per token and layer while decoding; after it, one [Hq, T, L]
matmul per evidence layer (chunked over T) and a tokenizer pass over each document's read,
kept for the next answer.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import asdict, dataclass

import torch

from .held import Held
from . import located
from .session import document_block

# evidence layers as fractions of the depth; the bench `quality --parts sources-depths` chose
# these by attribution accuracy under `full` (BENCHMARKS.md)
DEPTHS = (0.62, 0.7, 0.8)
TOP = 3  # sources reported per answer
_Q_CHUNK = 64  # queries per matmul when the mass is computed
LONG_MESSAGE = 2000  # characters: a user message this long is read as a document


def layers_for(n_layers: int) -> tuple[int, ...]:
    return tuple(sorted({min(n_layers - 1, int(round(d * (n_layers - 1)))) for d in DEPTHS}))


class Recorder:
    """Queries [Hq, 1, D] of the answer's tokens at `layers`, with their conversation indices.
    `see` is called by the adapter's attention for every layer of every forward while it is
    active; eager steps are copied, a fixed-shape window's steps are written into a buffer on
    the device by its step tensor (no host sync: a CUDA graph replays it)."""

    def __init__(self, layers):
        self.layers = frozenset(layers)
        self.q: dict[int, list] = {l: [] for l in self.layers}  # [(q [Hq, n, D], positions [n])]
        self.last: dict[int, tuple] = {}  # the newest prefill chunk's last query, per layer
        self._win: dict[int, tuple] = {}  # layer -> (StaticStep, q buffer [Hq, room, D], positions [room])

    def see(self, layer_cache, q: torch.Tensor, chunk) -> None:
        """q [Hq, T, D] of `layer_cache` (a LayerCache) for `chunk`, before it is appended."""
        i = layer_cache.layer
        if i not in self.layers:
            return
        st = chunk.static
        if st is not None:
            win = self._win.get(i)
            if win is None or win[0] is not st:
                self._flush(i)
                buf = torch.zeros(q.shape[0], st.room, q.shape[2], dtype=q.dtype, device=q.device)
                pos = torch.full((st.room,), -1, dtype=torch.long, device=q.device)
                win = self._win[i] = (st, buf, pos, layer_cache.seen)
            _, buf, pos, seen0 = win
            buf.index_copy_(1, st.step, q)
            pos.index_copy_(0, st.step, st.step + seen0)
            return
        n = q.shape[1]
        seen = layer_cache.seen
        if chunk.phase == "decode":
            self.q[i].append((q.detach().clone(), torch.arange(seen, seen + n)))
        else:
            self.last[i] = (q[:, -1:].detach().clone(), torch.tensor([seen + n - 1]))

    def _flush(self, i: int) -> None:
        win = self._win.pop(i, None)
        if win is not None:
            _, buf, pos, _ = win
            pos = pos.cpu()
            ok = pos >= 0
            if ok.any():
                self.q[i].append((buf[:, ok.to(buf.device)], pos[ok]))

    def queries(self, i: int):
        """-> (q [Hq, T, D], conversation indices [T]) recorded at layer i, in order; or None."""
        self._flush(i)
        parts = ([self.last[i]] if i in self.last else []) + self.q[i]
        if not parts:
            return None
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts])


def mass(cache, rec: Recorder, scale_of) -> torch.Tensor:
    """Attention mass [seen] float32 each conversation index received from the recorded
    queries at rec's layers, over what each layer held (kept and recalled); scale_of(layer)
    the layer's softmax scale."""
    from offload.spill import OffloadSpill
    out = torch.zeros(cache.seen, dtype=torch.float32)
    for i in sorted(rec.layers):
        got = rec.queries(i)
        if got is None:
            continue
        q, qpos = got
        layer = cache.layers[i]
        k = layer.store.dense()[0]  # [Hkv, L, D]
        pos = layer.positions()
        spill = layer.spill
        m = spill.m if isinstance(spill, OffloadSpill) else 0
        if m:
            k = torch.cat((spill.buf_k[:, :m].to(k.dtype), k), 1)
            pos = torch.cat((spill.recalled[:, :m].to(pos.device), pos), 1)
        hkv, n_keys, d = k.shape
        g = q.shape[0] // hkv
        kf, posc = k.float(), pos.cpu()
        qpos = qpos.to(pos.device)
        acc = torch.zeros(hkv, n_keys, dtype=torch.float32, device=k.device)
        for t0 in range(0, q.shape[1], _Q_CHUNK):
            qs = q[:, t0:t0 + _Q_CHUNK].float().view(hkv, g, -1, d)  # [Hkv, g, t, D]
            logits = torch.einsum("hgtd,hld->hgtl", qs, kf) * scale_of(i)
            future = pos[:, None, None, :] > qpos[t0:t0 + _Q_CHUNK][None, None, :, None]
            logits.masked_fill_(future, float("-inf"))
            acc += torch.softmax(logits, -1).sum((1, 2))
        out.index_add_(0, posc.reshape(-1).clamp(max=cache.seen - 1), acc.cpu().reshape(-1))
    return out


@dataclass
class Source:
    document: str
    page: int | None  # 1-based, for PDFs
    line: int  # 1-based line of the passage's start in the document
    text: str
    weight: float  # share of the answer's attention on documents
    tier: str  # "device", "recalled"
    start: int  # conversation indices [start, end) of the passage
    end: int

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("start", "end")}


@dataclass
class Passage:
    document: str
    page: int | None
    line: int
    text: str
    start: int  # conversation token indices
    end: int


def split_passages(content: str, max_chars: int = 320) -> list[tuple[int, int]]:
    """Char spans [(a, b)] of `content`'s passages: its non-empty lines, a long line cut at
    sentence ends into pieces of about max_chars."""
    out = []
    for m in re.finditer(r"[^\n]+", content):
        a, b = m.span()
        if not content[a:b].strip():
            continue
        while b - a > max_chars:
            cut = max(content.rfind(". ", a, a + max_chars), content.rfind("? ", a, a + max_chars),
                      content.rfind("! ", a, a + max_chars))
            cut = cut + 2 if cut > a + max_chars // 4 else a + max_chars
            out.append((a, cut))
            a = cut
        out.append((a, b))
    return out


class Passages:
    """The documents of a conversation as passages with their token ranges, located in the
    record of what the cache holds (`located.index`: a read's offsets computed once)."""

    def __init__(self, tok):
        self.tok = tok

    def of(self, held: Held, messages: list) -> list[Passage]:
        """Every document's passages, located in held.text; a document whose read cannot be
        mapped back to tokens (its text rendered otherwise) has none. A user message of
        LONG_MESSAGE characters or more counts as a document ("message N"): a client of `serve`
        sends its documents as user content."""
        out, at, users = [], 0, 0
        index = located.index(held, self.tok)
        for msg in messages:
            users += msg.get("role") == "user"
            content = msg["content"].strip()
            if msg.get("role") == "document":
                name, block = msg["name"], document_block(msg["name"], msg["content"])
            elif msg.get("role") == "user" and len(content) >= LONG_MESSAGE:
                name, block = f"message {users}", content
            else:
                continue
            b0 = held.text.find(block, at)
            if b0 < 0:
                continue
            c_doc, at = b0 + block.index(content), b0 + len(block)
            r = index.read_of(b0)
            if r != index.read_of(at - 1) or r + 1 >= len(index.ends) or index.starts(r) is None:
                continue  # not one read, or not mappable: no passages rather than wrong ones
            skipped = msg["content"][:len(msg["content"]) - len(msg["content"].lstrip())]
            lead = skipped.count("\n")
            pages = msg.get("pages")  # [(char offset in content, page number)]
            page_at = [p[0] for p in pages] if pages else []
            line, counted = lead + 1, 0  # NOTE: lines counted as the passages go (one pass, not one per passage)
            for a, b in split_passages(content):
                s = index.exact(c_doc + a + 1) - 1  # the token holding the passage's first character
                e = index.exact(c_doc + b)
                page = None
                if pages:
                    k = bisect.bisect_right(page_at, len(skipped) + a) - 1
                    page = pages[max(k, 0)][1]
                line += content.count("\n", counted, a)
                counted = a
                out.append(Passage(name, page, line, content[a:b], s, max(e, s + 1)))
        return out


EVICTED, HOST, DEVICE, RECALLED = 0, 1, 2, 3
TIER_NAMES = ("evicted", "host", "device", "recalled")


def tiers(cache, n: int) -> torch.Tensor:
    """Where each conversation index [0, n) sits at the first evidence layer, [n] uint8:
    DEVICE (kept by some head), RECALLED for this question, HOST (offloaded), or EVICTED."""
    from offload.spill import OffloadSpill
    layer = cache.layers[layers_for(len(cache.layers))[0]]
    t = torch.full((n,), EVICTED, dtype=torch.uint8)

    def mark(pos: torch.Tensor, code: int) -> None:
        pos = pos.reshape(-1).cpu()
        t[pos[(pos >= 0) & (pos < n)]] = code
    spill = layer.spill
    offloaded = isinstance(spill, OffloadSpill)
    if offloaded and spill.n:
        mark(spill.hpos[:, :spill.n], HOST)
    mark(layer.positions(), DEVICE)
    if offloaded and spill.m:
        mark(spill.recalled[:, :spill.m], RECALLED)
    return t


_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]{3,}")


def rank(passages: list[Passage], weights: torch.Tensor, where: torch.Tensor, top: int = TOP) -> list[Source]:
    """The passages with the most mass, best first (none that received none)."""
    scored = []
    for p in passages:
        w = float(weights[p.start:p.end].sum())
        if w > 0:
            scored.append((w, p))
    total = sum(w for w, _ in scored) or 1.0
    scored.sort(key=lambda x: -x[0])
    out = []
    for w, p in scored[:top]:
        tier = "recalled" if bool((where[p.start:p.end] == RECALLED).any()) else "device"
        out.append(Source(p.document, p.page, p.line, p.text, round(w / total, 4), tier, p.start, p.end))
    return out


def evicted_note(question: str, passages: list[Passage], where: torch.Tensor) -> str:
    """"" or why the part of a document that answers `question` may have been evicted: a
    rare word of the question (at most 3 passages have it) occurs only in passages that were
    neither kept nor recalled."""
    for word in dict.fromkeys(w.lower() for w in _WORD.findall(question)):
        having = [p for p in passages if word in p.text.lower()]
        if not having or len(having) > 3:
            continue
        if all(bool((where[p.start:p.end] < DEVICE).all()) for p in having):
            lines = ", ".join(f"{p.document} line {p.line}" for p in having)
            return (f"the part of the document that answers this may have been evicted: “{word}” occurs only "
                    f"in {lines}, which the policy did not keep or recall for this question")
    return ""


def explain(cache, held: Held, messages: list, passages: Passages, rec: Recorder, scale_of,
            question: str) -> tuple[list[dict], str]:
    """-> (the answer's sources as JSON, best first; a note where what answers the question may
    have been evicted, else ""). Nothing for a conversation without documents."""
    found = passages.of(held, messages)
    if not found:
        return [], ""
    where = tiers(cache, cache.seen)
    ranked = rank(found, mass(cache, rec, scale_of), where)
    return [s.to_json() for s in ranked], evicted_note(question, found, where)
