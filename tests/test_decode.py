"""Fixed-shape decode (StaticStep windows, what the CUDA graph replays) against eager decode.

On the CPU the fixed-shape step runs uncaptured; CUDA captures the same step
(`tests/test_cuda.py`). The cache must keep exactly the same tokens at the same indices,
with values and logits equal to float tolerance.
"""
from __future__ import annotations

import functools

import pytest
import torch

import app.runtime.decode as decode
from app.runtime.decode import Decoder
from app.runtime.engine import Runtime
from policies import static
from policies.kernels.switch import Kernels
from policies.attention import _splits, attend, attend_window
from policies.kernels import triton_ok
from tiny import random_heads, tiny_pair


def _rt(spec, seed=0):
    m, t = tiny_pair(seed)
    return Runtime.from_model(m, t, policy=spec, model_id="tiny", chunk_size=16)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    rt = _rt("full")
    info = rt.adapter.info
    return random_heads(info, tmp_path_factory.mktemp("heads") / "heads.safetensors", seed=3)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (n,), generator=g).tolist()


def _state(cache):
    out = {"next": cache.next_position}
    for i, l in enumerate(cache.layers):
        out[i] = (l.length, l.seen, l.base, l.store.k[:, :l.length].clone(), l.store.v[:, :l.length].clone(),
                  None if l.pos is None else l.pos.clone(), None if l.scores is None else l.scores.clone())
    return out


def _assert_same_state(a, b):
    assert a["next"] == b["next"]
    for i in a:
        if i == "next":
            continue
        la, lb = a[i], b[i]
        assert la[:3] == lb[:3], f"layer {i}: length/seen/base"
        for x, y in zip(la[3:], lb[3:]):
            if x is None or y is None:
                assert x is None and y is None
            else:
                exact = not x.is_floating_point()  # conversation indices; K/V and scores: the
                # span attention reads is longer (masked), so BLAS may sum in another order
                torch.testing.assert_close(x, y, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-5,
                                           msg=lambda m: f"layer {i}: {m}")


ON_CPU = pytest.mark.skipif(not triton_ok("cpu"), reason="the window kernel on a CPU needs triton and "
                                                             "TRITON_INTERPRET=1")


@pytest.mark.parametrize("spec,kernel", [
    ("full", False), ("locret:budget=48,stabilizers=8,local=4", False), ("streaming:sinks=4,window=40", False),
    ("anchor:budget=48,local=8", False), pytest.param("full", True, marks=ON_CPU, id="full-kernel"),
    pytest.param("locret:budget=48,stabilizers=8,local=4", True, marks=ON_CPU, id="locret-kernel")])
def test_fixed_shape_windows_equal_eager(spec, kernel, heads, monkeypatch):
    """Teacher-forced decode across several windows (room 5, 13 steps) after a prefill that
    evicted: same logits, and the cache keeps exactly what eager decode keeps. With
    `kernel`, the window attends through the Triton kernel (what CUDA runs)."""
    spec = spec.replace("locret:", f"locret:heads={heads},")
    ref, rt = _rt(spec), _rt(spec)
    rt.adapter.info.kernels = Kernels(window="on" if kernel else "off")
    ids = _ids(120)
    la, lb = ref.prefill(ids), rt.prefill(ids)
    with torch.inference_mode():
        for layer in rt.cache.layers:  # spare capacity as a GPU allocator may hand it back
            layer.store.reserve(layer.length + 64)
            layer.store.k[:, layer.length:] = float("nan")
            layer.store.v[:, layer.length:] = float("nan")
    toks = _ids(13, seed=1)
    with Decoder(ref.adapter, ref.cache, fixed=False) as eager, Decoder(rt.adapter, rt.cache, fixed=True,
                                                                         room=5) as fixed:
        assert eager.mode == "eager" and fixed.mode == "fixed shapes"
        for t in toks:
            la, lb = eager.step(t), fixed.step(torch.tensor(t))
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    _assert_same_state(_state(ref.cache), _state(rt.cache))
    # the next turn's prefill (which evicts the decoded tokens like any other) agrees too
    more = _ids(40, seed=2)
    torch.testing.assert_close(rt.prefill(more), ref.prefill(more), rtol=1e-5, atol=1e-5)
    _assert_same_state(_state(ref.cache), _state(rt.cache))


def test_close_commits_only_steps_taken():
    rt = _rt("full")
    rt.prefill(_ids(30))
    dec = Decoder(rt.adapter, rt.cache, fixed=True, room=8)
    for t in _ids(3, seed=4):
        dec.step(t)
    assert rt.cache.seen == 30 and rt.cache.next_position == 30  # nothing committed mid-window
    dec.close()
    dec.close()
    assert rt.cache.seen == 33 and rt.cache.next_position == 33 and rt.cache.length == 33


@pytest.mark.parametrize("spec,why", [("kivi:group=16", "KiviStore"), ("ffnskip", "ffnskip"),
                                      ("h2o", "H2OSelector"), ("offload", "HostStore")])
def test_caches_that_cannot_fix_shapes_say_why(spec, why):
    rt = _rt(spec)
    assert why in static.reason(rt.cache)
    with pytest.raises(ValueError, match="cannot decode with fixed shapes"):
        Decoder(rt.adapter, rt.cache, fixed=True)
    assert Decoder(rt.adapter, rt.cache).mode == "eager"  # the CPU default


def test_runtime_answers_the_same_with_fixed_shapes(monkeypatch, heads):
    """Runtime.ask through fixed-shape windows (room 4: the answer crosses several) gives the
    eager answer, and the second turn (prefill after a decoded answer) still agrees."""
    spec = f"locret:heads={heads},budget=48,stabilizers=8,local=4"
    ref, rt = _rt(spec), _rt(spec)
    ra = ref.ask("tell me something long", max_new_tokens=11)
    monkeypatch.setattr(decode, "Decoder", functools.partial(Decoder, fixed=True, room=4))
    rb = rt.ask("tell me something long", max_new_tokens=11)
    assert rb.decode_mode == "fixed shapes" and ra.decode_mode == "eager"
    assert rb.answer == ra.answer and rb.new_tokens == ra.new_tokens
    assert rt.cache.seen == ref.cache.seen
    assert rt.ask("and again?", max_new_tokens=6).answer == ref.ask("and again?", max_new_tokens=6).answer


@pytest.mark.parametrize("n,n_valid,splits", [(40, 1, 1), (40, 33, 1), (1024, 700, 4), (4096, 4000, 16)])
def test_attend_window_equals_attend_over_the_valid_prefix(n, n_valid, splits):
    g = torch.Generator().manual_seed(n_valid)
    q = torch.randn(6, 1, 16, generator=g)
    k, v = torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g)
    valid = torch.arange(n) < n_valid
    assert _splits(n) == splits
    out = attend_window(q, k, v, 0.25, valid)
    torch.testing.assert_close(out, attend(q, k[:, :n_valid], v[:, :n_valid], 0.25), rtol=1e-5, atol=1e-5)
