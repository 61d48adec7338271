"""KIVI decode attention on the CPU: the C kernel in kivi_cpu.c, built on first use.

The torch path (`kivi_attn.decode_torch`) dequantizes and rotates every quantized key in
separate passes over memory each step; this kernel does it in registers, one pass over the
codes, and splits the tokens over torch's threads. It is built once per machine with the
system C compiler (`cc`, AVX2/FMA where torch reports them, OpenMP where the compiler has
it) into the user cache dir and loaded with ctypes; with no compiler `load()` returns
None and the store keeps the torch path (`kivi_attn.decode_torch`, the reference it is
tested against). fp32 caches only: a half-precision CPU cache takes the torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kivi_cpu.c")
SPLIT = 512  # tokens per split at least (a multiple of every group size it takes)
_LIB: list = []  # [ctypes.CDLL or None] once tried
_LOCK = threading.Lock()


def _flags() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    simd = ["-mavx2", "-mfma"] if cap.startswith("AVX") else []
    return ["-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", *simd]


def _cache_dir() -> Path:
    from platformdirs import user_cache_dir
    return Path(os.environ.get("VRAMCHAT_KERNEL_CACHE") or Path(user_cache_dir("vramchat")) / "kernels")


def _compile(cc: str, out: Path) -> bool:
    """Build the library at `out` (atomically: another process may build it at once)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for omp in (["-fopenmp"], []):  # NOTE: torch's libgomp is already loaded; the library shares it
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *_flags(), *omp, str(SOURCE), "-o", tmp, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError):
            done = None
        if done is not None and done.returncode == 0:
            os.replace(tmp, out)
            return True
        os.unlink(tmp)
    return False


def load():
    """The kernel library, built if needed; None where it cannot be built here."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        lib = None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc:
            key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *_flags()]).encode()).hexdigest()[:16]
            path = _cache_dir() / f"kivi_cpu-{key}.so"
            if path.exists() or _compile(cc, path):
                lib = ctypes.CDLL(str(path))
                i, lo, p = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
                lib.kivi_decode.argtypes = ([i] * 10 + [p, p, lo, p, p, lo, p, lo, p, lo, p, p, lo, p, lo]
                                            + [p] * 4 + [ctypes.c_float, i, i, p])
                lib.kivi_decode.restype = i
        if lib is None:
            warnings.warn("kivi: no C compiler built the CPU decode kernel; decoding through torch (slower)",
                          stacklevel=2)
        _LIB.append(lib)
        return lib


_TABLES: dict = {}


def tables(inv_freq: torch.Tensor, group: int, shift: int, groups: int):
    """(cos, sin of i·f for i < G) [G, HALF] and (cos, sin of (g·G + shift)·f) [>= groups, HALF],
    float32, angles in float64. Cached per (frequencies, G, shift); the second pair grows."""
    key = (inv_freq.data_ptr(), group, shift)
    got = _TABLES.get(key)
    if got is None or got[0] is not inv_freq or got[3].shape[0] < groups:
        if len(_TABLES) > 16:
            _TABLES.clear()
        f = inv_freq.double().cpu()
        n = max(groups, 2 * (got[3].shape[0] if got else 0), 64)
        inner = torch.arange(group, dtype=torch.float64)[:, None] * f
        base = (torch.arange(n, dtype=torch.float64)[:, None] * group + shift) * f
        got = (inv_freq, inner.cos().float(), inner.sin().float(), base.cos().float(), base.sin().float())
        _TABLES[key] = got
    return got[1:]


def supported(q: torch.Tensor, view) -> bool:
    """Whether the kernel takes this decode step (else the torch path)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and view.kr.dtype == torch.float32
            and view.ks.dtype == torch.float32 and q.shape[2] <= 256 and q.shape[0] // view.kr.shape[0] <= 16)


def _rows(t: torch.Tensor) -> bool:
    return t.shape[1] == 0 or (t.stride(2) == 1 and t.stride(1) == t.shape[2])


def decode(lib, q: torch.Tensor, view, scale: float, threads: int | None = None,
           split: int | None = None) -> torch.Tensor:
    """q [Hq, 1, D] over the whole view (the new token already in the residual) -> [Hq, 1, D]."""
    hq, _, d = q.shape
    h, g = view.kr.shape[0], view.group
    nq, nv = view.kc.shape[1], view.vc.shape[1]
    length = nq + view.kr.shape[1]
    threads = threads or torch.get_num_threads()
    parts = [x if _rows(x) else x.contiguous() for x in (view.kc, view.ks, view.kz, view.kr, view.vc,
                                                          view.vs, view.vz, view.vr)]
    kc, ks, kz, kr, vc, vs, vz, vr = parts
    half = view.inv_freq.numel()
    cin, sin, cb, sb = tables(view.inv_freq, g, view.shift, max(1, nq // g))
    # splits: (heads x splits) covers every thread twice, none shorter than SPLIT tokens
    per = split or max(SPLIT, math.ceil(length / math.ceil(2 * threads / h)))
    per = -(-per // g) * g
    qc = q.reshape(hq, d).contiguous()
    out = torch.empty(hq, d)
    rc = lib.kivi_decode(h, hq // h, d, half, view.kbits, view.vbits, g, nq, nv, length,
                         qc.data_ptr(), kc.data_ptr(), kc.stride(0), ks.data_ptr(), kz.data_ptr(), ks.stride(0),
                         kr.data_ptr(), kr.stride(0), vc.data_ptr(), vc.stride(0), vs.data_ptr(), vz.data_ptr(),
                         vs.stride(0), vr.data_ptr(), vr.stride(0), cin.data_ptr(), sin.data_ptr(), cb.data_ptr(),
                         sb.data_ptr(), float(scale), per, threads, out.data_ptr())
    if rc:
        raise RuntimeError(f"kivi CPU kernel refused the step (code {rc}): head_dim {d}, group {g}, split {per}")
    return out.reshape(hq, 1, d)
