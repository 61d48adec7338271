"""offload's quantized host tier (`offload:kbits=..,vbits=..`, offload/rows.py): evicted keys
and values kept on the host as KIVI codes with kivi's own quantizers; a recall dequantizes
only the rows it brings back. The lossless setting (16, the default) is today's tier, bit
for bit; host bytes per evicted token are the formula's, on the default model's shape too."""
from __future__ import annotations

import re

import pytest
import torch

from app.runtime.adapter import Adapter
from offload.rows import GROUP, CodedRows, make_rows, row_bytes, rows_bytes
from offload.spill import OffloadSpill, host_rows_bytes
from policies import ModelInfo, SpecError, parse_spec
from policies.kernels.pack import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from test_offload import KeepNewest, _ids, cache_with, calibrate_tiny, run_chunks
from tiny import tiny_llama, tiny_policy_files

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chfile(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("ch") / "tiny.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("files"))


def _greedy(ad, cache, ids, reads, n):
    """Prefills in `reads` (each a chunk plan), then n greedy tokens -> (tokens, logits [T + n, V])."""
    from policies import Chunk
    from app.runtime.prefill import prefill
    out, at = [], 0
    for plan in reads:
        out.append(prefill(ad, cache, ids[at:at + sum(plan)], plan=plan, all_logits=True))
        at += sum(plan)
    toks = []
    for _ in range(n):
        toks.append(int(out[-1][-1].argmax()))
        c = Chunk(torch.tensor([toks[-1]]), cache.next_position, "decode")
        out.append(ad.forward(c.input_ids, cache, c, all_logits=True))
    return toks, torch.cat(out)


# ---- the lossless setting is today's tier ---------------------------------------------------

@pytest.mark.parametrize("rank", [True, False])
def test_lossless_setting_gives_todays_answer_and_logits(chfile, rank):
    ids = _ids(200, 7)
    ids[170:180] = ids[2:12]  # the question quotes evicted text: its spans recall it (rank=off too)
    reads = [[150, 10], [40]]  # a document (150 tokens evicted down to 30, then 10 more), a question
    ad = Adapter(tiny_llama(0), None)
    opts = {"recall": 128, "channels_file": chfile} if rank else {"recall": 128, "rank": False, "terms": True,
                                                                    "quote": 16}
    runs = {}
    for name, extra in (("default", {}), ("16/16", {"kbits": 16, "vbits": 16}), ("8/4", {"kbits": 8, "vbits": 4})):
        cache = cache_with(ad, KeepNewest(30), opts | extra)
        runs[name] = _greedy(ad, cache, ids, reads, 8)
        assert cache.layers[0].spill.n == 120 and cache.layers[0].spill.m > 0
    assert runs["16/16"][0] == runs["default"][0]
    assert torch.equal(runs["16/16"][1], runs["default"][1])
    if rank:  # recall >= host tokens: every evicted token back at its own distance, as under `full`
        want = _greedy(ad, ad.new_cache("full"), ids, reads, 8)
        assert runs["default"][0] == want[0]
        torch.testing.assert_close(runs["default"][1], want[1], atol=2e-4, rtol=1e-4)
    # and the check can fail: codes change the logits once recalled rows are read
    assert not torch.equal(runs["8/4"][1][150:], runs["default"][1][150:])
    assert torch.equal(runs["8/4"][1][:150], runs["default"][1][:150])  # nothing recalled before a final chunk


def test_lossless_spec_is_the_default_and_the_store_role_refuses_bits():
    assert parse_spec("locret+offload:kbits=16,vbits=16")["spill"].spec() == "offload"
    assert parse_spec("locret+offload:kbits=8,vbits=4")["spill"].spec() == "offload:kbits=8,vbits=4"
    with pytest.raises(SpecError, match="option `kbits` of policy `offload` applies only behind"):
        parse_spec("offload:kbits=4")
    with pytest.raises(SpecError, match="not one of 2, 4, 8, 16"):
        parse_spec("locret+offload:vbits=3")


# ---- coded rows ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_read_dequantizes_the_rows_asked_for_as_kivi_does(bits):
    """Keys written in uneven evictions quantize in whole groups of G rows (the rest wait in
    full precision); any rows read back equal kivi's dequantization of the same codes (keys
    per channel, values per token), and the waiting rows come back as they went in."""
    g = torch.Generator().manual_seed(bits)
    h, d, dt = 3, 64, torch.float32
    x = torch.randn(h, 203, d, generator=g) * torch.linspace(0.2, 4, d)  # channels of unequal range
    kr, vr = CodedRows("k", bits, h, d, dt, CPU), CodedRows("v", bits, h, d, dt, CPU)
    at = 0
    for e in (45, 70, 13, 75):
        for r in (kr, vr):
            r.grow(256, at)  # as the spill grows them: capacity first, rows kept
            r.write(at, x[:, at:at + e])
        at += e
    nq = 203 - 203 % GROUP
    assert kr.nq == nq and vr.nq == 203
    keys = dequantize_keys(*quantize_keys(x[:, :nq], bits, GROUP, torch.float16), bits, GROUP)
    vals = dequantize_values(*quantize_values(x, bits, 32, torch.float16), bits, 32)
    idx = torch.stack([torch.randperm(203, generator=g)[:50] for _ in range(h)])
    got_k, got_v = torch.empty(h, 50, d), torch.empty(h, 50, d)
    kr.read(got_k, idx, 203)
    vr.read(got_v, idx, 203)
    ix = idx[..., None].expand(-1, -1, d)
    want_k = torch.where((idx < nq)[..., None], keys.gather(1, ix.clamp(max=nq - 1)), x.gather(1, ix))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, vals.gather(1, ix))
    err = (got_v - x.gather(1, ix)).abs().mean() / x.abs().mean()
    assert err < {2: 0.45, 4: 0.12, 8: 0.008}[bits]
    assert torch.equal(kr.rows(203), torch.cat((keys, x[:, nq:]), 1))


def test_coded_rows_refuse_a_head_dim_their_words_do_not_divide():
    with pytest.raises(SpecError, match="head_dim 20 is not a multiple of 16 codes"):
        CodedRows("k", 2, 2, 20, torch.float32, CPU)


# ---- bytes --------------------------------------------------------------------------------

def _default_shape(**over) -> ModelInfo:
    """The default model's cache shape (SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32 on a CPU)."""
    return ModelInfo(**dict(n_layers=30, n_q_heads=9, n_kv_heads=3, head_dim=64, dtype=torch.float32, device=CPU,
                            inv_freq=torch.ones(32), window=8192) | over)


@pytest.mark.parametrize("kbits, vbits, want", [(16, 16, 47_160), (8, 4, 11_160), (4, 4, 8_280), (2, 2, 5_400),
                                                (8, 8, 14_040)])
def test_host_bytes_per_evicted_token_on_the_default_model(kbits, vbits, want):
    """K/V at fp32 (30 x 3 x 64 x 2 x 4 = 46,080) + the conversation index (30 x 3 x 8 = 720)
    + rank=off's row map (30 x 3 x 4 = 360), or codes + fp16 scale and zero per 32 rows of a
    key channel and per 32 channels of a value."""
    info = _default_shape()
    spills = [OffloadSpill(info, i, 512, 16, 0, rank=False, quote=128, terms=True, kbits=kbits, vbits=vbits)
              for i in range(info.n_layers)]
    OffloadSpill.link(spills)  # (as the cache links them: one token log, so the row map)
    h, d = 3, 64
    per_layer = h * (d * kbits / 8 + (2 * d * 2 / 32 if kbits < 16 else 0)
                     + d * vbits / 8 + (2 * (d // 32) * 2 if vbits < 16 else 0) + 8 + 4)
    if kbits == 16:
        per_layer = h * (2 * d * 4 + 8 + 4)
    assert sum(sp.token_bytes() for sp in spills) == 30 * per_layer == want
    if (kbits, vbits) == (8, 4):
        assert want <= 12_000  # a million evicted tokens in <= 12 GB of host memory
    # grown to a capacity: exactly cap rows at that rate (the map apart: it follows the log),
    # plus the keys' one waiting group
    cap = 4096
    tail = 3 * GROUP * 64 * 4 if kbits < 16 else 0
    assert host_rows_bytes(info, kbits, vbits, cap) == cap * (want / 30 - 12) + tail


@pytest.mark.parametrize("kbits, vbits", [(8, 4), (4, 16), (16, 2)])
def test_live_host_bytes_are_the_formulas(chfile, kbits, vbits):
    ad = Adapter(tiny_llama(0), None)
    info = ad.info
    cache = cache_with(ad, KeepNewest(30), {"recall": 20, "channels_file": chfile, "kbits": kbits, "vbits": vbits})
    run_chunks(ad, cache, _ids(), [60, 90])
    by = cache.nbytes()
    L, h, d, cap = info.n_layers, info.n_kv_heads, info.head_dim, 256
    assert by[("host", "keys")] == L * rows_bytes("k", kbits, h, d, info.dtype, cap)
    assert by[("host", "values")] == L * rows_bytes("v", vbits, h, d, info.dtype, cap)
    assert by[("host", "keys")] + by[("host", "values")] + by[("host", "index")] == \
        L * host_rows_bytes(info, kbits, vbits, cap)
    # head_dim 16: a value group is the row's 16 channels (the gcd with 32)
    assert row_bytes("v", 4, h, d, info.dtype) == h * (16 * 4 / 8 + 1 * 2 * 2)
    assert isinstance(cache.layers[0].spill.keys, type(make_rows("k", kbits, h, d, info.dtype, CPU)))


# ---- cache files and live conversion ------------------------------------------------------

def test_coded_host_tier_reopens_exactly(files, tmp_path):
    from test_snapshot import _doc, _reopen_and_compare, _rt, _talk
    spec = ("locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:recall=32,quote=16,channels_file={ch},"
            "kbits=4,vbits=2").format(**files)
    live = _rt(spec)
    _talk(live, _doc(tmp_path))
    sp = live.cache.layers[0].spill
    assert sp.n > GROUP and sp.keys.nq < sp.n  # some keys coded, some waiting
    fresh = _reopen_and_compare(live, spec, tmp_path / "c.cache.safetensors")
    ra, rb = live.ask("And the apples?", max_new_tokens=8), fresh.ask("And the apples?", max_new_tokens=8)
    assert ra.answer == rb.answer


def test_live_conversion_takes_coded_rows_into_a_plain_tier(chfile):
    ad = Adapter(tiny_llama(0), None)
    coded = cache_with(ad, KeepNewest(30), {"recall": 20, "channels_file": chfile, "kbits": 8, "vbits": 8})
    run_chunks(ad, coded, _ids(), [60, 90])
    plain = cache_with(ad, KeepNewest(30), {"recall": 20, "channels_file": chfile})
    for a, b in zip(plain.layers, coded.layers):
        a.adopt(b)
        assert a.spill.n == b.spill.n == 30
        assert torch.equal(a.spill.hk[:, :30], b.spill.keys.rows(30))
        assert torch.equal(a.spill.hv[:, :30], b.spill.vals.rows(30))


# ---- the host check before a read ----------------------------------------------------------

def test_a_read_the_host_cannot_hold_is_refused_before_reading(files, tmp_path, monkeypatch):
    """On a CPU device and host are one memory: the host tier's need at the end of the read
    is counted with the device's, refused with the numbers and the settings that fit, and
    the quantized setting it offers then reads the same document in the same memory."""
    import psutil
    from app.runtime import fit
    from app.runtime.engine import Runtime
    from app.runtime.types import VramchatError, fmt_bytes
    from tiny import tiny_pair
    spec = "locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:terms=on,rank=off,recall=32,quote=16"
    spec = spec.format(**files)
    rt = Runtime.from_model(*tiny_pair(0), policy=spec, model_id="tiny", chunk_size=64)
    text = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (6000,), generator=torch.Generator().manual_seed(1)))
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    n = len(rt.tokens(text))
    host_fp = fit.host_rows(rt.cache, n, 64)
    host_84 = fit.host_rows(rt.cache, n, 64, 8, 4)
    assert host_84 < host_fp / 3
    dev = rt.cache.projected_length(n, 64) * rt.cache.bytes_per_token()
    real = psutil.virtual_memory()
    fake = type(real)(*[real.total, fit.SLACK + int(dev + host_fp / 2)] + list(real[2:]))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    with pytest.raises(VramchatError) as e:
        rt.load_document(doc)
    msg = str(e.value)
    read = int(re.match(r"this needs ([\d,]+) more tokens", msg).group(1).replace(",", ""))  # the chat turn's
    assert f"would hold {fmt_bytes(fit.host_rows(rt.cache, read, 64))} in host memory at the end of the read" in msg
    assert "Nothing was read" in msg and "(device and host are one here)" in msg
    quantized = spec.replace("quote=16", "quote=16,kbits=8,vbits=4")
    assert f"`{rt.adapter.new_cache(quantized).spec}`" in msg and "evicted tokens dropped" in msg
    assert "kbits=2,vbits=2" in msg  # the smaller settings fit too
    assert rt.cache.seen == 0 and rt.messages == []
    rt.set_policy(quantized)
    rt.load_document(doc)  # the setting it offered fits
    got = rt.cache.bytes_by_tier()["host"]
    want = fit.host_rows(rt.adapter.new_cache(quantized), read, 64)
    assert rt.cache.seen == read and got == want < host_fp / 2


# ---- plan's host column ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", ["", ",kbits=8,vbits=4", ",kbits=2,vbits=16"])
def test_plan_says_what_the_host_tier_holds(files, bits):
    """`main.py plan`'s host column at a quantized setting: the spill rows the live cache
    holds after the same read and answer, to the byte (the token log aside)."""
    from app.bench.common import decode_steps, random_ids
    from app.runtime import describe, estimate
    from app.runtime.engine import Runtime
    from app.runtime.prefill import prefill
    from tiny import tiny_pair
    spec = ("locret:budget=64,stabilizers=8,local=10,heads={heads}+offload:channels_file={ch},recall=32"
            + bits).format(**files)
    rt = Runtime.from_model(*tiny_pair(0), policy=spec, model_id="tiny", chunk_size=32)
    decode_steps(rt.adapter, rt.cache, prefill(rt.adapter, rt.cache, random_ids(700, 264, 1), 32), 8)
    got = estimate.estimate(describe.model_of(rt), rt.policy, 700, 32, 8, "fp32", "cpu")
    log = rt.cache.layers[0].spill.quotes.nbytes()
    assert got["kv_host_end"] == rt.cache.bytes_by_tier()["host"] - log > 0


def test_on_a_cpu_the_host_tier_shares_the_one_memory():
    from app.runtime.estimate import fits
    e = {"peak": 600, "kv_host": 500}
    assert fits(e, 1000, 2000) and not fits(e, 1000, None) and fits(e, 1100, None)


# ---- costs that must not grow with the document ----------------------------------------------

def test_the_cache_map_counts_a_whole_host_tier_as_what_is_not_kept(files):
    """The map a read publishes after every chunk counts a host tier that holds every token
    its layer evicted as the complement of the kept positions (O(kept), not O(read)): the
    same counts as the host rows themselves give."""
    from app.runtime import cache_map
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    spec = "locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:terms=on,rank=off,recall=32,quote=16"
    rt = Runtime.from_model(*tiny_pair(0), policy=spec.format(**files), model_id="tiny", chunk_size=32)
    ids = torch.randint(4, 260, (500,), generator=torch.Generator().manual_seed(2))
    rt.prefill(ids)
    rt.prefill(torch.cat((ids[5:17], ids[400:410])))  # a question quoting evicted text: recalled
    seen = rt.cache.seen
    want = torch.zeros(4, seen, dtype=torch.int64)
    for layer in rt.cache.layers:
        sp = layer.spill
        assert sp.n + layer.length == seen
        want[cache_map.DEVICE] += torch.bincount(layer.positions().reshape(-1), minlength=seen)
        want[cache_map.HOST] += torch.bincount(sp.hpos[:, :sp.n].reshape(-1), minlength=seen)
        if sp.m:
            want[cache_map.RECALLED] += torch.bincount(sp.recalled.reshape(-1), minlength=seen)
            want[cache_map.HOST] -= torch.bincount(sp.recalled.reshape(-1), minlength=seen)
    got = cache_map.build(rt.cache, []).counts
    assert want[cache_map.RECALLED].sum() > 0 and (got == want.numpy()).all()
