"""A document read that stops part way (Esc, a crash) keeps what it read, and loading the
same file again resumes there (app/runtime/partial.py, doc_cache.read_document), to a cache
equal to one read without a stop: every tensor the cache file would hold (torch.equal),
the record of what it holds, and the next tokens' logits. The estimate of the time left
(app/runtime/eta.py) follows the recent chunks, on a clock the test sets.
"""
from __future__ import annotations

import threading

import pytest
import torch

from app.runtime.decode import Decoder
from app.runtime.doc_cache import DocCache, describe
from app.runtime.engine import Runtime
from app.runtime.eta import Eta, seconds
from app.runtime.types import Stopped
from policies import state
from tiny import tiny_pair, tiny_policy_files

CHUNK = 32
K = 5  # chunks read before the stop
SPECS = {
    "full": "full",
    "locret": "locret:budget=64,stabilizers=8,local=16,heads={heads}",
    "locret+offload": "locret:budget=64,stabilizers=8,local=0,heads={heads}+offload:recall=32,quote=16,"
                      "channels_file={ch}",
}
FIRST = "Apples are red; the sky is blue. " * 3
SECOND = " ".join(f"Line {i}: the pass key of room {i} is {1000 + 37 * i}." for i in range(24))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("files"))


@pytest.fixture
def docs(tmp_path):
    (tmp_path / "a.txt").write_text(FIRST)
    (tmp_path / "b.txt").write_text(SECOND)
    (tmp_path / "c.txt").write_text(SECOND.replace("pass key", "door code"))
    return tmp_path


def _rt(spec: str, dc: DocCache | None) -> Runtime:
    """A conversation with something before the document: a system prompt and a first document."""
    rt = Runtime.from_model(*tiny_pair(0), policy=spec, model_id="tiny", chunk_size=CHUNK)
    rt.set_system("Answer from the documents.")
    rt.doc_cache = dc
    return rt


def _started(spec, dc, docs) -> Runtime:
    rt = _rt(spec, dc)
    rt.load_document(str(docs / "a.txt"))
    return rt


def _stop_after(k: int):
    """-> (stop event, progress) that sets the stop once k chunks are read: the read stops before the next."""
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= k * CHUNK:
            stop.set()
    return stop, progress


def _same(a: Runtime, b: Runtime) -> None:
    ta, ma = state.state(a.cache)
    tb, mb = state.state(b.cache)
    assert ma == mb and sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].cpu(), tb[k].cpu()), k
    assert (a.held.text, a.held.ids, a.held.marks) == (b.held.text, b.held.ids, b.held.marks)
    assert a.messages == b.messages and a.cache.spec == b.cache.spec
    follow = [int(t) for t in torch.randint(4, 260, (20,), generator=torch.Generator().manual_seed(3))]
    for rt in (a, b):
        with Decoder(rt.adapter, rt.cache) as dec:
            rt._next = [dec.step(follow[0]).clone()]
        rt._next.append(rt.prefill(follow[1:]))
    for x, y in zip(a._next, b._next):
        assert torch.equal(x, y)


def _partials(dc: DocCache) -> list:
    return [e for e in dc.entries() if ".partial" in e.path.name]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_stopped_read_resumes_to_the_cache_of_a_whole_read(name, files, docs):
    spec = SPECS[name].format(**files)
    ref = _started(spec, None, docs)
    ref.load_document(str(docs / "b.txt"))

    dc = DocCache(docs / "cache", 1 << 30)
    rt = _started(spec, dc, docs)
    before = (list(rt.messages), rt.held.text, list(rt.held.ids))
    stop, progress = _stop_after(K)
    with pytest.raises(Stopped) as err:
        rt.load_document(str(docs / "b.txt"), progress=progress, stop=stop)
    n = len(ref.held.ids) - len(before[2])
    assert str(err.value) == f"stopped after {K * CHUNK:,} of {n:,} tokens; kept: load b.txt again to resume"
    # the conversation is as it was (the cache cut back to it, or emptied where it cannot be cut)
    assert rt.messages == before[0]
    assert rt.cache.seen == len(rt.held.ids) and before[2][:len(rt.held.ids)] == rt.held.ids
    (part,) = _partials(dc)
    assert f"part: {K * CHUNK:,}/{n:,}" in describe(part)

    seen = []
    info = rt.load_document(str(docs / "b.txt"), progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (K * CHUNK, n) and seen[-1] == (n, n)  # only the rest was read
    assert not info.from_cache and f"resumed at {K * CHUNK:,} of {n:,} tokens" in info.note
    assert info.tokens == n
    _same(rt, ref)
    assert _partials(dc) == [] and any(e.document == "b.txt" for e in dc.entries())  # whole now
    again = _started(spec, dc, docs)
    assert again.load_document(str(docs / "b.txt")).from_cache


@pytest.mark.parametrize("name", ["locret+offload", "auto"])
def test_a_checkpoint_lets_a_new_process_resume_after_a_crash(name, files, docs):
    spec = "auto" if name == "auto" else SPECS[name].format(**files)
    ref = _started(spec, None, docs)
    ref.load_document(str(docs / "b.txt"))
    dc = DocCache(docs / "cache", 1 << 30, checkpoint_s=0)  # a checkpoint after every chunk

    def crash(done: int, total: int) -> None:
        if done >= (K + 2) * CHUNK:
            raise RuntimeError("the process died here")
    rt = _started(spec, dc, docs)
    with pytest.raises(RuntimeError):
        rt.load_document(str(docs / "b.txt"), progress=crash)
    (part,) = _partials(dc)
    assert f"part: {(K + 2) * CHUNK:,}/" in describe(part)
    fresh = _started(spec, dc, docs)  # another process: the first document from the cache, the second resumed
    info = fresh.load_document(str(docs / "b.txt"))
    assert f"resumed at {(K + 2) * CHUNK:,} of" in info.note
    _same(fresh, ref)
    assert _partials(dc) == []


def test_a_partial_read_that_does_not_fit_is_read_from_the_start(docs):
    ref = _started("full", None, docs)
    ref.load_document(str(docs / "b.txt"))
    dc = DocCache(docs / "cache", 1 << 30)
    for doc in ("b.txt", "c.txt"):
        stop, progress = _stop_after(K)
        with pytest.raises(Stopped):
            _started("full", dc, docs).load_document(str(docs / doc), progress=progress, stop=stop)
    parts = {e.document: e.path for e in _partials(dc)}
    assert sorted(parts) == ["b.txt", "c.txt"]
    # another text's partial read under this one's name: its ids are not this text's
    parts["b.txt"].write_bytes(parts["c.txt"].read_bytes())
    rt = _started("full", dc, docs)
    info = rt.load_document(str(docs / "b.txt"))
    assert "the part read before was not used" in info.note and "made for other text" in info.note
    assert "resumed" not in info.note
    _same(rt, ref)
    # a file cut short: refused the same way
    stop, progress = _stop_after(K)
    with pytest.raises(Stopped):
        _started("full", dc, docs).load_document(str(docs / "c.txt"), progress=progress, stop=stop)
    (path,) = [e.path for e in _partials(dc) if e.document == "c.txt"]
    path.write_bytes(path.read_bytes()[:-100])
    info = _started("full", dc, docs).load_document(str(docs / "c.txt"))
    assert "the part read before was not used" in info.note and "resumed" not in info.note
    assert _partials(dc) == []


def test_a_read_stopped_before_its_first_chunk_keeps_nothing(docs):
    dc = DocCache(docs / "cache", 1 << 30)
    rt = _started("full", dc, docs)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped, match=r"^stopped after 0 of [\d,]+ tokens$"):
        rt.load_document(str(docs / "b.txt"), stop=stop)
    assert _partials(dc) == []


def test_checkpoints_cost_a_bounded_share_of_the_read(docs):
    from app.runtime.partial import Keeper
    now = [0.0]
    k = Keeper(DocCache(docs / "cache", 1 << 30, checkpoint_s=60, checkpoint_share=0.05), "k", "b.txt", "0",
               clock=lambda: now[0])
    k.begin()
    now[0] = 59.0
    assert not k.due()
    now[0] = 60.0
    assert k.due()
    k.last, k.took = 100.0, 10.0  # a write that took 10 s: the next after 200 s of reading, not 60
    now[0] = 299.0
    assert not k.due()
    now[0] = 300.0
    assert k.due()
    k.failed = "disk full"
    assert not k.due()


def _eta(costs, total, unit=100, start=0):
    """Reports every `unit` units from `start`, chunk i taking costs[i] seconds. -> the last (rate, left)."""
    t = [0.0]
    e = Eta(clock=lambda: t[0])
    assert e.update(start, total) == (None, None)  # where it starts: no rate yet
    out = None
    for i, c in enumerate(costs):
        t[0] += c
        out = e.update(start + (i + 1) * unit, total)
    return out


def test_eta_of_a_steady_read():
    rate, left = _eta([2.0] * 8, 10_000)
    assert rate == pytest.approx(50) and left == pytest.approx((10_000 - 800) / 50)


def test_eta_of_a_resumed_read_counts_only_what_is_left():
    # resumed at 900,000 of 1,000,000: the time since the start is not spent on the first 90 %
    rate, left = _eta([2.0, 2.0], 1_000_000, unit=2048, start=900_000)
    assert rate == pytest.approx(1024) and left == pytest.approx((1_000_000 - 904_096) / 1024)


def test_eta_follows_the_recent_chunks_not_the_average_since_the_start():
    rate, left = _eta([1.0] * 20 + [4.0] * 20, 8_000)  # the cost per chunk changed half way
    assert 1 / rate == pytest.approx(0.04, rel=0.05)  # seconds per unit now, not the 0.025 average
    assert left >= 40 * 4.0 * 0.95


def test_eta_of_a_cost_that_grows_with_position_is_exact():
    a, b, unit = 0.01, 1e-6, 2048  # seconds per token at position p: a + b p (attention over all of it)

    def cost(i):
        return unit * (a + b * (i + 0.5) * unit)
    n = 512  # chunks of 2048: a 1M-token read
    _, left = _eta([cost(i) for i in range(100)], n * unit, unit=unit)
    assert left == pytest.approx(sum(cost(i) for i in range(100, n)), rel=1e-6)


def test_eta_starts_again_with_new_work_and_says_times():
    t = [0.0]
    e = Eta(clock=lambda: t[0])
    e.update(0, 100)
    t[0] = 1.0
    assert e.update(10, 100)[1] == pytest.approx(9.0)
    assert e.update(0, 50) == (None, None)  # another read (a switch's re-read, then the document)
    assert [seconds(s) for s in (None, 42.4, 1500, 3900)] == ["–", "42 s", "25 min", "1 h 05 min"]
    with pytest.raises(ValueError, match="weight"):
        Eta(weight=0)


def test_the_app_says_a_stopped_read_in_the_transcript(tmp_path):
    from app.ui.transcript import Note
    from tests.ui.conftest import load_held, make_app, run, settle
    doc = tmp_path / "notes.md"
    doc.write_text("A line of notes. " * 400)

    async def main():
        app = make_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await load_held(pilot, app, doc)
            await pilot.press("escape")
            await settle(pilot, app)
            said = [str(n.render()) for n in app.query(Note)]
            assert any(s.startswith("Reading stopped: stopped while reading") for s in said), said
    run(main())


def test_a_stop_says_when_nothing_could_be_kept(docs):
    rt = _started("full", DocCache(docs / "cache", 0), docs)
    stop, progress = _stop_after(K)
    with pytest.raises(Stopped, match=r"^stopped after 160 of [\d,]+ tokens \(not kept: the document cache is off"):
        rt.load_document(str(docs / "b.txt"), progress=progress, stop=stop)
