"""The gauge reads memory on its own thread while the model thread reads, converts and
clears the cache: never an exception, never a cache caught half-changed."""
from __future__ import annotations

import itertools
import random
import threading

import pytest

from app.runtime.engine import Runtime
from tiny import tiny_pair, tiny_policy_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("memory"))


def _specs(files) -> list[str]:
    """One of each kind of change: lossless, quantized, evicting without and with scores,
    spilled to the host."""
    sel = f"locret:budget=48,stabilizers=8,local=16,heads={files['heads']}"
    return ["full", "kivi:group=16,residual=32", "streaming:sinks=4,window=40", sel,
            f"{sel}+offload:channels_file={files['ch']}"]


def _consistent(state) -> None:
    """A state taken between two changes: its parts add up."""
    assert sum(n for *_, n in state.kv) == sum(state.layers), (state.kv, state.layers)
    assert state.context.retained <= state.context.read


def _matches_the_cache(rt) -> None:
    """Between two jobs the published state is the cache's own count."""
    state, rep = rt.snapshot(), rt.memory()
    want: dict = {"gpu": {}, "host": {}}
    for (tier, kind), n in rt.cache.nbytes().items():
        want[tier][kind] = want[tier].get(kind, 0) + n
    assert rep.kv == want and rep.kv_total() == sum(rt.cache.nbytes().values())
    assert rep.kv_peak_bytes == rt.cache.peak_bytes
    assert state.policy == rt.policy and state.context == rt.context()
    assert list(state.layers) == [sum(layer.nbytes().values()) for layer in rt.cache.layers]


def test_memory_read_from_another_thread_never_sees_a_cache_mid_change(files, tmp_path):
    m, t = tiny_pair(0)
    rt = Runtime.from_model(m, t, model_id="tiny", chunk_size=32)
    words = random.Random(0).choices(["cache", "token", "layer", "budget", "head", "policy", "chunk"], k=120)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(words), encoding="utf-8")
    done, errors, reads = threading.Event(), [], [0]

    def gauge() -> None:
        while not done.is_set():
            try:
                rep = rt.memory()
                assert rep.kv_total() == rep.kv_total("gpu") + rep.kv_total("host")
                _consistent(rt.snapshot())
            except BaseException as e:  # noqa: BLE001 -- reported by the test thread
                errors.append(e)
                return
            reads[0] += 1

    reader = threading.Thread(target=gauge, daemon=True)
    reader.start()
    try:
        rt.load_document(str(doc))
        _matches_the_cache(rt)
        current = "full"
        for a, b in itertools.permutations(_specs(files), 2):
            for spec in (a, b):
                if spec != current:
                    rt.set_policy(spec)
                    current = spec
                    _matches_the_cache(rt)
        rt.ask("What does it say?", max_new_tokens=4)
        _matches_the_cache(rt)
        rt.clear()
        _matches_the_cache(rt)
        assert rt.memory().kv_peak_bytes == rt.cache.peak_bytes
    finally:
        done.set()
        reader.join()
    assert not errors, repr(errors[0])
    assert reads[0] > 0


def test_published_context_grows_chunk_by_chunk_while_a_document_is_read(tmp_path):
    """What the Context panel shows mid-read: where a state costs little beside a chunk (a
    clock of the test's own: a chunk takes a second, a state nothing), each progress call
    sees the tokens read so far."""
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=32)
    doc = tmp_path / "doc.txt"
    doc.write_text("The cache grows as the document is read, one chunk after another. " * 30)
    clock, seen = [0.0], []
    rt.published._clock = lambda: clock[0]
    rt.published.now()  # its last state built at 0.0 in no time

    def progress(done, total):
        seen.append((done, rt.snapshot().context.read))
        clock[0] += 1.0
    rt.load_document(str(doc), progress=progress)
    reads = [r for _, r in seen]
    assert len(set(reads)) > 3 and reads == sorted(reads)
    assert all(read == done for done, read in seen if done)  # the first read: nothing before it
    assert reads[-1] == rt.cache.seen


def test_a_costly_state_is_skipped_mid_read_and_the_last_chunk_is_shown(tmp_path):
    """Where building a state would cost more than its share of the read (published.SHARE: a
    million-token map beside a GPU's fast chunks), the chunks between go unpublished; what the
    read ends with is shown at its last chunk, before its last progress call."""
    rt = Runtime.from_model(*tiny_pair(0), model_id="tiny", chunk_size=32)
    doc = tmp_path / "doc.txt"
    doc.write_text("The cache grows as the document is read, one chunk after another. " * 30)
    clock, seen = [0.0], []
    ticks = iter([0.0, 1e6])  # the last state took a million seconds to build
    rt.published._clock = lambda: next(ticks, clock[0])
    rt.published.now()
    clock[0] = 1e6

    def progress(done, total):
        seen.append((done, rt.snapshot().context.read))
        clock[0] += 1.0
    rt.load_document(str(doc), progress=progress)
    assert len(seen) > 5 and {read for _, read in seen[:-1]} == {0}
    assert seen[-1] == (rt.cache.seen, rt.cache.seen)
