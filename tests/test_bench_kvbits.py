"""Part `kvbits` of `bench quality`: KL, bytes per token and pass key per whole spec."""
from __future__ import annotations

import pytest


def test_kvbits_rows_per_spec():
    from app.bench import kvbits
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    m, t = tiny_pair(0, max_position_embeddings=4096)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=128)
    specs = ("full", "kivi:kbits=2,vbits=2,group=16,residual=16", "kivi:kbits=8,vbits=8,group=16,residual=16")
    rows = kvbits.run(rt, specs=specs, lengths=(300,), trials=2, kl_tokens=256, kl_next=8)
    by = {r["policy"]: r for r in rows}
    assert list(by) == list(specs)
    assert by["full"]["kl_nats"] == pytest.approx(0, abs=1e-6)
    k2, k8 = by[specs[1]], by[specs[2]]
    assert k8["kl_nats"] < 0.5 * k2["kl_nats"] and k2["kl_nats"] > 1e-4
    info = rt.adapter.info
    elt = 4  # the tiny model runs in fp32
    per = info.n_layers * info.n_kv_heads
    assert by["full"]["bytes_per_token"] == 2 * per * info.head_dim * elt
    assert k2["bytes_per_token"] == round(per * (info.head_dim * 4 / 8 + 2 * info.head_dim * elt / 16
                                                 + 2 * (info.head_dim // 16) * elt))
    assert k2["bytes_per_token"] < k8["bytes_per_token"] < by["full"]["bytes_per_token"]
    for r in rows:
        c, n = map(int, r["passkey_300"].split("/"))
        assert n == 2 and 0 <= c <= 2 and len(r["answers"][300]) == 2
    assert kvbits.columns(rows)[-1] == "passkey_300"
    quick = kvbits.run(rt, specs=specs[:2], lengths=(300,), trials=0, kl_tokens=256, kl_next=8)
    assert [r["kl_nats"] for r in quick] == [r["kl_nats"] for r in rows[:2]]
    assert kvbits.columns(quick)[-1] == "kv_peak_bytes"


def test_a_spec_that_keeps_every_position_is_not_run_past_the_window():
    from app.bench import kvbits
    from app.runtime.engine import Runtime
    from tiny import tiny_pair
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=128)  # a 512-token window
    rows = kvbits.run(rt, specs=("full", "streaming:window=64"), lengths=(300, 700), trials=1, kl_tokens=256,
                      kl_next=8)
    full, stream = rows
    assert full["passkey_700"] == "not run: keeps every position past the 512-token window"
    assert full["passkey_300"].endswith("/1") and stream["passkey_700"].endswith("/1")
    assert 700 not in full["answers"] and len(stream["answers"][700]) == 1


def test_named_parts_refuse_whole_specs():
    from app.bench.quality import check_parts
    check_parts(("kvbits",), ["kivi:kbits=4,vbits=2", "locret+kivi"])
    check_parts(("kl", "passkey"), ["full", "locret"])
    with pytest.raises(ValueError, match="kivi:kbits=4,vbits=2 are not policy names.*--parts kvbits"):
        check_parts(("kl", "kvbits"), ["full", "kivi:kbits=4,vbits=2"])


def test_labels_part_ranks_with_each_kind(tmp_path):
    """The cache dtype against itself agrees fully; int8 and fp16 rank nearly the same tokens
    in fewer bytes; the shipped kind reads the prompt end to end."""
    from app.bench import label_cache
    from app.runtime.engine import Runtime
    from offload import labels
    from tiny import tiny_pair, tiny_policy_files
    f = tiny_policy_files(tmp_path, max_position_embeddings=4096)
    m, t = tiny_pair(0, max_position_embeddings=4096)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=128)
    spec = f"locret:budget=96,chunk=128,stabilizers=8,local=0,heads={f['heads']}+offload:recall=64,channels_file={f['ch']}"
    rows = label_cache.run(rt, 700, 1, spec=spec)
    by = {r["labels"]: r for r in rows}
    assert list(by) == ["model", "fp16", "int8"] and labels.KIND == "int8"
    assert by["model"]["topk_overlap"] == 1.0 and by["int8"]["topk_overlap"] > 0.9
    assert by["fp16"]["topk_overlap"] >= by["int8"]["topk_overlap"]
    assert by["model"]["label_bytes"] == 2 * by["fp16"]["label_bytes"] > by["int8"]["label_bytes"] > 0
    assert 0 < by["int8"]["recalled_overlap"] <= 1 and "answer" in by["int8"] and "correct" in by["model"]
