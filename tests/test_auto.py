"""`auto`'s decision table on the tiny model (window 512), memory and files given."""
from __future__ import annotations

import shutil

import pytest

from app.runtime.auto import RECALL, RECALLS, budgeted, choose
from app.runtime.engine import Runtime
from policies.files import user_folder
from tiny import tiny_pair, tiny_policy_files

BIG = (1 << 40, 1 << 40)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    """The tiny runtime, with heads and channels trained "on this machine" for it."""
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=32)
    info = rt.adapter.info
    made, root = tmp_path_factory.mktemp("made"), tmp_path_factory.mktemp("data")
    files = tiny_policy_files(made)
    for kind, key in (("heads", "heads"), ("channels", "ch")):
        folder = user_folder(root, kind, info)
        folder.mkdir(parents=True)
        shutil.copy(files[key], folder / f"{kind}.safetensors")
    info.search_dirs = (root,)
    return rt


TINY_RECALL = "streaming:window=128+offload:recall=64,quote=32,terms=on,rank=off"  # canonical: options in order


def test_budgets_follow_the_window():
    assert RECALLS == "offload:terms=on,rank=off" and RECALL == "streaming:window=2048+offload:terms=on,rank=off"
    assert budgeted(True, 8192) == budgeted(True, 131072) == ["locret", "locret+offload:terms=on,rank=off"]
    assert budgeted(False, 8192) == budgeted(False, 131072) == [RECALL]
    assert budgeted(False, 4096) == ["streaming:window=1024+offload:terms=on,rank=off"]
    assert budgeted(True, 2048) == ["locret:budget=512,stabilizers=128,local=64",
                                    "locret:budget=512,stabilizers=128,local=64+offload:terms=on,rank=off,"
                                    "recall=256,quote=128"]


@pytest.mark.parametrize("tokens,heads,memory,spec,why", [
    (100, False, BIG, "full", "inside the native window of 512"),
    (100, True, (950_000, 1 << 40), "kivi:group=16", "2-bit values do"),
    (100, True, (850_000, 1 << 40), "offload", "only in host memory"),
    # the tiny model's window is 512: a quarter of it kept, an eighth recalled (no channels needed)
    (900, True, BIG, "locret:budget=128,stabilizers=32,local=16+offload:recall=64,quote=32,terms=on,rank=off",
     "host memory for recall"),
    # on a CPU (one memory): the full-precision host tier does not fit, KIVI codes do; then neither
    (900, True, (1_500_000, None), "locret:budget=128,stabilizers=32,local=16+offload:recall=64,quote=32,terms=on,"
     "rank=off,kbits=8,vbits=4", "as 8-bit keys and 4-bit values"),
    (900, True, (1_100_000, None), "locret:budget=128,stabilizers=32,local=16", "retaining heads exist"),
    (900, False, BIG, TINY_RECALL, "no retaining heads for this model (train them: `main.py train-heads`)"),
    (900, None, BIG, "locret:budget=128,stabilizers=32,local=16+offload:recall=64,quote=32,terms=on,rank=off",
     "retaining heads exist"),  # looked up: the fixture's, trained "on this machine"
])
def test_auto_picks_the_cheapest_stack_that_holds_the_conversation(rt, tokens, heads, memory, spec, why):
    got = choose(rt, tokens, answer=64, heads=heads, memory=memory)
    assert got.spec == spec and why in got.reason, got


def test_auto_codes_the_host_tier_when_full_precision_would_not_fit_the_host(rt):
    """Host memory between what the coded host tier (`HOST_BITS`) and the full-precision one
    need at the end of the read: auto keeps recall, with the evicted tokens as KIVI codes; less
    host memory than the coded tier needs: no recall (and never past the host's memory)."""
    from app.runtime import estimate
    from app.runtime.describe import model_of
    tokens, answer = 20_000, 64
    fp = "locret:budget=128,stabilizers=32,local=16+offload:recall=64,quote=32,terms=on,rank=off"
    coded = fp + ",kbits=8,vbits=4"
    host = {spec: estimate.estimate(model_of(rt), spec, tokens, rt.chunk_size, answer, "fp32", "cuda",
                                    exact=False)["kv_host"] for spec in (fp, coded)}
    assert 0 < 3 * host[coded] < host[fp]  # 8-bit keys, 4-bit values, scales and the id log, vs fp32 rows
    got = choose(rt, tokens, answer=answer, heads=True, memory=(1 << 40, (host[fp] + host[coded]) // 2))
    assert got.spec == coded and "8-bit keys and 4-bit values" in got.reason, got
    got = choose(rt, tokens, answer=answer, heads=True, memory=(1 << 40, host[fp]))
    assert got.spec == fp and "8-bit" not in got.reason, got
    got = choose(rt, tokens, answer=answer, heads=True, memory=(1 << 40, host[coded] - 1))
    assert got.spec == "locret:budget=128,stabilizers=32,local=16", got


def test_auto_past_the_window_never_picks_a_stack_that_keeps_positions(rt):
    """Short of memory past the window: quantize the budgeted stack, never `full`/`kivi`."""
    got = choose(rt, 5000, answer=64, heads=False, memory=(1, None))
    assert got.spec == "streaming:window=128+kivi+offload:recall=64,quote=32,terms=on,rank=off", got


def _words(n: int, seed: int) -> str:
    import random
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kappa", "omega"]) for _ in range(n))


def _doc(tmp_path, name: str, n: int, seed: int = 0):
    p = tmp_path / name
    p.write_text(_words(n, seed))
    return str(p)


def test_auto_reads_inside_the_window_as_full_then_switches_before_passing_it(tmp_path):
    """The tiny model's window is 512: a short document stays `full`; the next one would
    pass the window, so `auto` switches first (a note says so before reading) to a stack
    that compacts positions, and the conversation still answers."""
    rt = Runtime.from_model(*tiny_pair(0), policy="auto", model_id="tiny", chunk_size=32)
    seen_at_note = []
    rt.on_note = lambda text: seen_at_note.append((rt.cache.seen, text))
    rt.load_document(_doc(tmp_path, "a.txt", 40))
    assert rt.policy == "full" and rt.auto_choice.spec == "full" and not seen_at_note
    seen = rt.cache.seen
    rt.load_document(_doc(tmp_path, "b.txt", 700, 1))
    assert rt.policy.startswith("streaming:window=128+offload") and rt.cache.evicts
    (at, text), = seen_at_note
    assert at == seen and "auto chose `streaming:window=128" in text and "pass the native window of 512" in text
    assert rt.policy_label == f"auto: {rt.policy}"
    res = rt.ask("which word comes first?", max_new_tokens=3)
    assert res.new_tokens >= 1 and rt.cache.length < rt.cache.seen  # positions compacted


def test_a_policy_that_keeps_positions_warns_before_passing_the_window(tmp_path):
    rt = Runtime.from_model(*tiny_pair(0), policy="full", model_id="tiny", chunk_size=32)
    got = []
    rt.on_note = lambda text: got.append((rt.cache.seen, text))
    rt.load_document(_doc(tmp_path, "a.txt", 40))
    assert not got
    rt.load_document(_doc(tmp_path, "b.txt", 700, 1))
    (at, text), = got
    assert at > 0 and at < rt.cache.seen  # said before the document was read
    assert text.startswith("warning:") and "native window of 512" in text and "`auto`" in text
    assert rt.notes == [text]


def test_choosing_auto_live_and_leaving_it(tmp_path):
    rt = Runtime.from_model(*tiny_pair(0), policy="streaming:window=64", model_id="tiny", chunk_size=32)
    rt.load_document(_doc(tmp_path, "a.txt", 40))
    res = rt.set_policy("auto")
    assert rt.auto and rt.policy == "full" and res.new_policy == "full"
    rt.set_policy("kivi:group=16")
    assert not rt.auto and rt.policy == "kivi:group=16"


def test_questions_under_auto_convert_nothing_once_it_chose(tmp_path):
    """Past the window auto chose a compressing stack; the questions after it find the same
    choice and the cache untouched: no note, no conversion (its spec and the cache's are one
    canonical string, the form the note and the panels show)."""
    rt = Runtime.from_model(*tiny_pair(0), policy="auto", model_id="tiny", chunk_size=32)
    rt.load_document(_doc(tmp_path, "long.txt", 700, 2))
    (note,) = rt.notes
    assert rt.cache.evicts and f"auto chose `{rt.policy}` (was `full`)" in note
    assert "=true" not in rt.policy and "terms=on,rank=off" in rt.policy
    cache, policy = rt.cache, rt.policy
    for q in ("which word comes first?", "and which comes last?"):
        rt.ask(q, max_new_tokens=3)
        assert rt.notes == [note] and rt.cache is cache and rt.policy == policy
        assert rt.auto_choice.spec == policy


def test_leaving_an_evicting_policy_says_what_it_dropped_only_when_it_dropped_some(tmp_path):
    rt = Runtime.from_model(*tiny_pair(0), policy="streaming:window=64", model_id="tiny", chunk_size=32)
    assert rt.set_policy("full").message == "converted in place"  # an empty cache lost nothing
    rt.set_policy("streaming:window=64")
    rt.load_document(_doc(tmp_path, "a.txt", 300))
    assert rt.cache.length < rt.cache.seen
    assert "keeps only the tokens the old policy retained" in rt.set_policy("full").message
