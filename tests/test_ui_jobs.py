"""The app's model-thread work (app/ui/jobs.py) with a runtime alone, no Textual."""
import subprocess
import sys

from app.runtime.types import ConversionResult, VramchatError
from app.ui import jobs
from tests.tiny import tiny_pair
from tests.ui.fake import FakeRuntime


def test_apply_policy_switches_or_says_why():
    rt = FakeRuntime()
    loaded = jobs.apply_policy(rt, "kivi")
    assert rt.policy == "kivi" and loaded.policy == "kivi" and loaded.error is None and loaded.need is None
    bad = jobs.apply_policy(rt, "nonsense")
    assert bad.error is not None and "nonsense" in str(bad.error) and rt.policy == "kivi"
    assert jobs.apply_policy(rt, None).policy == "kivi" and rt.calls.count("set_policy kivi") == 1


def test_apply_policy_without_heads_asks_and_keeps_the_model():
    from app.runtime.engine import Runtime
    model, tok = tiny_pair()
    rt = Runtime(model, tok, policy="full", model_id="tiny-no-heads")
    loaded = jobs.apply_policy(rt, "locret")
    assert loaded.need is not None and loaded.need.spec == "locret" and loaded.need.model == "tiny-no-heads"
    assert loaded.need.seconds > 0 and rt.policy == "full" and loaded.policy == "full"
    r = jobs.switch_policy(rt, "locret")
    assert isinstance(r, jobs.NeedHeads) and rt.policy == "full"
    s = jobs.switch_policy(rt, "streaming")
    assert isinstance(s, jobs.Switched) and isinstance(s.result, ConversionResult) and rt.policy.startswith("streaming")


def test_read_document_and_its_estimate(tmp_path):
    from app.runtime.engine import Runtime
    doc = tmp_path / "notes.txt"
    doc.write_text("The harbour opens at dawn. " * 40)
    fake = FakeRuntime()
    assert jobs.before_load(fake, str(doc)) == ""  # no cache here to estimate
    info, content = jobs.read_document(fake, doc)
    assert info.name == "notes.txt" and content.startswith("The harbour")
    model, tok = tiny_pair()
    rt = Runtime(model, tok, policy="full", model_id="tiny")
    line = jobs.before_load(rt, str(doc))
    n = len(rt.tokens(doc.read_text()))
    assert line.startswith(f"notes.txt: {n:,} tokens; `full` will hold ") and "fits" in line
    assert jobs.before_load(rt, str(tmp_path / "missing.txt")) == ""  # reading says why, not the estimate
    try:
        jobs.read_document(rt, tmp_path / "missing.txt")
    except VramchatError as e:
        assert "missing.txt" in str(e)
    else:
        raise AssertionError("a missing file must fail")


def test_with_partial_adds_the_question_once():
    rt = FakeRuntime()
    rt.ask("first?")
    data = jobs.with_partial(rt, "second?", "so far")
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["messages"][-1] == {"role": "assistant", "content": "so far", "partial": True}
    rt.messages.append({"role": "user", "content": "third?"})
    assert [m["content"] for m in jobs.with_partial(rt, "third?", "x")["messages"]][-2:] == ["third?", "x"]


def test_jobs_need_no_textual():
    code = "import sys, app.ui.jobs; assert 'textual' not in sys.modules, 'textual loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__('pathlib').Path(__file__).parents[1]))
