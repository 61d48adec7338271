"""A spill's host rows (offload/spill.py): the evicted tokens' keys or values of one layer,
[Hkv, cap, D] in eviction order, at the cache's precision (`PlainRows`) or as KIVI codes
(`CodedRows`, `offload:kbits=..,vbits=..`). Both grow to the capacity the spill gives them
(`policies.capacity`) and read back any rows into a device buffer."""
from __future__ import annotations

import math

import torch

from .host import copy_rows, host_bytes, host_empty

GROUP = 32  # as `kivi`'s default: G host rows share a key channel's scale, G channels a value's


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales and zeros of coded rows: fp16 as KIVI stores them, or the cache dtype where
    that is as narrow (bf16)."""
    return dtype if torch.empty(0, dtype=dtype).element_size() <= 2 else torch.float16


def row_bytes(kind: str, bits: int, h: int, d: int, dtype: torch.dtype) -> float:
    """Host bytes one evicted token's keys (kind "k") or values ("v") take in one layer at
    `bits` (16: the cache's own precision), scales and zeros counted per token."""
    elt = torch.empty(0, dtype=dtype).element_size()
    if bits >= 16:
        return h * d * elt
    s = torch.empty(0, dtype=scale_dtype(dtype)).element_size()
    per = d * s * 2 / GROUP if kind == "k" else (d // math.gcd(GROUP, d)) * s * 2  # scale + zero
    return h * (d * bits / 8 + per)


def rows_bytes(kind: str, bits: int, h: int, d: int, dtype: torch.dtype, cap: int) -> int:
    """Exact host bytes of a layer's `make_rows(kind, bits, ...)` grown to `cap` rows (a
    multiple of GROUP): the buffers `nbytes` reports, less pinned rounding and staging."""
    if cap == 0:
        return 0
    elt = torch.empty(0, dtype=dtype).element_size()
    tail = h * GROUP * d * elt if kind == "k" and bits < 16 else 0  # keys not yet a whole group
    return int(cap * row_bytes(kind, bits, h, d, dtype)) + tail


class PlainRows:
    """Host rows [H, cap, D] at the cache's precision (pinned on CUDA): what goes in comes back."""

    def __init__(self, name: str, h: int, d: int, dtype: torch.dtype, device: torch.device):
        self.name = name  # "hk" / "hv": its tensor in cache files
        self.device, self.cuda = device, device.type == "cuda"
        self.t = host_empty((h, 0, d), dtype, self.cuda)  # [H, cap, D]
        self.stage = None  # pinned [H, <=k, D] where recalled rows are gathered (CUDA)
        self._staged = None  # CUDA event: the copy out of `stage` was issued before it

    def grow(self, cap: int, n: int) -> None:
        new = host_empty((self.t.shape[0], cap, self.t.shape[2]), self.t.dtype, self.cuda)
        new[:, :n] = self.t[:, :n]
        self.t = new

    def write(self, at: int, x: torch.Tensor) -> None:
        """Rows at..at+e from x [H, e, D] (on any device)."""
        copy_rows(self.t[:, at:at + x.shape[1]], x.contiguous())

    def rows(self, n: int) -> torch.Tensor:
        """The first n rows [H, n, D] (host)."""
        return self.t[:, :n]

    def read(self, dst: torch.Tensor, idx: torch.Tensor, n: int) -> None:
        """dst [H, m, D] (device) = rows idx [H, m] (host indices < n)."""
        h, m, d = idx.shape[0], idx.shape[1], self.t.shape[2]
        ix = idx[..., None].expand(-1, -1, d)
        if self.cuda:  # gather on the host into pinned staging, then one async copy
            if self.stage is None or self.stage.shape[1] < m:
                self.stage = host_empty((h, m, d), self.t.dtype, True)
            if self._staged is not None:  # the last recall's copy out of the staging rows
                self._staged.synchronize()
            src = self.stage[:, :m]
            torch.gather(self.t[:, :n], 1, ix, out=src)
        else:
            src = self.t[:, :n].gather(1, ix)
        copy_rows(dst, src)
        if self.cuda:
            self._staged = torch.cuda.Event()
            self._staged.record()

    def nbytes(self) -> int:
        return host_bytes(self.t) + (host_bytes(self.stage) if self.stage is not None else 0)

    def state(self, n: int) -> tuple[dict, dict]:
        return {self.name: self.t[:, :n]}, {"stage": 0 if self.stage is None else self.stage.shape[1]}

    def restore(self, tensors: dict, meta: dict, n: int, cap: int) -> None:
        h, d = self.t.shape[0], self.t.shape[2]
        if tensors[self.name].shape != (h, n, d):
            raise ValueError(f"offload: saved host rows {tuple(tensors[self.name].shape)} do not fit "
                             f"n={n} [Hkv, T, D]")
        self.t = host_empty((h, cap, d), self.t.dtype, self.cuda)
        self.t[:, :n] = tensors[self.name]
        s = int(meta.get("stage", 0))
        self.stage = host_empty((h, s, d), self.t.dtype, True) if s else None
        self._staged = None


class CodedRows:
    """Host rows as KIVI codes, with kivi's own quantizers (policies/kernels/pack.py): keys
    per channel (a group is G consecutive host rows of one channel: keys here are de-rotated
    to position 0, so a channel varies little along them), values per token (a group is G
    channels). Codes packed along channels in int32 [H, cap, D/PK], scales and zeros
    `scale_dtype`. Keys wait in a full-precision tail [H, < G, D] until a whole group is
    there (a one-row per-channel group would be lossless and quantize nothing). A read
    dequantizes only the rows asked for, on the compute device."""

    def __init__(self, kind: str, bits: int, h: int, d: int, dtype: torch.dtype, device: torch.device):
        from policies.kernels.pack import per_word
        self.kind, self.bits, self.dtype, self.device = kind, bits, dtype, device
        self.cuda = device.type == "cuda"
        self.group = GROUP if kind == "k" else math.gcd(GROUP, d)
        if d % per_word(bits):
            from policies import SpecError
            raise SpecError(f"option `{kind}bits` of policy `offload`: head_dim {d} is not a multiple of "
                            f"{per_word(bits)} codes per int32 word at {bits} bits")
        sd = scale_dtype(dtype)
        self.codes = host_empty((h, 0, d // per_word(bits)), torch.int32, self.cuda)  # [H, cap, D/PK]
        width = d if kind == "k" else d // self.group  # keys: a scale per channel; values: per group
        self.scale = host_empty((h, 0, width), sd, self.cuda)  # [H, cap/G, D] keys, [H, cap, D/G] values
        self.zero = host_empty((h, 0, width), sd, self.cuda)
        self.nq = 0  # rows quantized (keys: a multiple of G; values: all of them)
        self.tail = torch.empty(h, 0, d, dtype=dtype)  # keys: [H, G, D] rows nq.. once anything came

    def _srows(self, rows: int) -> int:
        return rows // self.group if self.kind == "k" else rows

    def grow(self, cap: int, n: int) -> None:
        for name in ("codes", "scale", "zero"):
            old = getattr(self, name)
            rows = cap if name == "codes" else self._srows(cap)
            new = host_empty((old.shape[0], rows, old.shape[2]), old.dtype, self.cuda)
            keep = self.nq if name == "codes" else self._srows(self.nq)
            new[:, :keep] = old[:, :keep]
            setattr(self, name, new)
        if self.kind == "k" and cap and self.tail.shape[1] == 0:
            self.tail = torch.empty(self.tail.shape[0], self.group, self.tail.shape[2], dtype=self.dtype)

    def write(self, at: int, x: torch.Tensor) -> None:
        """Rows at..at+e from x [H, e, D] (on any device; quantized there)."""
        from policies.kernels.pack import quantize_keys, quantize_values
        sd = scale_dtype(self.dtype)
        if self.kind == "v":
            codes, sc, zr = quantize_values(x, self.bits, self.group, sd)
            self._put(codes, sc, zr, at, at)
            return
        r = at - self.nq  # rows waiting in the tail
        xs = torch.cat((self.tail[:, :r].to(x.device), x.to(self.dtype)), 1) if r else x.to(self.dtype)
        m = xs.shape[1] - xs.shape[1] % self.group
        if m:
            codes, sc, zr = quantize_keys(xs[:, :m], self.bits, self.group, sd)
            self._put(codes, sc, zr, self.nq, self.nq // self.group)
        rest = xs[:, m:]
        self.tail[:, :rest.shape[1]] = rest.cpu()

    def _put(self, codes, sc, zr, at: int, sat: int) -> None:
        e, se = codes.shape[1], sc.shape[1]
        copy_rows(self.codes[:, at:at + e], codes.contiguous())
        copy_rows(self.scale[:, sat:sat + se], sc.contiguous())
        copy_rows(self.zero[:, sat:sat + se], zr.contiguous())
        self.nq = at + e

    def _decode(self, codes, scale, zero) -> torch.Tensor:
        """Gathered codes [H, m, W] and each row's scale/zero [H, m, D or D/G] -> [H, m, D]."""
        from policies.kernels.pack import unpack
        dev = self.device
        c = unpack(codes.to(dev), self.bits).float()  # [H, m, D]
        s, z = scale.to(dev).float(), zero.to(dev).float()
        if self.kind == "v":  # a scale per G channels of the row
            s, z = s.repeat_interleave(self.group, -1), z.repeat_interleave(self.group, -1)
        return (c * s + z).to(self.dtype)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx [H, m] (< nq + tail, host) -> [H, m, D] on the compute device."""
        w = self.codes.shape[2]
        q = idx.clamp(max=max(self.nq - 1, 0))
        sidx = q // self.group if self.kind == "k" else q
        out = self._decode(self.codes.gather(1, q[..., None].expand(-1, -1, w)),
                           self.scale.gather(1, sidx[..., None].expand(-1, -1, self.scale.shape[2])),
                           self.zero.gather(1, sidx[..., None].expand(-1, -1, self.zero.shape[2])))
        if self.kind == "k":
            t = idx - self.nq
            late = t >= 0
            if late.any():
                d = self.tail.shape[2]
                fp = self.tail.gather(1, t.clamp(0, self.group - 1)[..., None].expand(-1, -1, d)).to(out.device)
                out = torch.where(late.to(out.device)[..., None], fp, out)
        return out

    def rows(self, n: int) -> torch.Tensor:
        """The first n rows [H, n, D], dequantized (on the compute device)."""
        h = self.codes.shape[0]
        return self._gather(torch.arange(n).expand(h, -1))

    def read(self, dst: torch.Tensor, idx: torch.Tensor, n: int) -> None:
        dst.copy_(self._gather(idx))

    def nbytes(self) -> int:
        return sum(host_bytes(t) for t in (self.codes, self.scale, self.zero)) + self.tail.nbytes

    def state(self, n: int) -> tuple[dict, dict]:
        k, s = self.kind, self._srows(self.nq)
        t = {f"{k}codes": self.codes[:, :self.nq], f"{k}scale": self.scale[:, :s], f"{k}zero": self.zero[:, :s]}
        if k == "k":
            t["ktail"] = self.tail[:, :n - self.nq]
        return t, {}

    def restore(self, tensors: dict, meta: dict, n: int, cap: int) -> None:
        k = self.kind
        if f"{k}codes" not in tensors:
            raise ValueError(f"offload: the saved host rows are not coded at {k}bits={self.bits}")
        codes = tensors[f"{k}codes"]
        if codes.shape[2] != self.codes.shape[2]:
            raise ValueError(f"offload: saved {k} codes of {codes.shape[2]} words a row; {k}bits={self.bits} "
                             f"takes {self.codes.shape[2]}")
        self.nq = 0
        self.grow(cap, 0)
        self.nq = codes.shape[1]
        s = self._srows(self.nq)
        self.codes[:, :self.nq] = codes
        self.scale[:, :s], self.zero[:, :s] = tensors[f"{k}scale"], tensors[f"{k}zero"]
        if k == "k":
            self.tail[:, :n - self.nq] = tensors["ktail"]


def make_rows(kind: str, bits: int, h: int, d: int, dtype: torch.dtype, device: torch.device):
    """A spill's host rows of keys (kind "k") or values ("v"): coded at 2, 4 or 8 bits, else
    (16) at the cache's precision."""
    if bits >= 16:
        return PlainRows("h" + kind, h, d, dtype, device)
    return CodedRows(kind, bits, h, d, dtype, device)
