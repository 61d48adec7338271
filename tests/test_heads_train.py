"""`train-heads` for any model: hidden states streamed (disk or recomputed, the same heads),
stopped and resumed, kept in this machine's heads folder and found there by `locret`."""
from __future__ import annotations

import threading

import pytest
import torch

from app.heads.train import default_out, train_heads
from app.runtime.engine import Runtime
from app.runtime.types import Stopped, VramchatError
from policies import SpecError
from policies.locret import load_heads
from policies.registry import NoHeadsError
from tiny import tiny_arch, tiny_pair, tiny_tokenizer

KW = dict(steps=12, docs=3, val_docs=1, doc_tokens=120, d_r=8, warmup=2)


def _rt(arch="llama"):
    if arch == "llama":
        return Runtime.from_model(*tiny_pair(0), model_id=f"tiny-{arch}", chunk_size=32)
    return Runtime.from_model(tiny_arch(arch, vocab_size=len(tiny_tokenizer())), tiny_tokenizer(),
                              model_id=f"tiny-{arch}", chunk_size=32)


def test_recomputed_features_train_the_same_heads_as_cached_ones(tmp_path):
    rt = _rt()
    train_heads(rt, tmp_path / "disk", features_mode="disk", **KW)
    train_heads(rt, tmp_path / "re", features_mode="recompute", **KW)
    assert list((tmp_path / "disk" / ".features").glob("doc*.safetensors"))
    assert not list((tmp_path / "re" / ".features").glob("doc*.safetensors"))  # labels only
    a = load_heads(tmp_path / "disk" / "heads.safetensors").state_dict()
    b = load_heads(tmp_path / "re" / "heads.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_stopped_run_resumes_where_it_stopped(tmp_path):
    rt = _rt()
    stop, seen = threading.Event(), []

    def progress(phase, done, total):
        seen.append((phase, done))
        if phase == "steps" and done == 5:
            stop.set()
    with pytest.raises(Stopped, match="resume"):
        train_heads(rt, tmp_path, progress=progress, stop=stop, **KW)
    assert not (tmp_path / "heads.safetensors").exists()
    seen.clear()
    train_heads(rt, tmp_path, steps=KW["steps"], docs=3, val_docs=1, doc_tokens=120, d_r=8, warmup=2,
                progress=lambda p, d, t: seen.append((p, d)))
    assert (tmp_path / "heads.safetensors").is_file()
    # documents are rebuilt (cheap), features come from the folder, and steps go on from there
    assert [d for p, d in seen if p == "steps"][0] > 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_heads_trained_by_default_are_found_next_time(arch):
    """No heads ship for the model: `locret` is refused; `train-heads` without --out keeps
    them in this machine's folder, and the next runtime's `locret` finds them there."""
    with pytest.raises(NoHeadsError, match="no retaining heads"):
        _rt(arch).set_policy("locret")
    rt = _rt(arch)
    card = train_heads(rt, None, **KW)
    assert card["out"] == str(default_out(rt.adapter.info))
    fresh = _rt(arch)
    fresh.set_policy("locret:budget=32,stabilizers=8")
    assert fresh.cache.layers[0].selector.source == str(default_out(rt.adapter.info) / "heads.safetensors")


def test_models_of_one_shape_keep_their_own_folders_and_a_new_recipe_starts_over():
    """A base model and its fine-tune share shapes, never training features: each has its own
    folder; in that folder a run with other settings starts over (a given --out refuses)."""
    a = _rt()
    b = Runtime.from_model(*tiny_pair(1), model_id="tiny-llama-finetune", chunk_size=32)
    assert default_out(a.adapter.info) != default_out(b.adapter.info)
    train_heads(a, None, **KW)
    train_heads(b, None, **{**KW, "steps": 6})  # would have read a's features in a shared folder
    card = train_heads(a, None, **{**KW, "d_r": 4})
    assert load_heads(default_out(a.adapter.info) / "heads.safetensors").d_r == 4
    assert card["hyper_parameters"]["d_r"] == 4


def test_a_given_out_with_other_settings_is_refused(tmp_path):
    rt = _rt()
    train_heads(rt, tmp_path, **KW)
    with pytest.raises(VramchatError, match="give another --out"):
        train_heads(rt, tmp_path, **{**KW, "d_r": 4})


def test_no_heads_is_its_own_error_and_leaves_auto_on():
    """A runtime under `auto` asked for `locret` with no heads: a NoHeadsError (a SpecError),
    and nothing changed: still auto, the same cache."""
    rt = Runtime.from_model(*tiny_pair(0), policy="auto", model_id="tiny-no-heads", chunk_size=32)
    cache = rt.cache
    with pytest.raises(NoHeadsError) as e:
        rt.set_policy("locret:budget=32,stabilizers=8")
    assert isinstance(e.value, SpecError) and "train-heads" in str(e.value)
    assert rt.auto and rt.cache is cache
    with pytest.raises(SpecError) as e:  # another refusal is not "no heads"
        rt.set_policy("locret:heads=/no/such/heads.safetensors")
    assert not isinstance(e.value, NoHeadsError) and rt.auto


def test_the_cli_bar_takes_its_rate_from_the_phase_s_reports():
    """`train-heads`' bar: a phase's first report (where it starts) has no rate yet (ETA ?),
    later ones have Eta's, and the last says done; a new phase starts its own estimate."""
    import io
    from app.heads.cli import Progress
    out = io.StringIO()
    bar = Progress(out)
    bar("features", 0, 10)
    assert "0/10" in out.getvalue() and "ETA ?" in out.getvalue()
    bar("features", 10, 10)
    assert out.getvalue().endswith("done   \n")
    assert bar.eta.left == 0.0  # the phase's second report: Eta's estimate
    bar("steps", 4, 8)  # a resumed phase: part way, a new estimate
    assert bar.eta.left is None and "4/8" in out.getvalue().splitlines()[-1]
