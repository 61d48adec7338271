"""`offload`'s quote following (offload/quotes.py): the token log, where a question or an
answer repeats the conversation, and the spans recalled in every head because of it."""
from __future__ import annotations

import pytest
import torch

import offload  # noqa: F401  (registers offload)
from app.runtime.adapter import Adapter
from offload import labels, quotes as Q
from offload.quotes import Quotes
from policies import Chunk
from test_offload import KeepNewest, cache_with, calibrate_tiny, run_chunks
from tiny import tiny_llama


@pytest.fixture(scope="module")
def chfile(tmp_path_factory):
    return calibrate_tiny(tmp_path_factory.mktemp("ch") / "tiny.safetensors")


def _distinct(n, seed=0, lo=1000):
    """n token ids with no repeats (no accidental quotes)."""
    return (torch.randperm(20000, generator=torch.Generator().manual_seed(seed))[:n] + lo).tolist()


# ---- matching, against brute force ------------------------------------------------------

def _brute_suffix(ids, longest):
    n = len(ids)
    best = None
    for length in range(Q.MIN_RUN, min(Q.MAX_RUN, longest) + 1):
        suf = ids[n - length:]
        ends = [p for p in range(length - 1, n - 1) if ids[p - length + 1:p + 1] == suf]
        if not ends:
            break
        best = ends
    return best


@pytest.mark.parametrize("seed", range(6))
def test_suffix_hits_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3 + seed, (200,), generator=g)  # small vocabularies: many repeats
    ids[150:170] = ids[40:60]  # and one long one
    for n in (5, 60, 170, 200):
        for longest in (2, 5, Q.MAX_RUN):
            got = Q._suffix_hits(ids[:n], longest)
            want = _brute_suffix(ids[:n].tolist(), longest)
            assert (got.tolist() if got is not None else None) == want, (n, longest)


@pytest.mark.parametrize("seed", range(4))
def test_ngram_hits_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 4, (160,), generator=g)
    start = 120
    runs = {tuple(ids[j:j + Q.NGRAM].tolist()) for j in range(start, 160 - Q.NGRAM + 1)}
    want = [p for p in range(Q.NGRAM - 1, start) if tuple(ids[p - Q.NGRAM + 1:p + 1].tolist()) in runs]
    assert Q._ngram_hits(ids, start).tolist() == want
    ids[60] = Q.UNKNOWN  # runs through an unknown id never match
    assert not set(range(60, 60 + Q.NGRAM)) & set(Q._ngram_hits(ids, start).tolist())


# ---- the log --------------------------------------------------------------------------

def test_log_takes_each_chunk_once_and_marks_what_it_never_saw():
    q = Quotes(64, 512)
    a = torch.tensor([5, 6, 7])
    q.observe(0, a)
    q.observe(0, a)  # the next layer, same chunk
    assert q.n == 3 and q.ids[:3].tolist() == [5, 6, 7]
    q.observe(5, torch.tensor([9]))  # two tokens read before the log existed
    assert q.ids[:6].tolist() == [5, 6, 7, Q.UNKNOWN, Q.UNKNOWN, 9]
    with pytest.raises(ValueError, match="asked to log from 2"):
        q.observe(2, torch.tensor([1, 2, 3, 4, 5]))
    assert not q.fill([1] * 5, 6)  # the count disagrees with what was read: left as is
    assert q.fill([1, 2, 3, 4, 5, 6], 7) is False  # ditto
    q2 = Quotes(64, 512)
    assert q2.fill(list(range(10)), 10) and q2.n == 10 and q2.ids[:10].tolist() == list(range(10))


# ---- spans ------------------------------------------------------------------------------

def _question(doc, quotes):
    """A question after `doc` quoting doc[a:b] for each (a, b), with fresh words around."""
    fresh = iter(_distinct(200, seed=9, lo=30000))
    out = [next(fresh) for _ in range(4)]
    for a, b in quotes:
        out += doc[a:b] + [next(fresh) for _ in range(5)]
    return out


def _read(q, ids, start=0, chunk=64, final=True):
    """Log ids as a prefill in chunks (the last one final)."""
    for s in range(0, len(ids), chunk):
        part = torch.tensor(ids[s:s + chunk])
        q.observe(start + s, part, True, s + chunk >= len(ids) and final)
    q.at_prefill_end()


def test_question_quoting_a_passage_brings_back_both_of_its_ends():
    doc = _distinct(1000)
    q = Quotes(128, 512)  # two spans at most
    _read(q, doc)
    ask = _question(doc, [(300, 309), (560, 569)])  # head and tail quoted (9 tokens: 4 six-runs)
    _read(q, ask, start=1000)
    assert sorted(q.spans) == [(300 - 16, 300 + 112), (560 - 16, 560 + 112)]  # from each quote's start
    # a lone 6-token repeat (what a chat template gives) is not a quote
    q2 = Quotes(128, 512)
    _read(q2, doc)
    _read(q2, _question(doc, [(300, 306)]), start=1000)
    assert q2.spans == []


def test_an_answer_that_copies_is_followed_and_one_that_does_not_is_left_alone():
    doc = _distinct(1000)
    q = Quotes(128, 512)
    _read(q, doc)
    ask = _question(doc, [(300, 309)])
    _read(q, ask, start=1000)
    n, moves = 1000 + len(ask), 0
    for i, t in enumerate(doc[300:700]):  # the answer copies doc[300:700]
        v = q.version
        q.observe(n + i, torch.tensor([t]), prefill=False)
        moved = q.at_step()
        assert moved == (q.version != v)
        moves += moved
        if i >= Q.MIN_RUN - 1:
            assert q.point == 300 + i  # reading exactly where the copy comes from
            nxt = 300 + i + 1  # the token the model must produce next, and 15 after it
            assert any(a <= nxt and nxt + 16 <= b for a, b in q.spans), (i, q.spans)
    assert 3 <= moves <= 6  # once per ~96 tokens of 400, not every step
    # a fresh answer never moves the spans
    q3 = Quotes(128, 512)
    _read(q3, doc)
    _read(q3, ask, start=1000)
    v = q3.version
    for i, t in enumerate(_distinct(50, seed=3, lo=50000)):
        q3.observe(n + i, torch.tensor([t]), prefill=False)
        assert not q3.at_step()
    assert q3.version == v and q3.point is None


def test_the_answer_does_not_match_through_the_chat_template():
    """Runs that reach back before the answer (its template) are no quote: an answer whose
    first tokens repeat a template plus one word must not pull spans."""
    doc = _distinct(500)
    tmpl = [7, 8, 9]
    doc[200:203] = tmpl
    doc[203] = 42  # "<template> 42" occurs in the document
    q = Quotes(128, 512)
    _read(q, doc + tmpl)  # the prompt ends in the template
    q.observe(503, torch.tensor([42]), prefill=False)  # the answer's first token is 42
    assert not q.at_step() and q.spans == []


# ---- in the model: spans come back in every layer and head ----------------------------

def test_copying_recalls_the_source_span_in_every_head(chfile):
    """A tiny model reads 200 tokens keeping the newest 40; the question quotes tokens
    50..58; the answer copies 50..120. In every layer and head the recall buffer holds
    the next source token at every step with quote on; the label scores alone do not."""
    doc = (torch.randperm(250, generator=torch.Generator().manual_seed(0))[:200] + 3).tolist()  # distinct
    ad = Adapter(tiny_llama(0), None)
    ask = [doc[i] for i in range(50, 59)]
    answer = doc[59:120]
    hits = {}
    for quote in (0, 16):
        cache = cache_with(ad, KeepNewest(40), {"recall": 32, "quote": quote, "channels_file": chfile})
        run_chunks(ad, cache, torch.tensor(doc + doc[:1]), [64, 128, 200, 201])  # the document's turn
        run_chunks(ad, cache, torch.tensor(ask), [len(ask)])  # the question's turn
        sp = cache.layers[0].spill
        assert (sp.quotes is None) == (quote == 0)
        assert sp.n == 200 - 40  # evicted at the non-final chunks: all but the newest 40
        n, good = 0, 0
        for i, t in enumerate(answer):
            c = Chunk(torch.tensor([t]), cache.next_position, "decode")
            ad.forward(c.input_ids, cache, c)
            nxt = 59 + i + 1
            for layer in cache.layers:
                n += layer.spill.recalled.shape[0]
                good += int((layer.spill.recalled == nxt).any(1).sum())
        hits[quote] = good / n
    assert hits[16] == 1.0
    assert hits[0] < 0.5


def test_spans_fit_half_the_buffer_and_quote_zero_is_off(chfile):
    ad = Adapter(tiny_llama(0), None)
    c = cache_with(ad, KeepNewest(40), {"recall": 100, "quote": 128, "channels_file": chfile})
    sp = c.layers[0].spill
    assert sp.quote == 50 and sp.quotes.max_spans == 1
    assert all(l.spill.quotes is sp.quotes for l in c.layers)  # one log for the cache
    assert cache_with(ad, KeepNewest(40), {"recall": 20, "channels_file": chfile}).layers[0].spill.quotes is None


class KeepNewestAlways(KeepNewest):
    """Also evicts after the final chunk: host rows arrive after the question's recall."""

    def keep(self, cache, chunk):
        n = cache.length
        return None if n <= self.budget else torch.arange(n - self.budget, n).expand(cache.info.n_kv_heads, -1)


@pytest.mark.parametrize("every", [0, 3])
def test_a_quote_move_ranks_with_the_questions_queries_not_one_decode_query(chfile, every):
    """When the spans move mid-answer, the rest of the buffer is ranked with the question's
    queries (one decode query lost a needle the question had found, BENCHMARKS.md), also
    after host rows arrived since (the ranking is redone with those queries); `every`
    re-scores with the decode query, as asked."""
    doc = (torch.randperm(250, generator=torch.Generator().manual_seed(1))[:200] + 3).tolist()
    ad = Adapter(tiny_llama(0), None)
    ask = doc[50:59]
    cache = cache_with(ad, KeepNewestAlways(40), {"recall": 32, "quote": 16, "every": every, "channels_file": chfile})
    run_chunks(ad, cache, torch.tensor(doc), [64, 128, 200])
    run_chunks(ad, cache, torch.tensor(ask), [len(ask)])
    sp = cache.layers[1].spill
    n_question = sp.n
    moves = 0
    for i, t in enumerate(doc[59:100]):
        v = sp.quotes.version
        c = Chunk(torch.tensor([t]), cache.next_position, "decode")
        ad.forward(c.input_ids, cache, c)
        cache.end_chunk(c)  # NOTE: evicts after decode steps too (this test selector)
        moves += sp.quotes.version != v
        # the question's 9 queries; with `every`, from its first re-scoring on, one step's query
        assert sp._qs.shape[1] == (len(ask) if every == 0 or i + 1 < every else 1)
        if sp._ranked_n == sp.n:
            want = labels.grouped_scores(sp._qs, sp.labels[:, : sp.n]).topk(32, 1).indices
            assert torch.equal(sp._ranked, want)
    assert moves >= 2 and sp.n > n_question


# ---- in the runtime: the log follows the conversation, also across a live conversion --------

def test_runtime_log_matches_the_conversation_and_survives_a_conversion(tmp_path):
    from test_reliability import _channels_file, _doc, _runtime
    rt = _runtime()
    ch = _channels_file(rt, tmp_path / "c.safetensors")
    spec = f"streaming:sinks=4,window=60+offload:recall=64,channels_file={ch}"  # converts in place
    doc = _doc(tmp_path / "doc.txt")
    rt.load_document(str(doc))  # read under `full`: no log
    res = rt.set_policy(spec)
    assert not res.reprefilled and rt.cache.layers[0].spill.n > 0  # evicted into the host tier
    log = rt.cache.layers[0].spill.quotes
    assert log is not None and log.n == rt.cache.seen  # taken from the conversation's text
    assert log.ids[: log.n].tolist() == rt.tokens(rt.cached_text)
    words = doc.read_text().split()
    rt.ask("Repeat: " + " ".join(words[100:112]), max_new_tokens=8)
    assert log.n == rt.cache.seen  # every token fed to the model, answers included
    prompt = rt.tokens(rt.cached_text[: rt._answer_start])  # (generated ids need not re-tokenize alike)
    assert log.ids[: len(prompt)].tolist() == prompt and log.n > len(prompt)
    assert log.spans and all(0 <= a < b <= log.n for a, b in log.spans)  # the quoted words were found
    assert not (log.ids[: log.n] == Q.UNKNOWN).any()
