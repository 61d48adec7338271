"""GPU probe (BENCHMARKS.md, GPU section): one decode step per store through our layer cache,
SDPA backends for decode and chunked prefill, and a KIVI kernel launch-parameter sweep.
Run: `bash scripts/gpu_session.sh probe` on a CUDA machine."""
import sys, os; sys.path.insert(0, os.getcwd())
import time, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from app.bench import kernels
from policies import Chunk
dev = torch.device("cuda")
info = kernels._info(dev, torch.bfloat16, 3)

def t(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1e6

for L in (8192, 131072):
    for name in ("full", "kivi:bits=2", "doublesparse:keep=0.0625"):
        layer = kernels._layer(name, info, L, 4096)
        q = torch.randn(32, 1, 128, device=dev, dtype=torch.bfloat16); kv = torch.randn(8, 1, 128, device=dev, dtype=torch.bfloat16)
        st = [L]
        def fn():
            layer.forward(q, kv, kv, 128 ** -0.5, Chunk(torch.zeros(1, dtype=torch.long), st[0], "decode")); st[0] += 1
        print(f"--- {name} @ {L}: wall {t(fn):.0f} us/step")
# kivi kernel sweep: block, splits per SM, warps
from policies.kernels import kivi_attn
for L in (8192, 131072):
    layer = kernels._layer("kivi:bits=2", info, L, 4096)
    q = torch.randn(32, 1, 128, device=dev, dtype=torch.bfloat16); kv = torch.randn(8, 1, 128, device=dev, dtype=torch.bfloat16)
    orig = kivi_attn.decode
    for block in (32, 64, 128):
        for mult in (2, 8, 32):
            for warps in (4, 8):
                sm = torch.cuda.get_device_properties(0).multi_processor_count
                splits = max(1, min(-(-L // block), -(-mult * sm // 8)))
                kivi_attn.decode = lambda q_, v_, sc, splits=None, block_=block, s_=splits, w_=warps: orig(q_, v_, sc, splits=s_, block=block_, warps=w_)
                st_ = [L]
                def fn():
                    layer.forward(q, kv, kv, 128 ** -0.5, Chunk(torch.zeros(1, dtype=torch.long), st_[0], "decode")); st_[0] += 1
                try:
                    print(f"kivi2 L={L} block={block} splits={splits} warps={warps}: {t(fn, 10):.0f} us")
                except Exception as e:
                    print(f"kivi2 L={L} block={block} warps={warps}: FAILED {str(e)[:100]}")
    kivi_attn.decode = orig
