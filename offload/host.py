"""`offload` alone: the whole cache lives in host memory; each layer's K/V is streamed to
the device just before that layer attends.

On CUDA the host buffers are pinned and one `Streamer` per model owns a copy stream and
two device buffers: when layer i asks for its K/V, the copy of layer i+1's is issued on
the copy stream, so it overlaps layer i's compute (double buffering: layer i+1 lands in
the buffer layer i-1 used; the copy stream first waits for the compute stream, so that
buffer is free and the host rows the previous step wrote have landed). New tokens go back
to the host with non_blocking copies. On CPU the store is `FullStore` on host tensors:
the same interface and arithmetic, which is what CI tests; overlap is moot there.
"""
from __future__ import annotations

import torch

from policies import capacity
from policies.attention import attend
from policies.base import FullStore


_EXACT_PINNED: bool | None = None


def host_empty(shape, dtype, pin: bool) -> torch.Tensor:
    """A host tensor, page-locked when `pin` (CUDA), of exactly its size.

    NOTE: torch's pinned-memory cache rounds every block up to a power of two by default:
    a 128K-token cache of an 8B model (258 MiB per layer's keys, with an answer's room)
    pinned 512 MiB blocks, ~2x what the cache holds (measured with torch 2.11 on an H100:
    +606 MiB of RSS for a 260 MiB tensor). `pinned_max_round_threshold_mb` stops rounding
    above 1 MiB; torch 2.13 takes it, 2.11 refuses it. `host_bytes` reports what is pinned."""
    if pin:
        pinned_exact()
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)


def pinned_exact() -> bool:
    """Turn off power-of-two rounding of pinned blocks over 1 MiB (once). -> whether it is off."""
    global _EXACT_PINNED
    if _EXACT_PINNED is None:
        _EXACT_PINNED = False
        try:
            torch._C._accelerator_setAllocatorSettings("pinned_max_round_threshold_mb:1")
            _EXACT_PINNED = True
        except Exception:  # older torch: blocks stay rounded, and host_bytes says so
            pass
    return _EXACT_PINNED


def host_bytes(t: torch.Tensor) -> int:
    """Host memory a tensor from `host_empty` takes: its bytes, or the power-of-two block
    torch's pinned cache gave it where rounding could not be turned off."""
    n = t.untyped_storage().nbytes()
    if n > 1 << 20 and t.is_pinned() and not pinned_exact():
        return 1 << (n - 1).bit_length()
    return n


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst = src ([H, T, D], slices of [H, cap, D] buffers) across host and device, one
    asynchronous copy per head.

    NOTE: a [H, a:b, D] slice of an [H, cap, D] buffer is not contiguous, and torch copies a
    non-contiguous host tensor through a pageable staging copy, synchronously (measured on an
    H100: ~3 GB/s, where pinned DMA runs at ~25+); each head's rows are contiguous."""
    if dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src, non_blocking=True)
        return
    for h in range(dst.shape[0]):
        dst[h].copy_(src[h], non_blocking=True)


class Streamer:
    """Double-buffered host->device copies of every HostStore of one model (CUDA only)."""

    def __init__(self, info):
        self.info = info
        self.stores: dict[int, "HostStore"] = {}
        self.stream = torch.cuda.Stream(info.device)
        self.bufs = [None, None]  # (k, v) [Hkv, cap, D] device
        self.ready: dict[int, tuple] = {}  # layer -> (event, slot, n)

    def _issue(self, layer: int) -> None:
        st = self.stores[layer]
        n, slot = st.length, layer % 2
        buf = self.bufs[slot]
        if buf is None or buf[0].shape[1] < n:
            cap = capacity.blocks(max(n, 1), FullStore.BLOCK)
            shape = (st.k.shape[0], cap, st.k.shape[2])
            buf = tuple(torch.empty(shape, dtype=st.k.dtype, device=self.info.device) for _ in range(2))
            self.bufs[slot] = buf
        self.stream.wait_stream(torch.cuda.current_stream(self.info.device))
        with torch.cuda.stream(self.stream):
            copy_rows(buf[0][:, :n], st.k[:, :n])
            copy_rows(buf[1][:, :n], st.v[:, :n])
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.ready[layer] = (ev, slot, n)

    def fetch(self, layer: int):
        """-> (k, v) [Hkv, n, D] on the device for `layer`; prefetches layer + 1."""
        if layer not in self.ready or self.ready[layer][2] != self.stores[layer].length:
            self._issue(layer)
        ev, slot, n = self.ready.pop(layer)
        if layer + 1 in self.stores:
            self._issue(layer + 1)
        torch.cuda.current_stream(self.info.device).wait_event(ev)
        k, v = self.bufs[slot]
        return k[:, :n], v[:, :n]

    def nbytes(self) -> int:
        return sum(t.nbytes for b in self.bufs if b is not None for t in b)


class HostStore(FullStore):
    """Full-precision K/V [Hkv, cap, D] in host memory (pinned on CUDA), streamed per layer."""

    tier = "host"
    lossless = True
    static_decode = False  # its buffers live on the host; each layer is streamed in per step
    reserve_ahead = True  # KVCache.expect: pin the whole projected length once

    def __init__(self, info, layer: int):
        super().__init__(info)
        self.layer = layer
        self.cuda = info.device.type == "cuda"
        self.k = host_empty((info.n_kv_heads, 0, info.head_dim), info.dtype, self.cuda)
        self.v = host_empty(self.k.shape, info.dtype, self.cuda)
        self.streamer: Streamer | None = None  # one per cache (link), CUDA only

    @staticmethod
    def link(parts: list["HostStore"]) -> None:
        if parts[0].cuda:
            streamer = Streamer(parts[0].info)
            for st in parts:
                st.streamer = streamer
                streamer.stores[st.layer] = st

    def reserve(self, n: int) -> None:
        if n <= self.k.shape[1]:
            return
        if self.cuda:
            torch.cuda.current_stream(self.info.device).synchronize()  # host rows still in flight
        cap = capacity.grown(self.k.shape[1], n, self.BLOCK)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = host_empty((old.shape[0], cap, old.shape[2]), old.dtype, self.cuda)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def attend(self, q, k, v, scale, extra=None):
        """q [Hq, Tq, D] over stored + `extra` + new k/v [Hkv, Tq, D] (k/v on the device)."""
        if not self.cuda:
            return super().attend(q, k, v, scale, extra)
        sk, sv = self.streamer.fetch(self.layer)
        keys, vals = torch.cat((sk, k), 1), torch.cat((sv, v), 1)
        if extra is not None:
            keys, vals = torch.cat((extra[0], keys), 1), torch.cat((extra[1], vals), 1)
        return attend(q, keys, vals, scale)

    def append(self, k, v) -> None:
        if not self.cuda:
            return super().append(k, v)
        n = self.length + k.shape[1]
        self.reserve(n)
        copy_rows(self.k[:, self.length:n], k.contiguous())  # (each head's rows contiguous)
        copy_rows(self.v[:, self.length:n], v.contiguous())
        self._staged = 0
        self.length = n

    def dense(self, idx: torch.Tensor | None = None):
        """(k, v) [Hkv, T, D] on the compute device: all tokens, or per-head idx [Hkv, n]."""
        if self.cuda:
            torch.cuda.current_stream(self.info.device).synchronize()
        k, v = super().dense(None if idx is None else idx.cpu())
        return k.to(self.info.device), v.to(self.info.device)

    def compact(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.info.device).synchronize()
        super().compact(idx.cpu(), delta.cpu())

    def load(self, k, v) -> None:
        self.length = 0
        n = k.shape[1]
        self.reserve(n)
        self.k[:, :n] = k.to("cpu")
        self.v[:, :n] = v.to("cpu")
        self.length = n

    def nbytes(self) -> dict:
        """Host rows by kind; layer 0 also reports the streamer's two device buffers."""
        out = {("host", "keys"): host_bytes(self.k), ("host", "values"): host_bytes(self.v)}
        if self.streamer is not None and self.layer == 0:
            half = self.streamer.nbytes() // 2
            out[("gpu", "keys")] = half
            out[("gpu", "values")] = half
        return out
