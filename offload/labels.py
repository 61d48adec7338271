"""The label cache: keys restricted to calibrated outlier channels, and the scorer over it.

A label is a post-RoPE key's r outlier channels ([Hkv, N, r]). A query scores N tokens with
q[channels]·labelᵀ; for GQA each KV head's score is the sum over its query heads (linear,
so the group's queries are summed first: one [r] vector per head).

`LabelCache` holds a layer's labels on the compute device, one row per token for the whole
conversation, so it is stored compactly: int8 codes with one fp16 scale per (head, token)
(symmetric, absmax / 127): r + 2 bytes a row instead of 4r (fp32) or 2r (bf16). Rankings
with int8 labels against the cache dtype's: BENCHMARKS.md (Offload, label cache).
"""
from __future__ import annotations

import torch

KINDS = ("int8", "fp16", "model")  # model: the cache dtype
KIND = "int8"


def encode(lab: torch.Tensor, kind: str = KIND, dtype: torch.dtype | None = None):
    """lab [H, N, r] -> (stored rows, fp16 scales [H, N] or None). The codes are chosen
    against the stored (rounded) scale, so decoding reproduces exactly the grid they sit on."""
    if kind == "int8":
        x = lab.float()
        top = x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])
        scale = (top / 127).clamp_min(torch.finfo(torch.float16).tiny).half()
        codes = torch.round(x / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return codes, scale
    if kind not in KINDS:
        raise ValueError(f"label kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return lab.to(torch.float16 if kind == "fp16" else (dtype or lab.dtype)), None


def decode(rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored rows [H, N, r] (+ scales [H, N]) -> float32 labels."""
    x = rows.float()
    return x if scale is None else x * scale.float()[..., None]


def row_bytes(r: int, dtype: torch.dtype, kind: str | None = None) -> int:
    """Bytes of one (head, token) row of r labels stored as `kind` (for projections: `plan`)."""
    kind = kind or KIND
    if kind == "int8":
        return r + 2
    return r * (2 if kind == "fp16" else torch.empty(0, dtype=dtype).element_size())


class LabelCache:
    """Labels of one layer's tokens, [Hkv, cap, r] rows stored as `kind`; the owner counts
    the rows in use (n) and grows the capacity."""

    def __init__(self, h: int, r: int, dtype: torch.dtype, device, kind: str | None = None):
        kind = kind or KIND
        if kind not in KINDS:
            raise ValueError(f"label kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.kind, self.dtype = kind, dtype
        stored = {"int8": torch.int8, "fp16": torch.float16}.get(kind, dtype)
        self.rows = torch.empty(h, 0, r, dtype=stored, device=device)
        self.scale = torch.empty(h, 0, dtype=torch.float16, device=device) if kind == "int8" else None

    @property
    def capacity(self) -> int:
        return self.rows.shape[1]

    def grow(self, cap: int, keep: int) -> None:
        """Capacity `cap` rows, the first `keep` kept."""
        rows = self.rows.new_empty(self.rows.shape[0], cap, self.rows.shape[2])
        rows[:, :keep] = self.rows[:, :keep]
        self.rows = rows
        if self.scale is not None:
            scale = self.scale.new_empty(self.scale.shape[0], cap)
            scale[:, :keep] = self.scale[:, :keep]
            self.scale = scale

    def write(self, at: int, lab: torch.Tensor) -> None:
        """Rows at..at+e from labels lab [H, e, r] (capacity already there)."""
        rows, scale = encode(lab, self.kind, self.dtype)
        self.rows[:, at:at + rows.shape[1]] = rows
        if scale is not None:
            self.scale[:, at:at + rows.shape[1]] = scale

    def __getitem__(self, key) -> torch.Tensor:
        """Decoded float32 labels of `key` over (heads, rows), e.g. `labels[:, :n]`."""
        return decode(self.rows[key], None if self.scale is None else self.scale[key])

    def scores(self, qs: torch.Tensor, n: int, block: int = 64) -> torch.Tensor:
        """`grouped_scores` of group queries qs [Hkv, Tq, r] over rows 0..n-1 -> [Hkv, n]."""
        return grouped_scores(qs, self[:, :n], block)

    def state(self, n: int) -> dict:
        out = {"labels": self.rows[:, :n]}
        if self.scale is not None:
            out["label_scales"] = self.scale[:, :n]
        return out

    def restore(self, tensors: dict, n: int, cap: int) -> None:
        """Rows saved by `state` (or float labels from a cache file that kept them so)."""
        lab = tensors["labels"]
        if lab.shape[0] != self.rows.shape[0] or lab.shape[1] != n or lab.shape[2] != self.rows.shape[2]:
            raise ValueError(f"labels: saved {tuple(lab.shape)} for {n} tokens do not fit "
                             f"[{self.rows.shape[0]}, n, {self.rows.shape[2]}]")
        self.grow(cap, 0)
        dev = self.rows.device
        if "label_scales" in tensors and self.scale is not None and lab.dtype == self.rows.dtype:
            self.rows[:, :n] = lab.to(dev)
            self.scale[:, :n] = tensors["label_scales"].to(dev)
        else:
            self.write(0, decode(lab, tensors.get("label_scales")).to(dev))

    def nbytes(self) -> int:
        return self.rows.nbytes + (0 if self.scale is None else self.scale.nbytes)


def take(k: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """k [Hkv, T, D], ch [Hkv, r] -> labels [Hkv, T, r]."""
    return k.gather(2, ch[:, None, :].expand(-1, k.shape[1], -1))


def group_queries(q: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
    """q [Hq, Tq, D] -> [Hkv, Tq, r] float32: each group's queries summed on its channels."""
    hkv, r = ch.shape
    hq, tq, d = q.shape
    qg = q.reshape(hkv, hq // hkv, tq, d).float().sum(1)  # [Hkv, Tq, D]
    return qg.gather(2, ch[:, None, :].expand(-1, tq, -1))


def scores(q: torch.Tensor, labels: torch.Tensor, ch: torch.Tensor, block: int = 64) -> torch.Tensor:
    """q [Hq, Tq, D] against labels [Hkv, N, r] -> [Hkv, N] float32.

    Several queries (a question's prefill) score a token by their maximum: a token matters
    if any of them would read it. Queries go in blocks so memory stays [Hkv, block, N].
    """
    return grouped_scores(group_queries(q, ch), labels, block)


def grouped_scores(qs: torch.Tensor, labels: torch.Tensor, block: int = 64) -> torch.Tensor:
    """`scores` from group queries qs [Hkv, Tq, r] (`group_queries`) -> [Hkv, N] float32."""
    lab = labels.float().transpose(1, 2)  # [Hkv, r, N]
    out = None
    for s in range(0, qs.shape[1], block):
        part = torch.matmul(qs[:, s:s + block], lab).amax(1)  # [Hkv, N]
        out = part if out is None else torch.maximum(out, part)
    return out


def top(scores_: torch.Tensor, k: int) -> torch.Tensor:
    """scores [Hkv, N] -> indices [Hkv, min(k, N)] of the best, sorted ascending."""
    k = min(k, scores_.shape[1])
    return scores_.topk(k, dim=1).indices.sort(dim=1).values
