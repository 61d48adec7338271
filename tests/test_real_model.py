"""A few tests on the embedded default model (SmolLM2-135M-Instruct)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]


def test_paris(fresh_smol):
    res = fresh_smol.ask("What is the capital of France?", max_new_tokens=24)
    assert "Paris" in res.answer
    assert res.finish == "stop" and res.policy == "full"


def test_chunked_prefill_equals_plain_forward_on_real_model(fresh_smol):
    """Logits of our chunked loop vs the HF model's own forward, 300 real tokens."""
    rt = fresh_smol
    text = ("Long documents are read in chunks; each chunk attends to everything before it. " * 8)
    ids = torch.tensor(rt.tokens(text))
    from app.runtime.prefill import prefill
    cache = rt.adapter.new_cache("full")
    got = prefill(rt.adapter, cache, ids, 96, all_logits=True)
    model = rt.adapter.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(ids[None]).logits[0].float()
    finally:
        model.set_attn_implementation("vramchat")
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)


def test_document_questions(fresh_smol, tmp_path):
    doc = tmp_path / "report.md"
    doc.write_text("# Project report\n\nThe project deadline is 14 March 2027. The contract was signed "
                   "by Maria Keller, head of procurement. The budget is 42,000 euros.\n")
    rt = fresh_smol
    rt.load_document(str(doc))
    a1 = rt.ask("Who signed the contract?", max_new_tokens=30)
    assert "Keller" in a1.answer
    a2 = rt.ask("What is the budget?", max_new_tokens=30)
    assert "42,000" in a2.answer or "42000" in a2.answer
    assert a2.prompt_tokens < 30  # the document was not read again


def test_cli_ask_json_end_to_end(tmp_path):
    doc = tmp_path / "memo.txt"
    doc.write_text("Memo: the office moves to Lisbon on 3 June. Bring your badge.\n")
    r = subprocess.run([sys.executable, "main.py", "ask", "--json", "--doc", str(doc), "--max-new-tokens", "20",
                        "Where does the office move?", "When?"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    for key in ("model", "policy", "context_tokens", "retained_tokens", "answers", "memory"):
        assert key in out
    assert len(out["answers"]) == 2
    for a in out["answers"]:
        for key in ("question", "answer", "prompt_tokens", "new_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s"):
            assert key in a
    for key in ("kv_bytes", "kv_peak_bytes", "weights_bytes", "rss_peak_bytes", "gpu_peak_bytes"):
        assert key in out["memory"]
    assert set(out["memory"]["kv_bytes"]) == {"gpu", "host"}
    assert "Lisbon" in out["answers"][0]["answer"]
    assert out["retained_tokens"] == out["context_tokens"] > 40
    # exact KV bytes: 30 layers x 3 heads x capacity x 64 x 4 bytes x (K and V)
    cap = -(-out["context_tokens"] // 256) * 256
    assert out["memory"]["kv_bytes"]["gpu"] == 30 * 3 * cap * 64 * 4 * 2


def test_cli_warns_about_anchor_on_an_ordinary_model():
    from policies.anchor import WARNING
    r = subprocess.run([sys.executable, "main.py", "ask", "--json", "--policy", "anchor", "--max-new-tokens", "2",
                        "Hi"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"vramchat: warning: {WARNING}" in r.stderr and json.loads(r.stdout)["warnings"] == [WARNING]


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "main.py", "ask", "--doc", str(tmp_path / "missing.txt"), "q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "main.py", "ask", "--policy", "full:budget=9", "q"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "has no option `budget`" in r.stderr and "Traceback" not in r.stderr
