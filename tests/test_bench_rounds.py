"""`bench speed --rounds`: kept caches, decode timed in interleaved rounds, peers stepped."""
from __future__ import annotations

import importlib.util

from app.bench import speed
from app.runtime.adapter import Adapter
from tiny import tiny_llama


def test_speed_rounds_time_every_row_in_turn(tmp_path):
    ad = Adapter(tiny_llama(5, max_position_embeddings=4096, vocab_size=512), None, "tiny")
    peers = ["hf generate"]
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        peers.append("hf QuantizedCache 4-bit")
    rows = speed.run(ad, policies=("full", "kivi:group=16"), lengths=(256,), chunk=128, decode=2,
                     baselines=peers, out_dir=tmp_path, rounds=3)
    assert [r["policy"] for r in rows] == ["full", "kivi:group=16"] + peers
    for r in rows:
        assert "error" not in r, r
        assert len(r["decode_rounds"]) == 3 and r["decode_tok_s"] == sorted(r["decode_rounds"])[1]
        assert r["prefill_tok_s"] > 0 and r["decode_vs_full"] > 0
    assert rows[0]["decode_vs_full"] == 1.0
    assert (tmp_path / "speed.json").is_file()
