"""`main.py plan` against measured bytes: a tiny model saved to a folder, its real caches
measured as `bench memory` measures them (prefill then decode) vs plan's estimate from the
folder's metadata alone."""
from __future__ import annotations

import json

import pytest
import torch

from app import plan
from app.runtime import describe as desc, estimate as est
from app.runtime.types import VramchatError
from policies import SpecError
from tiny import tiny_pair

N, CHUNK, ANSWER = 700, 128, 8
# (spec, held tokens per KV head exactly as plan says?)
SPECS = [("full", True), ("kivi", True), ("kivi:bits=4,residual=64", True),
         ("streaming:sinks=4,window=124", True), ("h2o:budget=128,recent=16", True),
         ("snapkv:budget=128,window=8", True), ("locret:budget=128,stabilizers=8,local=20,heads={heads}", True),
         ("locret:budget=128,stabilizers=8,local=20,heads={heads}+kivi", True),
         ("locret:budget=128,stabilizers=8,local=20,heads={heads}+offload:channels_file={ch},recall=32", True),
         ("offload", True), ("anchor:budget=128,local=32", False)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama whose head_dim (32) takes kivi's groups, saved as a user's would be,
    with random retaining heads and channels made for it."""
    from app.runtime.adapter import Adapter
    from offload.calibrate import save
    from policies.locret import RetainingHeads, model_key, save_heads
    d = tmp_path_factory.mktemp("plan")
    model, tok = tiny_pair(0, hidden_size=128, intermediate_size=256)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    info = Adapter(model, tok, "tiny").info
    torch.manual_seed(0)
    save_heads(RetainingHeads(info.n_layers, info.hidden_size, 16, info.n_kv_heads), d / "heads.safetensors",
               model_key(info), ["tiny"])
    stat = torch.rand(info.n_layers, info.n_kv_heads, info.head_dim, generator=torch.Generator().manual_seed(0))
    save(d / "ch.safetensors", stat, 4, model_key(info), ["tiny"], 0, "random (test)")
    return d


def _spec(spec, folder):
    return spec.format(heads=folder / "heads.safetensors", ch=folder / "ch.safetensors")


@pytest.fixture(scope="module")
def measured(folder):
    """The real caches on the loaded folder, measured as `bench memory` does (random ids, the
    runtime's chunked prefill, greedy decode steps): {spec: bytes by tier after the answer,
    the tracked peak, tokens held after the prefill}."""
    from app.bench.common import decode_steps, random_ids
    from app.runtime.engine import Runtime
    from app.runtime.prefill import prefill
    from policies import KVCache
    rt = Runtime.load(str(folder / "model"), device="cpu", weights="fp32")
    rows = {}
    for spec, _ in SPECS:
        spec = _spec(spec, folder)
        cache = KVCache(spec, rt.adapter.info)
        logits = prefill(rt.adapter, cache, random_ids(N, 264, N), CHUNK)
        retained = cache.length
        decode_steps(rt.adapter, cache, logits, ANSWER)
        tiers = cache.bytes_by_tier()
        rows[spec] = {"kv_gpu": tiers["gpu"], "kv_host": tiers["host"], "kv_peak": cache.peak_bytes,
                      "retained": retained}
    return rows, rt


@pytest.mark.parametrize("spec,exact", SPECS, ids=[s.split(":")[0] + str(i) for i, (s, _) in enumerate(SPECS)])
def test_kv_estimate_matches_measured(spec, exact, folder, measured):
    rows, rt = measured
    spec = _spec(spec, folder)
    row = rows[spec]
    m = desc.describe(str(folder / "model"))
    e = est.estimate(m, spec, N, CHUNK, ANSWER, "fp32", "cpu")
    assert e["kv_gpu_end"] == pytest.approx(row["kv_gpu"], rel=0.10), (spec, e, row)
    assert e["kv_host_end"] == pytest.approx(row["kv_host"], rel=0.10, abs=1), (spec, e, row)
    # the tracker samples after each chunk's eviction; plan's peak is before it: never below
    assert e["kv_gpu"] + e["kv_host"] >= 0.97 * row["kv_peak"], (spec, e, row)
    if exact:
        assert e["held"] == row["retained"] + ANSWER, (spec, e, row)
    else:
        assert e["held"] >= row["retained"] + ANSWER


def test_weights_bytes_equal_the_loaded_model(folder, measured):
    _, rt = measured
    m = desc.describe(str(folder / "model"))
    assert desc.weights_bytes(m, "fp32") == rt.adapter.weights_bytes()
    assert desc.weights_bytes(m, "bf16") - m.buffers == (rt.adapter.weights_bytes() - m.buffers) // 2
    assert desc.weights_bytes(m, "4bit") < desc.weights_bytes(m, "8bit") < desc.weights_bytes(m, "bf16")
    assert (m.info.n_layers, m.info.n_kv_heads, m.info.head_dim, m.window) == (3, 2, 32, 512)


def test_gguf_metadata(tmp_path):
    """A GGUF header alone gives the same shapes transformers' loader builds."""
    from app.runtime.facts import gguf_facts
    from stores_fixture import write_gguf
    g = write_gguf(tmp_path / "t.gguf")
    m = desc.describe(str(g))
    assert (m.arch, m.info.n_layers, m.info.n_q_heads, m.info.n_kv_heads, m.info.head_dim, m.window) == \
        ("llama", 2, 4, 2, 16, 512)
    assert m.linear + m.other == gguf_facts(g)["params"]
    assert desc.weights_bytes(m, "fp32") == 4 * gguf_facts(g)["params"] + m.buffers


def test_plan_command(folder, capsys):
    from app.cli import main
    model = str(folder / "model")
    args = ["plan", "--model", model, "--context", "100000", "--gpu-gib", "0.05", "--weights", "bf16",
            "--policy", "full", "--policy", "streaming:window=256", "--policy", "locret", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["policy"]: r for r in out["policies"]}
    assert out["capacity_bytes"] == int(0.05 * 2**30) and out["weights"] == "bf16"
    full, stream = rows["full"], rows["streaming:window=256"]
    m = desc.describe(model)
    assert not full["fits"] and full["peak"] > out["capacity_bytes"]
    big = full["largest_context"]
    assert 10000 < big < 100000
    at = est.estimate(m, "full", big, out["chunk"], out["answer"], "bf16", "cuda")["peak"]
    over = est.estimate(m, "full", big + max(1, big // 256), out["chunk"], out["answer"], "bf16", "cuda")["peak"]
    assert at <= out["capacity_bytes"] < over
    assert stream["fits"] and stream["largest_context"] == est.MAX_SEARCH  # bounded: any length
    assert "no retaining heads" in rows["locret"]["error"]  # refused for this model, with the reason
    assert main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "largest context" in text and "locret: policy `locret` has no retaining heads" in text


@pytest.mark.parametrize("args,words", [
    (["--context", "0"], "--context 0"),
    (["--context", "100", "--gpu-gib", "-1"], "--gpu-gib"),
    (["--context", "100", "--weights", "4bit"], "needs a CUDA GPU"),
    (["--context", "100", "--model", "/no/such/model"], "not found on this machine"),
])
def test_plan_bad_input(args, words, folder, capsys):
    from app.cli import main
    if "--model" not in args:
        args = ["--model", str(folder / "model"), *args]
    if torch.cuda.is_available() and "4bit" in args:
        pytest.skip("this machine has a GPU")
    assert main(["plan", *args]) == 2
    assert words in capsys.readouterr().err


def test_bad_spec_is_one_row(folder):
    p = plan.plan(str(folder / "model"), 100, ["full", "nosuch"], gpu_gib=1)
    rows = {r["policy"]: r for r in p["policies"]}
    assert "fits" in rows["full"] and "unknown policy" in rows["nosuch"]["error"]
    with pytest.raises(SpecError):
        est.kv_bytes(desc.describe(str(folder / "model")), "nosuch", 10, 8, 1, "fp32")
    with pytest.raises(VramchatError):
        plan.plan(str(folder / "model"), 100, ["full"], weights="int3")


def test_before_load_line(folder, measured, tmp_path):
    """What the app shows before /load reads a document: the same estimate as `plan`."""
    _, rt = measured
    doc = tmp_path / "doc.txt"
    doc.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    n = len(rt.tokens(doc.read_text()))
    line = plan.before_load(rt, str(doc))
    m = desc.describe(str(folder / "model"))
    kv = est.estimate(m, rt.policy, rt.cache.seen + n, rt.chunk_size, 1024, "fp32", "cpu", exact=False)["kv_gpu"]
    from app.runtime.types import fmt_bytes
    assert line.startswith(f"doc.txt: {n:,} tokens; `{rt.policy}` will hold {fmt_bytes(kv)} of KV")
    assert "fits" in line


def test_plan_answers_for_auto(folder, capsys):
    """`plan --policy auto`: the stack auto would choose for that context on that model (by
    auto's own rule), its numbers, labelled as auto's choice."""
    from app.cli import main
    from app.runtime.auto import choose_for
    model = str(folder / "model")
    m = desc.describe(model)
    for context, word in ((100, "full"), (5000, "streaming:window=128+offload")):  # the window is 512
        p = plan.plan(model, context, ["auto", "full"], gpu_gib=1, weights="bf16", answer=64)
        row = p["policies"][0]
        assert "error" not in row, row
        want = choose_for(m, context, p["answer"], heads=False, memory=(p["capacity_bytes"], p["host_available_bytes"]),
                          weights="bf16", device="cuda", chunk=p["chunk"])
        assert row["policy"] == "auto" and row["auto"] == {"spec": want.spec, "reason": want.reason}
        assert want.spec.startswith(word)
        e = est.estimate(m, want.spec, context, p["chunk"], p["answer"], "bf16", "cuda")
        assert {k: row[k] for k in e} == e and row["fits"]
    assert row["largest_context"] > 5000  # past the window auto's stacks stay bounded on the device
    assert main(["plan", "--model", model, "--context", "5000", "--gpu-gib", "1", "--answer", "64", "--policy", "auto"]) == 0
    text = capsys.readouterr().out
    assert f"auto: {want.spec} " in text and f"auto would choose `{want.spec}` for 5,000 tokens" in text


def test_plan_on_a_config_only_model_builds_every_policy(folder, tmp_path):
    """A folder with config.json alone (no tokenizer: plan's vocabulary stand-in): auto's
    heads-free stack (offload's quote log reads the vocabulary when built) and every
    registered policy give numbers or a SpecError row, never a crash."""
    from policies import REGISTRY
    import shutil
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model" / "config.json", bare / "config.json")
    m = desc.describe(str(bare))
    assert isinstance(m.info.tokenizer, desc._Vocab)
    specs = ["streaming:window=2048+offload:terms=on,rank=off", "streaming+offload:rank=off", "auto",
             *sorted(REGISTRY), "h2o+offload:terms=on,rank=off"]
    p = plan.plan(str(bare), 5000, specs, gpu_gib=1)
    rows = {r["policy"]: r for r in p["policies"]}
    for spec in specs[:3] + ["anchor", "h2o+offload:terms=on,rank=off"]:
        assert "error" not in rows[spec] and rows[spec]["kv_host"] >= 0, rows[spec]
    for spec, row in rows.items():  # a refusal names its reason
        assert "fits" in row or row["error"].startswith(("policy `", "option `")), (spec, row)
