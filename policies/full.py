"""`full`: keep every token in full precision. The reference every policy is tested against.

`FullStore` is also the default store of every stack (and what a lazy `lighttransfer`
layer swaps a quantized store for); `KeepAll` is the default selector."""
from __future__ import annotations

import torch

from . import capacity, rope
from .attention import attend
from .kernels import window_attn
from .registry import register
from .slots import Selector, Store


class FullStore(Store):
    """Full-precision K/V in preallocated buffers that grow in blocks.

    Bytes reported are the allocated buffer (what the device really holds), not the
    used prefix: `nbytes` is exact, and capacity beyond length is at most one block.
    """

    lossless = True
    static_decode = True
    BLOCK = 256

    def __init__(self, info):
        super().__init__(info)
        self.k = torch.empty(info.n_kv_heads, 0, info.head_dim, dtype=info.dtype, device=info.device)
        self.v = torch.empty_like(self.k)
        self._staged = 0  # tokens attend() already wrote past `length`

    def reserve(self, n: int) -> None:
        if n <= self.k.shape[1]:
            return
        cap = capacity.grown(self.k.shape[1], n, self.BLOCK)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], cap, old.shape[2])
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def attend(self, q, k, v, scale, extra=None):
        """q [Hq, Tq, D] over stored tokens + `extra` (k, v) + new k/v [Hkv, Tq, D]."""
        n = self.length + k.shape[1]
        self.reserve(n)
        # NOTE: writing the new tokens before attending is safe: append() commits them.
        self.k[:, self.length:n] = k
        self.v[:, self.length:n] = v
        self._staged = k.shape[1]
        keys, vals = self.k[:, :n], self.v[:, :n]
        if extra is not None:
            keys, vals = torch.cat((extra[0], keys), 1), torch.cat((extra[1], vals), 1)
        return attend(q, keys, vals, scale)

    def append(self, k, v) -> None:
        n = self.length + k.shape[1]
        if self._staged != k.shape[1]:
            self.reserve(n)
            self.k[:, self.length:n] = k
            self.v[:, self.length:n] = v
        self.commit(k.shape[1])

    def commit(self, n: int) -> None:
        self._staged = 0
        self.length += n

    def open_window(self, start: int, end: int) -> None:
        self.reserve(end)
        # NOTE: the masked tail still enters P @ V with weight 0, and 0 x NaN is NaN:
        # memory the allocator hands back may hold any bits, so clear it
        self.k[:, start:end].zero_()
        self.v[:, start:end].zero_()

    def write_step(self, k, v, step: torch.Tensor, start: int, kernel: bool) -> None:
        if kernel:
            window_attn.write_rows(self.k, self.v, k, v, step, start)
        else:
            at = step + start
            self.k.index_copy_(1, at, k)
            self.v.index_copy_(1, at, v)

    def window(self, end: int):
        return self.k[:, :end], self.v[:, :end]

    def dense(self, idx: torch.Tensor | None = None):
        """Full-precision (k, v) [Hkv, T, D]: all tokens, or per-head indices [Hkv, n]."""
        k, v = self.k[:, : self.length], self.v[:, : self.length]
        if idx is None:
            return k, v
        ix = idx[..., None].expand(-1, -1, k.shape[2])
        return k.gather(1, ix), v.gather(1, ix)

    def compact(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Keep per-head token indices idx [Hkv, b], re-rotating keys by delta [Hkv, b]."""
        k, v = self.dense(idx)
        b = idx.shape[1]
        if self.k.shape[1] > 2 * b + self.BLOCK:
            # Give memory back when eviction leaves the buffer mostly empty (a layer that
            # just became a streaming layer); steady eviction (budget + chunk) keeps its buffer.
            cap = capacity.blocks(capacity.padded(b) + 1, self.BLOCK)
            self.k, self.v = self.k.new_empty(self.k.shape[0], cap, self.k.shape[2]), self.v.new_empty(
                self.v.shape[0], cap, self.v.shape[2])
        self.k[:, :b] = rope.rotate(k, delta, self.info.inv_freq)
        self.v[:, :b] = v
        self.length = b

    def load(self, k, v) -> None:
        """Replace the contents with dense k/v (live conversion)."""
        self.length = 0
        self.append(k, v)

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def nbytes(self) -> dict[str, int]:
        return {"keys": self.k.nbytes, "values": self.v.nbytes}

    def state(self) -> tuple[dict, dict]:
        n = self.length
        return {"k": self.k[:, :n], "v": self.v[:, :n]}, {"length": n, "cap": self.k.shape[1]}

    def restore(self, tensors: dict, meta: dict) -> None:
        """The stored tokens in a buffer of the saved capacity (`nbytes` equal)."""
        n, k, v = meta["length"], tensors["k"], tensors["v"]
        want = (self.k.shape[0], n, self.k.shape[2])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"saved keys/values {tuple(k.shape)} do not fit {want} [Hkv, T, D]")
        self.length, self.k, self.v = 0, self.k[:, :0], self.v[:, :0]
        self.reserve(meta["cap"])  # NOTE: the subclass's reserve (HostStore: pinned on CUDA)
        self.k[:, :n] = k
        self.v[:, :n] = v
        self.length, self._staged = n, 0



class KeepAll(Selector):
    """The `full` selector: never evicts."""

    static_decode = True  # score() is a pure function of the step's inputs (here: none)

    def __init__(self, info):
        pass



@register("full", "selector", {}, "keep every token at full precision (the reference; memory grows with the context)")
def build(policy, info, layer):
    return KeepAll(info)
