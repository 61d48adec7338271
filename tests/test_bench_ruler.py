"""`bench ruler`: lm-eval's stock client runs RULER's own task against `serve` (tiny model)."""
import json

import pytest

pytest.importorskip("lm_eval")

from app.bench import ruler  # noqa: E402
from app.runtime.engine import Runtime  # noqa: E402
from tiny import tiny_pair  # noqa: E402


def test_stock_niah_single_1_runs_against_serve_with_no_refusal(tmp_path):
    model, tok = tiny_pair(7)
    rt = Runtime.from_model(model, tok, model_id="tiny", chunk_size=256)
    rows = ruler.run(rt, policies=("full",), lengths=(1024,), tasks=("niah_single_1",), limit=2, out_dir=tmp_path)
    assert len(rows) == 1
    row = rows[0]
    # every sample answered (a refused request fails the cell: score None, the error in the note)
    assert row["score"] is not None and 0 <= row["score"] <= 100, row
    assert row["note"] == ("past window" if rt.window < 1024 else ""), row
    saved = json.loads((tmp_path / "ruler.json").read_text())
    assert saved["client"] == "lm-eval local-chat-completions" and saved["rows"][0]["task"] == "niah_single_1"


def test_unknown_tasks_are_refused_by_name():
    with pytest.raises(SystemExit, match="unknown task.*niah_single_9"):
        ruler.check_tasks(["niah_single_1", "niah_single_9"])


def test_summary_averages_the_tasks_that_ran():
    rows = [{"policy": "auto", "length": 4096, "score": 100.0}, {"policy": "auto", "length": 4096, "score": 50.0},
            {"policy": "auto", "length": 4096, "score": None}]
    assert ruler.summary(rows) == [{"policy": "auto", "length": 4096, "mean_score": 75.0, "tasks": "2/3"}]
