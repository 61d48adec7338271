"""The CUDA paths against the CPU: pinned host buffers and the copy stream (offload), the
Triton kernel inside `kivi`, device-side selection and recall. Every policy runs the same
tiny model on the GPU and on the CPU (fp32 on both, TF32 off) and must give the same
prefill logits and the same greedy answer. Skipped cleanly where no GPU is present (CI).
"""
from __future__ import annotations

import pytest
import torch

from app.runtime.engine import Runtime
from test_policies_conformance import _ids
from tiny import tiny_pair, tiny_policy_files

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CHUNK = 32
SPECS = [
    "full", "kivi:bits=4,group=16,residual=32", "kivi:bits=2,group=16,residual=32",
    "locret:budget=64,stabilizers=8,local=0,heads={heads}",
    "locret:budget=64,stabilizers=8,local=0,heads={heads}+kivi:bits=2,group=16,residual=32",
    "locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:recall=24,channels_file={ch}",
    "offload", "doublesparse:keep=0.25,channels_file={ch}",
    "streaming:sinks=4,window=60", "h2o:budget=64,recent=16,local=0", "snapkv:budget=64,window=8,local=0",
    "lighttransfer:sinks=4,window=60", "anchor:budget=64,local=16,sinks=4",
    "ffnskip:cold=1:1,threshold=0.5,warmup=1",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("cuda"))


def _rt(spec, device):
    m, t = tiny_pair(0)
    return Runtime.from_model(m.to(device), t, policy=spec, model_id="tiny", chunk_size=CHUNK)


def _noise(spec, logits, seed):
    """How far the CPU's own prefill logits move when every weight is scaled by 1 + 2e-7 N(0, 1)."""
    m, t = tiny_pair(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + 2e-7 * torch.randn(p.shape, generator=g))
    rt = Runtime.from_model(m, t, policy=spec, model_id="tiny", chunk_size=CHUNK)
    return (rt.prefill(_ids()) - logits).abs().max().item()


@pytest.mark.parametrize("spec", SPECS)
def test_gpu_equals_cpu(spec, files):
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = spec.format(**files)
    cpu, gpu = _rt(spec, "cpu"), _rt(spec, "cuda")
    assert gpu.device.type == "cuda"
    a, b = cpu.prefill(_ids()), gpu.prefill(_ids())
    assert b.device.type == "cuda"
    if "bits=2" in spec:
        # NOTE: 2-bit codes round the other way on a boundary, and with eviction a flipped
        # near-tie changes what is kept: on the CPU alone, weights scaled by 1 +- 2e-7 move
        # locret+kivi:bits=2's logits by up to 0.10 in 3 of 5 draws. The GPU (other
        # summation orders, fused kernels) may differ from the CPU as much as that noise does.
        tol = 2 * max(_noise(spec, a, seed) for seed in (1, 2, 3)) + 1e-2
        assert (b.float().cpu() - a.float()).abs().max().item() <= tol
    else:
        torch.testing.assert_close(b.float().cpu(), a.float(), rtol=2e-3, atol=2e-3)
    assert gpu.cache.length == cpu.cache.length and gpu.cache.seen == cpu.cache.seen
    ra, rb = cpu.ask("what is it?", max_new_tokens=8), gpu.ask("what is it?", max_new_tokens=8)
    if "bits=2" not in spec:  # a flipped 2-bit code may flip a near-tie of the random model
        assert ra.answer == rb.answer
    # NOTE: bytes differ by design: CUDA adds pinned staging (host) and streaming buffers (gpu)
    assert gpu.cache.bytes_by_tier()["gpu"] <= cpu.cache.bytes_by_tier()["gpu"] + 2 * 2**20
    if "offload" in spec:
        assert gpu.cache.bytes_by_tier()["host"] >= cpu.cache.bytes_by_tier()["host"] > 0


def test_offload_host_buffers_are_pinned_and_kivi_uses_the_kernel(files):
    rt = _rt("locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:recall=24,channels_file={ch}"
             .format(**files), "cuda")
    rt.prefill(_ids())
    spilled = [l.spill for l in rt.cache.layers if l.spill is not None]
    assert spilled and all(s.hk.is_pinned() and s.hv.is_pinned() for s in spilled)
    kv = _rt("kivi:group=16,residual=32", "cuda")
    assert all(l.store.kernel for l in kv.cache.layers)


@pytest.mark.parametrize("spec", ["full", "locret:budget=64,stabilizers=8,local=0,heads={heads}",
                                  "anchor:budget=64,local=16,sinks=4"])
def test_cuda_graph_decode_equals_eager(spec, files):
    """The captured step (app/runtime/decode.py) replayed across windows gives the eager
    logits at every step and leaves the cache as eager decode does."""
    from app.runtime.decode import Decoder
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = spec.format(**files)
    ref, rt = _rt(spec, "cuda"), _rt(spec, "cuda")
    ref.prefill(_ids()), rt.prefill(_ids())
    toks = _ids(13, seed=5)
    with Decoder(ref.adapter, ref.cache, fixed=False) as eager, Decoder(rt.adapter, rt.cache, room=5) as graph:
        assert graph.mode == "cuda graph"
        for t in toks:
            a, b = eager.step(t), graph.step(torch.tensor([t], device="cuda"))
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert graph.mode == "cuda graph"  # capture did not fall back
    assert rt.cache.seen == ref.cache.seen and rt.cache.next_position == ref.cache.next_position
    for la, lb in zip(ref.cache.layers, rt.cache.layers):
        torch.testing.assert_close(lb.store.k[:, :lb.length], la.store.k[:, :la.length], rtol=1e-4, atol=1e-4)
        if la.scores is not None:
            torch.testing.assert_close(lb.scores, la.scores, rtol=1e-4, atol=1e-4)
