"""`bench soak` end to end on a tiny model: the device KV stays constant over
the turns, the JSON has what BENCHMARKS.md reports, and the bound check catches growth."""
from __future__ import annotations

import json

import pytest
import torch

from app.bench import soak
from app.outlier_channels import collect
from app.runtime.engine import Runtime
from offload import calibrate
from policies.locret import model_key
from tiny import random_heads, tiny_pair

TURNS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows_and_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    model, tok = tiny_pair(3)
    rt = Runtime.from_model(model, tok, model_id="tiny", chunk_size=64)
    info = rt.adapter.info
    heads = random_heads(info, tmp / "heads.safetensors")
    gen = torch.Generator().manual_seed(0)
    stats = collect(rt.adapter, [torch.randint(4, 260, (64,), generator=gen) for _ in range(2)])
    ch = tmp / "ch.safetensors"
    calibrate.save(ch, stats.mean(), 4, model_key(info), ["tiny"], 128, "random tokens (test)")
    sel = f"locret:budget=128,chunk=64,stabilizers=16,local=32,heads={heads}"
    specs = (sel, f"{sel}+kivi:group=16,residual=32", f"{sel}+offload:channels_file={ch}", "full")
    rows = soak.run(rt, policies=specs, turns=TURNS, max_new=4, doc_tokens=1500, out_dir=tmp / "out")
    assert [r["policy"] for r in rows] == list(specs)
    return rows, json.loads((tmp / "out" / "soak.json").read_text()), tmp / "out"


def test_device_kv_is_constant_after_turn_2(rows_and_json):
    rows, data, _ = rows_and_json
    *rows, full = rows  # `full` has no budget: it holds every turn, and the check must say so
    assert full["held_over"] > 0 and full["length_max"] > full["length_t2"] and not full["within_bound"]
    per_turn = [t for t in data["per_turn"] if t["policy"] != "full"]
    for r in rows:
        assert "error" not in r, r
        assert r["turns"] == TURNS and r["read"] > 1500
        assert r["kv_buffers_growth"] == 0 and r["kv_device_t2"] > 0 and r["held_over"] <= 0, r
        assert r["within_bound"], r
    for t in per_turn:  # every turn: budget + the protected question (<= local) + the answer
        assert t["length"] <= t["held_bound"] <= 128 + 32 + 4, t
    per = [t for t in per_turn if "offload" in t["policy"]]
    # offload keeps every evicted token on the host: its host tier grows (in blocks) with the turns
    assert all(b["kv_host"] >= a["kv_host"] for a, b in zip(per, per[1:])) and per[-1]["kv_host"] > per[1]["kv_host"]
    assert all(t["kv_host"] == 0 for t in per_turn if "offload" not in t["policy"])


def test_json_and_plots_have_what_benchmarks_md_reports(rows_and_json):
    rows, data, out = rows_and_json
    assert data["suite"] == "soak" and data["doc_tokens"] > 1400 and data["max_new"] == 4
    assert data["rows"] == json.loads(json.dumps(rows))
    for r in rows:
        for k in ("kv_device_t2", "kv_device_growth", "kv_device_growth_pct", "kv_buffers_growth", "held_over",
                  "kv_host_growth", "rss_t2",
                  "rss_growth", "rss_growth_pct", "rss_allowed", "within_bound", "first_answer", "first_correct",
                  "last_answer", "last_correct", "needle_kept", "wall_s"):
            assert k in r, k
        assert isinstance(r["first_correct"], bool) and isinstance(r["last_correct"], bool)
    assert len(data["per_turn"]) == 4 * TURNS
    t = data["per_turn"][0]
    assert t["turn"] == 1 and t["question"] == soak.NEEDLE_Q and "correct" in t
    assert data["per_turn"][1]["question"] == soak.QUESTIONS[0]
    for k in ("length", "held_bound", "seen", "kv_device", "kv_buffers", "kv_labels", "kv_host", "rss", "rss_raw",
              "cuda_allocated", "turn_s"):
        assert k in t, k
    if (out / "soak_kv.png").exists() or (out / "soak_rss.png").exists():  # matplotlib is optional
        assert (out / "soak_kv.png").stat().st_size > 0 and (out / "soak_rss.png").stat().st_size > 0


def _records(kv, rss, host=None, cuda=None, length=None):
    n = len(kv)
    host, length = host or [0] * n, length or [150] * n
    return [{"policy": "p", "turn": i + 1, "seen": 100 * (i + 1), "length": ln, "held_bound": 160,
             "kv_device": d + ln * 12, "kv_buffers": d, "kv_labels": 0, "kv_host": h, "kv_total": d + ln * 12 + h,
             "rss": r, "cuda_allocated": c, "answer": "x", **({"correct": True} if i in (0, n - 1) else {})}
            for i, (d, r, h, c, ln) in enumerate(zip(kv, rss, host, cuda or [None] * n, length))]


def test_bound_check_flags_growth():
    M = 2**20
    flat = soak.summarize(_records([9 * M, 5 * M] + [5 * M] * 4, [500 * M] * 6, length=[150, 150, 158, 144, 160, 150]))
    # turn 1 (the document) is not compared; the held length may move inside its bound
    assert flat["within_bound"] and flat["kv_buffers_growth"] == 0 and flat["kv_device_growth"] == 10 * 12
    grows = soak.summarize(_records([5 * M + i * 4096 for i in range(6)], [500 * M] * 6))
    assert not grows["within_bound"] and grows["kv_buffers_growth"] == 4 * 4096
    held = soak.summarize(_records([5 * M] * 6, [500 * M] * 6, length=[150] * 5 + [161]))
    assert not held["within_bound"] and held["held_over"] == 1
    leak = soak.summarize(_records([5 * M] * 6, [500 * M + i * 20 * M for i in range(6)]))
    assert not leak["within_bound"] and leak["rss_growth"] == 80 * M
    assert leak["rss_growth_pct"] == round(100 * 80 / 520, 2)
    # RSS may grow by what the host tier accounts for (offload), not more
    host = [i * 30 * M for i in range(6)]
    spill = soak.summarize(_records([5 * M] * 6, [500 * M + h + 10 * M for h in host], host))
    assert spill["within_bound"] and spill["rss_allowed"] == 120 * M + soak.RSS_SLACK
    card = soak.summarize(_records([5 * M] * 6, [500 * M] * 6, cuda=[900 * M + i * 40 * M for i in range(6)]))
    assert not card["within_bound"] and card["cuda_growth"] == 160 * M
    with pytest.raises(ValueError, match="at least 3"):
        soak.summarize(_records([1, 1], [1, 1]))


def test_needle_kept_means_last_as_correct_as_first():
    recs = _records([1] * 4, [1] * 4)
    recs[-1]["correct"] = False
    assert soak.summarize(recs)["needle_kept"] is False
    recs[0]["correct"] = False
    assert soak.summarize(recs)["needle_kept"] is True
