"""`kivi`: keys and values in 2, 4 or 8 bits with a full-precision residual (arXiv 2402.02750).

Layout (per layer, batch 1). Keys are quantized per channel, a group being G consecutive
tokens of one channel; values per token, a group being G consecutive channels. Both use
asymmetric min/max with an epsilon, codes packed 32/bits per int32 along channels, and
scales/zeros in the cache dtype (fp16 for an fp16 model: 2-bit, G=32 costs 2 + 2*16/32 =
3 bits per element). Keys and values take their bits separately (`kbits`, `vbits`; `bits`
sets both): keys carry most of the error (BENCHMARKS.md, KIVI). The newest tokens stay in
full precision:

- keys fill-then-flush: when the key residual holds >= R tokens, its oldest
  r - r % G tokens are quantized, whole G-aligned groups only (NOTE: never one token at a
  time; a one-token per-channel group is lossless and silently quantizes nothing);
- values slide: the oldest value is quantized as soon as more than R are in full precision.

A multi-token (prefill) chunk stays in full precision until the next call that attends,
keeps or truncates: so the selector in front of this store scores and evicts the chunk at
full precision, and only what it keeps is quantized, once. Decode tokens are placed at once.

Positions and eviction. The layer owns positions and may re-rotate kept keys by `delta`
in `compact` (compacted positions, see policies/base.py). Quantized keys are stored in a
*store frame*: stored key i is R(-(i + shift)) times its post-RoPE key, i.e. the pre-RoPE
key up to one fixed rotation per channel pair, which varies little along the token axis
and so quantizes per channel as well as pre-RoPE keys do (post-RoPE keys spin with
position and widen every group's range). Attention rotates them back by R(i + shift) at
read time (the kernel does it in registers). When eviction moves every kept token by
the same frame offset (base' + j = base + i + delta: always so under compacted positions)
`compact` only changes `shift`: kept quantized keys are never rotated. What it cannot avoid
is regrouping: removing tokens from inside a key group changes which G tokens share a
scale, so kept keys are re-quantized from their dequantized values. Groups whose members
are unchanged come back bit-identical (codes were chosen on the stored grid) and values
(per-token groups) always do; tests/test_kivi.py bounds the error that repeated evictions
add. The full-precision residual keeps post-RoPE keys exactly as `FullStore` does, so
with R >= the context the store equals `full`: that is its lossless setting.
"""
from __future__ import annotations

import torch

from . import capacity, rope
from .base import ModelInfo
from .kernels import kivi_attn, kivi_cpu
from .kernels.pack import dequantize_keys, dequantize_values, per_word, quantize_keys, quantize_values
from .registry import Opt, SpecError, register
from .slots import Store


def _grow(t: torch.Tensor, rows: int, keep: int, block: int, limit: int | None = None) -> torch.Tensor:
    """t [H, cap, X] with capacity >= rows on dim 1, first `keep` rows kept. Grows as every
    buffer does (`capacity.grown`), never past `limit` (>= rows)."""
    if rows <= t.shape[1]:
        return t
    cap = capacity.grown(t.shape[1], rows, block)
    cap = cap if limit is None else max(rows, min(cap, limit))
    new = t.new_empty(t.shape[0], cap, t.shape[2])
    new[:, :keep] = t[:, :keep]
    return new


DEFAULT_BITS = (8, 2)  # (keys, values) when neither `bits` nor `kbits`/`vbits` is given: keys carry
# the error (BENCHMARKS.md, K and V bits). The smallest split within one trial of `full` at 4K and of
# `locret` alone at 4K and 16K in `locret+kivi`: K8V2 10/10 alone, 10/10 and 9/10 stacked (K4V2
# stacked 6/10 at 16K, K4V4 4/10: under eviction 4-bit keys misread a kept needle)


def bits_of(opts: dict) -> tuple[int, int]:
    """(key bits, value bits) of `kivi` options: kbits/vbits, else `bits` for both, else the default."""
    both = opts.get("bits")
    return opts.get("kbits") or both or DEFAULT_BITS[0], opts.get("vbits") or both or DEFAULT_BITS[1]


class KiviStore(Store):
    """Quantized keys/values (2, 4 or 8 bits each) plus a full-precision residual window."""

    BLOCK = 256

    def __init__(self, info: ModelInfo, bits: int | None = None, group: int = 32, residual: int = 128,
                 fit: str = "mse", kbits: int | None = None, vbits: int | None = None):
        h, d = info.n_kv_heads, info.head_dim
        given = {"kbits": kbits, "vbits": vbits}
        kbits, vbits = bits_of({"bits": bits, **given})
        if d % group:
            raise SpecError(f"option `group` of policy `kivi`: {group} must divide head_dim {d}")
        for name, b in (("kbits", kbits), ("vbits", vbits)):
            name = name if given[name] or not bits else "bits"
            if d % per_word(b):
                raise SpecError(f"option `{name}` of policy `kivi`: head_dim {d} is not a multiple of "
                                f"{per_word(b)} codes per int32 word at {b} bits")
        _check({"bits": bits, "group": group, "residual": residual})
        super().__init__(info)
        self.info, self.group, self.residual, self.fit = info, group, residual, fit
        self.kbits, self.vbits = kbits, vbits
        self.lossless = info.window > 0 and residual >= info.window
        self.length = 0
        self.nq = 0  # quantized keys, a multiple of G
        self.nv = 0  # quantized values
        self.rk = 0  # residual keys (tokens nq..nq+rk), pending excluded
        self.rv = 0  # residual values (tokens nv..), rows v0..v0+rv of `vr`
        self.v0 = 0
        self.shift = 0  # NOTE: stored key i = R(-(i + shift)) · its post-RoPE key
        self.pending = None  # (k, v) [H, T, D] a prefill chunk not yet laid out
        self._staged = 0
        self.kernel = info.kernels.on("kivi", info.device)  # decode through the Triton kernel
        # else on a CPU through the C kernel (built here, once per machine), unless switched off
        self.cpu = None
        if not self.kernel and info.device.type == "cpu" and info.kernels.kivi != "off":
            self.cpu = kivi_cpu.load()
        dev, dt = info.device, info.dtype
        self.kc = torch.empty(h, 0, d // per_word(kbits), dtype=torch.int32, device=dev)  # [H, capQ, D/PKk]
        self.ks = torch.empty(h, 0, d, dtype=dt, device=dev)  # [H, capQ/G, D]
        self.kz = torch.empty_like(self.ks)
        self.vc = torch.empty(h, 0, d // per_word(vbits), dtype=torch.int32, device=dev)  # [H, capV, D/PKv]
        self.vs = torch.empty(h, 0, d // group, dtype=dt, device=dev)  # [H, capV, D/G]
        self.vz = torch.empty_like(self.vs)
        self.kr = torch.empty(h, 0, d, dtype=dt, device=dev)  # [H, <=R, D] post-RoPE
        self.vr = torch.empty(h, 0, d, dtype=dt, device=dev)  # [H, <=R+G, D]

    # ---- views -------------------------------------------------------------------------
    def _view(self, k_extra: int = 0, v_extra: int = 0) -> kivi_attn.QuantView:
        g = self.group
        return kivi_attn.QuantView(
            self.kc[:, : self.nq], self.ks[:, : self.nq // g], self.kz[:, : self.nq // g],
            self.kr[:, : self.rk + k_extra], self.vc[:, : self.nv], self.vs[:, : self.nv],
            self.vz[:, : self.nv], self.vr[:, self.v0: self.v0 + self.rv + v_extra],
            self.shift, self.kbits, self.vbits, g, self.info.inv_freq)

    def _frame(self) -> torch.Tensor:
        """Stored (dequantized, store-frame) quantized keys, float32 [H, nq, D]."""
        g = self.group
        return dequantize_keys(self.kc[:, : self.nq], self.ks[:, : self.nq // g],
                               self.kz[:, : self.nq // g], self.kbits, g)

    def _values32(self) -> torch.Tensor:
        """Every value, float32 [H, L, D]."""
        vq = dequantize_values(self.vc[:, : self.nv], self.vs[:, : self.nv], self.vz[:, : self.nv],
                               self.vbits, self.group)
        parts = [vq, self.vr[:, self.v0: self.v0 + self.rv].float()]
        if self.pending is not None:
            parts.append(self.pending[1].float())
        return torch.cat(parts, 1)

    def dense(self, idx: torch.Tensor | None = None):
        """Full-precision post-RoPE (k, v) [H, T, D]: all tokens, or per-head idx [H, n]."""
        k, v = kivi_attn.dense(self._view(), self.info.dtype)
        if self.pending is not None:
            k, v = torch.cat((k, self.pending[0]), 1), torch.cat((v, self.pending[1]), 1)
        if idx is None:
            return k, v
        ix = idx[..., None].expand(-1, -1, k.shape[2])
        return k.gather(1, ix), v.gather(1, ix)

    # ---- placing tokens ---------------------------------------------------------------
    def _place_keys(self, kp: torch.Tensor, frame: torch.Tensor | None = None) -> None:
        """Lay out the unquantized key tail kp [H, r, D] (post-RoPE, tokens nq..) by the
        flush rule; frame [H, r, D] float32, if given, holds them already in the store frame."""
        g, res, dt = self.group, self.residual, self.info.dtype
        r = kp.shape[1]
        m = r - r % g if r >= res else 0  # whole G-aligned groups only
        if m:
            if frame is not None:
                kf = frame[:, :m]
            else:
                pos = torch.arange(self.nq, self.nq + m, device=kp.device) + self.shift
                kf = rope.rotate(kp[:, :m].float(), -pos, self.info.inv_freq)
            codes, sc, zr = quantize_keys(kf, self.kbits, g, dt, self.fit)
            end = self.nq + m
            self.kc = _grow(self.kc, end, self.nq, self.BLOCK)
            rows = -(-self.kc.shape[1] // g)  # one scale row per G rows of codes capacity
            self.ks = _grow(self.ks, rows, self.nq // g, 1, limit=rows)
            self.kz = _grow(self.kz, rows, self.nq // g, 1, limit=rows)
            self.kc[:, self.nq: end] = codes
            self.ks[:, self.nq // g: end // g] = sc
            self.kz[:, self.nq // g: end // g] = zr
            self.nq = end
        rest = kp[:, m:].to(dt).clone()  # [H, < R, D]
        self.kr = _grow(self.kr, rest.shape[1] + 1, 0, g, limit=res)
        self.kr[:, : rest.shape[1]] = rest
        self.rk = rest.shape[1]

    def _place_values(self, vp: torch.Tensor, slide: bool = False) -> None:
        """Lay out the unquantized values vp [H, s, D] (tokens nv..): all but the newest R
        are quantized. slide: vp is the residual itself, so the window just moves."""
        g, res, dt = self.group, self.residual, self.info.dtype
        s = vp.shape[1]
        m = max(0, s - res)
        if m:
            codes, sc, zr = quantize_values(vp[:, :m], self.vbits, g, dt, self.fit)
            end = self.nv + m
            self.vc = _grow(self.vc, end, self.nv, self.BLOCK)
            self.vs = _grow(self.vs, end, self.nv, self.BLOCK, limit=self.vc.shape[1])
            self.vz = _grow(self.vz, end, self.nv, self.BLOCK, limit=self.vc.shape[1])
            self.vc[:, self.nv: end] = codes
            self.vs[:, self.nv: end] = sc
            self.vz[:, self.nv: end] = zr
            self.nv = end
        if slide:
            self.v0 += m  # no copy: the window slides inside its buffer
        else:
            rest = vp[:, m:].to(dt).clone()  # [H, <= R, D]
            self.vr = _grow(self.vr, rest.shape[1] + 1, 0, g, limit=res + g)
            self.vr[:, : rest.shape[1]] = rest
            self.v0 = 0
        self.rv = s - m

    def _settle(self) -> None:
        """Lay out a pending prefill chunk, or flush a residual that reached its limit."""
        if self.pending is not None:
            pk, pv = self.pending
            self.pending = None
            self._place_keys(torch.cat((self.kr[:, : self.rk], pk), 1))
            self._place_values(torch.cat((self.vr[:, self.v0: self.v0 + self.rv], pv), 1))
            return
        if self.rk >= self.residual:
            self._place_keys(self.kr[:, : self.rk])
        if self.rv > self.residual:
            self._place_values(self.vr[:, self.v0: self.v0 + self.rv], slide=True)

    def _stage(self, k, v) -> None:
        """Write one decode token [H, 1, D] after the residuals, without committing it."""
        g, res = self.group, self.residual
        self.kr = _grow(self.kr, self.rk + 1, self.rk, g, limit=res)
        if self.v0 + self.rv + 1 > self.vr.shape[1]:
            if self.v0:  # compact the sliding window to the front (once per G tokens)
                self.vr[:, : self.rv] = self.vr[:, self.v0: self.v0 + self.rv].clone()
                self.v0 = 0
            self.vr = _grow(self.vr, self.rv + 1, self.rv, g, limit=res + g)
        self.kr[:, self.rk] = k[:, 0]
        self.vr[:, self.v0 + self.rv] = v[:, 0]
        self._staged = 1

    # ---- the store interface ----------------------------------------------------------
    def attend(self, q, k, v, scale, extra=None):
        """q [Hq, Tq, D] over stored tokens + `extra` (k, v) + new k/v [H, Tq, D]."""
        self._settle()
        if q.shape[1] == 1 and extra is None:
            self._stage(k, v)
            view = self._view(1, 1)
            if self.kernel:
                return kivi_attn.decode(q, view, scale)
            if self.cpu is not None and kivi_cpu.supported(q, view):
                return kivi_cpu.decode(self.cpu, q, view, scale)
            return kivi_attn.decode_torch(q, view, scale)
        return kivi_attn.reference(q, self._view(), scale, k, v, extra)

    def append(self, k, v) -> None:
        """Commit the new tokens k/v [H, T, D] that attend() just saw."""
        n = k.shape[1]
        if n == 1:
            if self.pending is not None:
                self._settle()
            if not self._staged:
                self._stage(k, v)
            self.rk += 1
            self.rv += 1
            self._staged = 0
            self.length += 1
            self._settle()
            return
        self._staged = 0
        if self.pending is not None:
            self._settle()
        self.pending = (k.to(self.info.dtype).clone(), v.to(self.info.dtype).clone())
        self.length += n

    def _reset(self) -> None:
        self.length = self.nq = self.nv = self.rk = self.rv = self.v0 = 0
        self.pending = None

    def compact(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Keep per-head sorted indices idx [H, b], moving keys by delta [H, b] positions."""
        b = idx.shape[1]
        j = torch.arange(b, device=idx.device)
        off = idx + delta - j  # [H, b]: constant under compacted positions
        lo, hi = torch.stack((off.min(), off.max())).tolist() if b else (0, 0)
        k, _ = self.dense(idx)
        post = rope.rotate(k, delta, self.info.inv_freq)  # [H, b, D], as FullStore does
        ix = idx[..., None].expand(-1, -1, k.shape[2])
        vals = self._values32().gather(1, ix)
        if lo == hi:  # every kept token moves by one offset: the frame only shifts
            shift = self.shift + int(lo)
            nq = self.nq
            fq = self._frame().gather(1, idx.clamp(max=max(nq - 1, 0))[..., None].expand_as(ix)) \
                if nq else None
        else:  # arbitrary moves: rotate everything into a fresh frame
            shift, nq, fq = self.shift, 0, None
        frame = rope.rotate(post.float(), -(j + shift), self.info.inv_freq)
        if fq is not None:
            frame = torch.where((idx < nq)[..., None], fq, frame)
        self._reset()
        self.shift = shift
        self._place_keys(post, frame)
        self._place_values(vals)
        self.length = b

    def load(self, k, v) -> None:
        """Replace the contents with dense post-RoPE k/v [H, T, D] (live conversion, lossy)."""
        self._reset()
        self.shift = 0
        self._place_keys(k)
        self._place_values(v)
        self.length = k.shape[1]

    def truncate(self, n: int) -> None:
        if n >= self.length:
            return
        idx = torch.arange(n, device=self.info.device).expand(self.info.n_kv_heads, -1)
        self.compact(idx, torch.zeros_like(idx))

    def quantized(self) -> int:
        # NOTE: keys quantize before nq, values before nv
        return min(self.length, max(self.nq, self.nv))

    def token_bytes(self) -> float:
        """Bytes per quantized token (this layer, K + V): codes, key scales/zeros shared by G
        tokens of a channel, value scales/zeros per G channels of a token."""
        h, d, g = self.info.n_kv_heads, self.info.head_dim, self.group
        elt = self.kr.element_size()
        return h * (d * (self.kbits + self.vbits) / 8 + 2 * d * elt / g + 2 * (d // g) * elt)

    def nbytes(self) -> dict[str, int]:
        """Exact bytes held, by kind (allocated buffers, as FullStore reports)."""
        res = self.kr.nbytes + self.vr.nbytes
        if self.pending is not None:
            res += self.pending[0].nbytes + self.pending[1].nbytes
        return {"codes": self.kc.nbytes + self.vc.nbytes, "scales": self.ks.nbytes + self.vs.nbytes,
                "zeros": self.kz.nbytes + self.vz.nbytes, "residual": res}

    _BUFS = ("kc", "ks", "kz", "vc", "vs", "vz", "kr", "vr")
    _COUNTS = ("length", "nq", "nv", "rk", "rv", "v0", "shift")

    def state(self) -> tuple[dict, dict]:
        """The used rows of every buffer; the pending chunk as it is (never laid out here:
        that would change what the live store does next)."""
        g, nq, nv, v0 = self.group, self.nq, self.nv, self.v0
        t = {"kc": self.kc[:, :nq], "ks": self.ks[:, :nq // g], "kz": self.kz[:, :nq // g],
             "vc": self.vc[:, :nv], "vs": self.vs[:, :nv], "vz": self.vz[:, :nv],
             "kr": self.kr[:, :self.rk], "vr": self.vr[:, v0:v0 + self.rv]}
        if self.pending is not None:
            t["pk"], t["pv"] = self.pending
        meta = {n: getattr(self, n) for n in self._COUNTS}
        meta["cap"] = {n: getattr(self, n).shape[1] for n in self._BUFS}
        return t, meta

    def restore(self, tensors: dict, meta: dict) -> None:
        """Buffers of the saved capacities, rows where they were (the value window at v0)."""
        for n in self._COUNTS:
            setattr(self, n, int(meta[n]))
        g, v0 = self.group, self.v0
        at = {"kc": 0, "ks": 0, "kz": 0, "vc": 0, "vs": 0, "vz": 0, "kr": 0, "vr": v0}
        for n in self._BUFS:
            old, rows = getattr(self, n), tensors[n]
            buf = old.new_zeros(old.shape[0], int(meta["cap"][n]), old.shape[2])
            buf[:, at[n]:at[n] + rows.shape[1]] = rows
            setattr(self, n, buf)
        used = {"kc": self.nq, "ks": self.nq // g, "vc": self.nv, "kr": self.rk, "vr": self.rv}
        bad = [n for n, want in used.items() if tensors[n].shape[1] != want]
        if bad:
            raise ValueError(f"kivi: saved {bad[0]} holds {tensors[bad[0]].shape[1]} rows; "
                             f"its counts say {used[bad[0]]}")
        dev = self.info.device
        self.pending = (tensors["pk"].to(dev), tensors["pv"].to(dev)) if "pk" in tensors else None
        self._staged = 0


def _check(opts) -> None:
    g, r = opts["group"], opts["residual"]
    if g > r:
        raise SpecError(f"option `group` of policy `kivi`: {g} is larger than residual={r}")
    if r % g:
        raise SpecError(f"option `residual` of policy `kivi`: {r} is not a multiple of group={g}")


@register("kivi", "store", {
    "bits": Opt(int, None, f"bits per code of keys and values (default K{DEFAULT_BITS[0]}V{DEFAULT_BITS[1]})",
                choices=(2, 4, 8)),
    "kbits": Opt(int, None, "bits per key code (overrides `bits` for keys)", choices=(2, 4, 8)),
    "vbits": Opt(int, None, "bits per value code (overrides `bits` for values)", choices=(2, 4, 8)),
    "group": Opt(int, 32, "tokens per key group / channels per value group", min=1),
    "residual": Opt(int, 128, "newest tokens kept in full precision (a multiple of group)", min=1),
    "fit": Opt(str, "mse", "each group's range: mse (the least squared error of six, default) or minmax "
                           "(the paper's)", choices=("mse", "minmax")),
}, "2/4/8-bit keys (per channel) and values (per token) with a full-precision residual (KIVI)",
    check=_check)
def build(policy, info, layer):
    return KiviStore(info, **policy.opts)
