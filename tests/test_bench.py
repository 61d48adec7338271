"""The bench suites run end to end on a tiny model; measured memory agrees with the
analytic expectation."""
import importlib.util
import json

import pytest

from app.bench import gpu128k, memory, speed
from app.runtime.adapter import Adapter
from tiny import tiny_llama


@pytest.fixture(scope="module")
def ad():
    return Adapter(tiny_llama(5, max_position_embeddings=4096, vocab_size=512), None, "tiny")


def test_memory_measured_equals_expected(ad, tmp_path):
    rows = memory.run(ad, policies=("full", "kivi:group=16,residual=64", "kivi:bits=4,group=16,residual=64"),
                      lengths=(512, 1024), chunk=256, decode=4, out_dir=tmp_path)
    assert all("error" not in r for r in rows)
    for r in rows:
        if r["policy"] == "full":
            # buffers are allocated in blocks: measured is at most one block (256 tokens) over
            slack = 256 * 3 * 2 * 16 * 4 * 2  # layers x kv heads x head_dim x fp32 x (K, V)
            assert r["expected_kv"] <= r["kv"] <= r["expected_kv"] + slack, r
        else:
            # the formula counts a full residual window for keys; the key residual cycles
            # between 0 and R tokens (fill-then-flush), so measured sits a few % under; codes
            # grow by 256-row blocks, which with 8-bit keys (K8V2, the default) can outweigh that
            assert 0.95 <= r["measured/expected"] <= 1.01, r
        assert r["retained"] == r["expected_retained"] == r["context"]
    full = {r["context"]: r["kv"] for r in rows if r["policy"] == "full"}
    kivi = {r["context"]: r["kv"] for r in rows if r["policy"] == "kivi:group=16,residual=64"}
    assert kivi[1024] < full[1024] / 2.5  # fp32 tiny model: 2 bits + fp32 scales/zeros vs 32 bits
    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows)) and data["machine"]["cores"] >= 1


def test_speed_runs_with_baselines(ad, tmp_path):
    # (transformers' QuantizedCache is the other baseline; it needs the bench extra, optimum-quanto)
    rows = speed.run(ad, policies=("full", "kivi:group=16"), lengths=(256,), chunk=128, decode=3,
                     baselines=("hf generate",), out_dir=tmp_path)
    names = [r["policy"] for r in rows]
    assert names == ["full", "kivi:group=16", "hf generate"]
    for r in rows[:3]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0, r
    assert rows[0]["decode_vs_full"] == 1.0
    assert (tmp_path / "speed.json").is_file()


def test_speed_on_a_random_shaped_model_from_the_cli(tmp_path):
    """`bench speed --shape`: no model to load; locret and offload get random heads and
    channels, and the rows keep the specs as given."""
    import main
    assert main.main(["bench", "speed", "--shape", "tiny", "--lengths", "512", "--chunk", "128", "--decode", "2",
                      "--baselines", "none", "--policies",
                      "full locret:budget=300,stabilizers=64+offload:recall=32", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["full", "locret:budget=300,stabilizers=64+offload:recall=32"]
    assert all("error" not in r and r["decode_tok_s"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="--shape is for"):
        main.main(["bench", "memory", "--shape", "tiny"])


def test_gpu128k_code_path_on_cpu(tmp_path):
    rows = gpu128k.run(shape="tiny", context=1500, decode=3, policies=("full", "kivi:group=16"), allow_cpu=True,
                       out_dir=tmp_path)
    assert [r["policy"] for r in rows] == ["full", "kivi:group=16"]
    assert all(r["decode_tok_s"] > 0 and r["of_floor"] > 0 for r in rows)
    assert rows[1]["kv_gpu_gib"] < rows[0]["kv_gpu_gib"]


def test_gpu128k_every_default_policy_runs_past_its_budget(tmp_path):
    """The suite's own policy list (budgets shrunk so a tiny context evicts and spills)."""
    pols = tuple(p.replace("16384", "300").replace("2048", "128") for p in gpu128k.POLICIES)
    rows = gpu128k.run(shape="tiny", context=1000, decode=3, policies=pols, allow_cpu=True, out_dir=tmp_path)
    assert [r.get("error") for r in rows] == [None] * len(pols)
    full, locret, _, spilled, offload = rows
    assert spilled["kv_host_gib"] > 0 and offload["kv_gpu_gib"] == 0 and offload["kv_host_gib"] > 0
    assert locret["kv_gpu_gib"] < full["kv_gpu_gib"]


def test_gpu128k_refuses_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu128k.run(shape="tiny", context=100)


def test_kernels_suite_times_every_store_against_full(tmp_path):
    from app.bench import kernels
    rows = kernels.run(lengths=(300,), rows=("full", "kivi:bits=2 (reference)", "doublesparse:keep=0.0625"),
                       iters=2, chunk=128, device="cpu", out_dir=tmp_path)
    assert [r["store"] for r in rows] == ["full", "kivi:bits=2 (reference)", "doublesparse:keep=0.0625"]
    assert all(r["us"] > 0 and r["speedup_vs_full"] > 0 and "error" not in r for r in rows)
    assert rows[0]["speedup_vs_full"] == 1
    assert (tmp_path / "kernels.json").exists()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from tiny import tiny_policy_files
    f = tiny_policy_files(tmp_path_factory.mktemp("copy"), max_position_embeddings=4096)
    return f["heads"], f["ch"]


def test_copy_fidelity_measures_what_each_policy_reads(tiny_files):
    """Lossless locret (budget above the document) scores the copy exactly as `full` does;
    at a small budget locret keeps less, and offload's recall changes what the answer reads.
    (Recall of everything is not `full`: the document's later tokens were computed under
    eviction; tests/test_offload.py checks recall at the layer, where that holds.)"""
    from app.bench import recall
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    heads, ch = tiny_files
    m, t = tiny_pair(0, max_position_embeddings=4096)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=256)
    loc = f"locret:budget=96,chunk=256,stabilizers=8,local=0,heads={heads}"
    specs = ("full", loc.replace("budget=96", "budget=4000"), loc, f"{loc}+offload:recall=4096,channels_file={ch}")
    full, lossless, alone, off = (recall.copy_fidelity(rt, s, doc_tokens=900, passage_tokens=60) for s in specs)
    assert full["tokens"] == lossless["tokens"] == alone["tokens"] == off["tokens"] > 30
    assert lossless["correct"] == full["correct"] and lossless["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert alone["kv_host_bytes"] == 0 and alone["kv_gpu_bytes"] < full["kv_gpu_bytes"] and off["kv_host_bytes"] > 0
    assert alone["nll"] != pytest.approx(full["nll"], rel=1e-4)
    assert off["nll"] != pytest.approx(alone["nll"], rel=1e-4)
    # one causal chunk reads what token-by-token decoding reads (full and locret)
    for spec, one in ((specs[0], full), (loc, alone)):
        step = recall.copy_fidelity(rt, spec, doc_tokens=900, passage_tokens=60, stepwise=True)
        assert step["correct"] == one["correct"] and step["nll"] == pytest.approx(one["nll"], rel=1e-4)


def test_kl_part_measures_extras_and_perplexity_against_full():
    """`full` against itself: KL 0 and equal perplexities; a lossy store (2-bit) and a lossless
    one (kivi with a residual as long as the context) measured in the same part."""
    from app.bench import baselines
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    m, t = tiny_pair(0, max_position_embeddings=4096)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=128)
    rows = baselines.run(rt, names=["full", "streaming"], budget=64, chunk=128, kl_tokens=256, kl_next=8, threads=1,
                         parts=("kl",), kl_extra=("kivi:group=16,residual=2048", "kivi:group=16,residual=16"),
                         peer_bits=(2,), peer_group=16, progress=None)
    by = {r["policy"]: r for r in rows}
    peers = ["hf QuantizedCache quanto 2-bit G=16 R=128 axis=0", "hf QuantizedCache quanto 2-bit G=16 R=128 axis=-1"]
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        peers = peers[:1]  # a row saying why and how to install it
        assert by[peers[0]]["kind"] == "skipped" and ".[bench]" in by[peers[0]]["why"]
    else:
        assert all(by[p]["kl_nats"] > 0 and by[p]["ppl_full"] == by["full"]["ppl_full"] for p in peers)
    assert list(by) == ["full", "streaming:sinks=4,window=60,chunk=128", "kivi:group=16,residual=2048",
                        "kivi:group=16,residual=16", "kivi:bits=2,group=16 (one-pass prefill)"] + peers
    assert by["kivi:bits=2,group=16 (one-pass prefill)"]["kl_nats"] > 0
    assert by["full"]["kl_nats"] == 0 and by["full"]["ppl_spec"] == by["full"]["ppl_full"] > 1
    assert by["kivi:group=16,residual=2048"]["kl_nats"] == pytest.approx(0, abs=1e-6)
    lossy = by["kivi:group=16,residual=16"]
    assert lossy["kl_nats"] > 1e-4 and lossy["ppl_spec"] != lossy["ppl_full"]
    assert lossy["kv_peak_bytes"] < by["full"]["kv_peak_bytes"]


def test_quality_refuses_unknown_parts_before_loading():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "main.py", "bench", "quality", "--parts", "kl,nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown part(s) nope" in out.stderr and "random-heads" in out.stderr


def test_quality_checks_dense_kinds_before_loading():
    from app.bench.quality import check_parts
    check_parts(("dense",), None, ("multikey", "after-turn"))
    with pytest.raises(ValueError, match=r"unknown kind\(s\) nope; choose from multikey, multivalue, after-turn"):
        check_parts(("dense",), None, ("multikey", "nope"))
    with pytest.raises(ValueError, match="name the part"):
        check_parts(("kl",), None, ("multikey",))


def test_passkey_skips_longer_lengths_after_a_miss_except_full(monkeypatch):
    from app.bench import baselines
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    m, t = tiny_pair(0, max_position_embeddings=4096)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=128)
    asked = []

    def fake(rt, spec, n, depth, seed, max_new=12):
        asked.append((spec.split(":")[0], n))
        return n == 300 or (spec.startswith("locret") and depth < 0.5)  # all at 300; beyond, locret 1/2
    monkeypatch.setattr(baselines, "passkey", fake)
    kw = dict(budget=64, chunk=128, lengths=(600, 300, 900), trials=2, threads=1, parts=("passkey",),
              progress=None)
    monkeypatch.setattr(baselines, "policies_at", lambda b, c: {"full": "full", "streaming": "streaming",
                                                                "locret": "locret:heads=x"})
    monkeypatch.setattr(baselines, "_usable", lambda *a: True)
    rows = baselines.run(rt, names=["full", "streaming", "locret"], skip_missed=True, **kw)
    got = [(r["policy"].split(":")[0], r["tokens"], r.get("correct"), r.get("skipped")) for r in rows]
    assert got == [("full", 300, 2, None), ("full", 600, 0, None), ("full", 900, 0, None),
                   ("streaming", 300, 2, None), ("streaming", 600, 0, None),
                   ("streaming", 900, None, "not run: 0/2 at 600 tokens"),
                   ("locret", 300, 2, None), ("locret", 600, 1, None), ("locret", 900, None, "not run: 1/2 at 600 tokens")]
    assert len(asked) == 14
    asked.clear()
    baselines.run(rt, names=["full", "streaming", "locret"], skip_missed=False, **kw)
    assert len(asked) == 18  # every cell


def test_probe_suites_run_from_the_cli(capsys):
    """The GPU probes are bench suites: on a CPU probe-decode runs the tiny shape, probe-pinned
    runs unpinned, probe-attn refuses."""
    import main
    import torch
    assert main.main(["bench", "probe-decode", "--context", "300", "--policies", "full", "--variants", "torch",
                      "--profile", ""]) == 0
    assert "of floor" in capsys.readouterr().out
    assert main.main(["bench", "probe-pinned"]) == 0
    assert "exact pinning set" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            main.main(["bench", "probe-attn"])
