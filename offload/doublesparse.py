"""`doublesparse`: sparse decode over the cached tokens, guided by a label cache
(Double Sparsity, arXiv 2408.07092).

A reader (see policies/base.py). Every decode step (Tq == 1) scores all cached tokens with
q[channels]·labelᵀ (each GQA group's query heads summed), takes the top
`ceil(keep * (L + 1))` per KV head — the new token always among them — and does exact
attention (scale 1/√d, the model's own) over just those K/V rows, plus any recalled
`extra`. Prefill (Tq > 1) and the first `dense_layers` layers attend densely.

Labels. The reader keeps labels [Hkv, L, r] in step with the store: the new tokens' labels
are appended in `attend` (the store appends exactly those tokens next), and after an
eviction (`after_evict`) they are rebuilt from the store's re-rotated keys,
once per eviction, which already reads every kept key. A length that disagrees (a live
conversion or a truncation) is fixed the same way before the next read.
"""
from __future__ import annotations

import math

import torch

from policies import capacity
from policies.attention import attend
from policies.slots import Reader

from . import labels
from .calibrate import find_channels


class DoubleSparseReader(Reader):
    BLOCK = 256

    def __init__(self, info, layer: int, channels: int, keep: float, dense_layers: int, floor: int,
                 channels_file: str = ""):
        self.info, self.layer = info, layer
        self.keep_frac, self.floor = keep, floor
        self.dense = layer < dense_layers
        self.ch = None if self.dense else find_channels(info, channels, channels_file, "doublesparse")[layer]
        r = 0 if self.ch is None else self.ch.shape[1]
        self.labels = labels.LabelCache(info.n_kv_heads, r, info.dtype, info.device)  # [Hkv, cap, r]
        self.n = 0  # labelled tokens (== store.length between calls)
        self.sparse_steps = 0  # decode steps that read a subset (tests read it)

    def reads(self, length: int) -> int:
        """Tokens one decode step reads, of length stored + 1 new."""
        return max(self.floor, math.ceil(self.keep_frac * (length + 1)))

    def _set(self, lab: torch.Tensor) -> None:
        self.n = 0
        self._append(lab)

    def _append(self, lab: torch.Tensor) -> None:
        """lab [Hkv, T, r] for the tokens the store appends next."""
        end = self.n + lab.shape[1]
        if end > self.labels.capacity:
            cap = capacity.grown(self.labels.capacity, end, self.BLOCK)
            self.labels.grow(cap, self.n)
        self.labels.write(self.n, lab)
        self.n = end

    def _sync(self, layer) -> None:
        if self.n != layer.length:
            self._set(labels.take(layer.store.dense()[0], self.ch))

    def after_evict(self, layer, idx: torch.Tensor) -> None:
        """After an eviction the kept keys moved: rebuild their labels."""
        if not self.dense:
            self._set(labels.take(layer.store.dense()[0], self.ch))

    def attend(self, layer, q, k, v, scale, extra=None):
        """q [Hq, Tq, D], new k/v [Hkv, Tq, D] -> [Hq, Tq, D]."""
        if self.dense:
            return layer.store.attend(q, k, v, scale, extra)
        self._sync(layer)
        n = layer.length
        b = self.reads(n)
        if q.shape[1] > 1 or b > n:
            out = layer.store.attend(q, k, v, scale, extra)
            self._append(labels.take(k, self.ch))
            return out
        s = self.labels.scores(labels.group_queries(q, self.ch), n)  # [Hkv, n]
        idx = labels.top(s, b - 1)  # [Hkv, b-1]; the new token is the b-th
        ks, vs = layer.store.dense(idx)
        keys, vals = torch.cat((ks, k), 1), torch.cat((vs, v), 1)
        if extra is not None:
            keys, vals = torch.cat((extra[0], keys), 1), torch.cat((extra[1], vals), 1)
        self._append(labels.take(k, self.ch))
        self.sparse_steps += 1
        return attend(q, keys, vals, scale)

    def nbytes(self) -> dict:
        return {("gpu", "labels"): self.labels.nbytes()}

    def state(self) -> tuple[dict, dict]:
        return self.labels.state(self.n), {"n": self.n, "cap": self.labels.capacity,
                                           "sparse_steps": self.sparse_steps}

    def restore(self, tensors: dict, meta: dict) -> None:
        n = int(meta["n"])
        self.labels.restore(tensors, n, int(meta["cap"]))
        self.n, self.sparse_steps = n, int(meta["sparse_steps"])
