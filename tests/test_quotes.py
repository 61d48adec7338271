"""`offload`'s quote following (offload/quotes.py): the token log, where a question or an
answer repeats the conversation, and the spans recalled in every head because of it."""
from __future__ import annotations

import pytest
import torch

from app.runtime.adapter import Adapter
from app.runtime.decode import Decoder
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
    talk = [(30, 45), (100, 130)]  # runs ending in earlier questions and answers never match
    assert Q._ngram_hits(ids, start, talk).tolist() == [p for p in want if not (30 <= p < 45 or 100 <= p < 120)]
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


def _read(q, ids, start=0, chunk=64):
    """Log ids as a prefill in chunks (the last one final)."""
    for s in range(0, len(ids), chunk):
        part = torch.tensor(ids[s:s + chunk])
        q.observe(start + s, part, True, s + chunk >= len(ids))
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
        assert not q3.at_step() and q3.point is None  # nothing it says was said before
    assert q3.version == v and q3.point is None


def test_the_answer_does_not_match_through_the_chat_template():
    """Runs that reach back before the answer (into its template) are no quote: an answer
    whose first five tokens follow the template in the document pulls no span (five
    answer tokens are under MIN_RUN; with the template they would be eight)."""
    doc = _distinct(500)
    tmpl, said = [7, 8, 9], [42, 43, 44, 45, 46]
    doc[200:208] = tmpl + said  # "<template> 42 43 44 45 46" occurs in the document
    q = Quotes(128, 512)
    _read(q, doc)
    _read(q, _distinct(20, seed=5, lo=30000) + tmpl, start=500)  # the question ends in the template
    for i, t in enumerate(said):
        q.observe(523 + i, torch.tensor([t]), prefill=False)
        assert not q.at_step() and q.spans == [] and q.point is None
    q.observe(528, torch.tensor([47]), prefill=False)  # a sixth token the document does not have
    assert not q.at_step()
    # and it can fail: the same six answer tokens inside the document are followed
    doc[300:306] = said + [47]
    q2 = Quotes(128, 512)
    _read(q2, doc)
    _read(q2, _distinct(20, seed=5, lo=30000) + tmpl, start=500)
    for i, t in enumerate(doc[300:306 + Q.CONFIRM]):  # found at the sixth, then confirmed
        q2.observe(523 + i, torch.tensor([t]), prefill=False)
        assert q2.at_step() == (i == 5 + Q.CONFIRM)
    assert q2.point == 305 + Q.CONFIRM and q2.spans == [(305 + Q.CONFIRM - 16, 305 + Q.CONFIRM + 112)]


def test_a_common_run_says_nothing_and_rare_moves_on_repetitive_text():
    """On low-vocabulary text every 6-token run occurs in many places: an answer that does
    not copy moves the spans rarely, and a run found in more than MAX_ENDS places never."""
    g = torch.Generator().manual_seed(0)
    doc = (torch.randint(0, 3, (4000,), generator=g) + 10).tolist()
    q = Quotes(128, 512)
    _read(q, doc)
    _read(q, [99, 98, 97], start=4000)
    moves = 0
    for i, t in enumerate((torch.randint(0, 3, (200,), generator=g) + 10).tolist()):
        q.observe(4003 + i, torch.tensor([t]), prefill=False)
        moves += q.at_step()
    assert moves <= 15  # chance matches of 6+ tokens are everywhere here; continuing ones are rare
    ones = [10] * 40
    q3 = Quotes(128, 512)
    _read(q3, [10] * 400)  # any run of 10s occurs hundreds of times
    _read(q3, [99], start=400)
    for i, t in enumerate(ones):
        q3.observe(401 + i, torch.tensor([t]), prefill=False)
        assert not q3.at_step() and q3.point is None  # too common: no reading point at all


def test_a_question_over_several_chunks_is_looked_up_from_its_first_chunk():
    doc = _distinct(1000)
    q = Quotes(128, 512)
    _read(q, doc)
    ask = doc[300:309] + _distinct(100, seed=4, lo=30000)  # the quote sits in the first chunk
    _read(q, ask, start=1000, chunk=32)
    assert q.spans == [(300 - 16, 300 + 112)]


def test_suffix_hits_stop_at_an_unknown_id():
    ids = torch.tensor([5, 6, 7, 8, 9, 10, 11, 1, 5, 6, 7, 8, 9, 10, 11])
    assert Q._suffix_hits(ids).tolist() == [6]
    ids[8] = Q.UNKNOWN  # the run would need it: 6 tokens (MIN_RUN) still match
    assert Q._suffix_hits(ids).tolist() == [6]
    ids[9] = Q.UNKNOWN  # now only 5 known tokens end the log: under MIN_RUN
    assert Q._suffix_hits(ids) is None


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
    for quote in (0, 32):
        cache = cache_with(ad, KeepNewest(40), {"recall": 64, "quote": quote, "channels_file": chfile})
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
    assert hits[32] == 1.0
    assert hits[0] < 0.5


def test_spans_fit_half_the_buffer_and_quote_zero_is_off(chfile):
    ad = Adapter(tiny_llama(0), None)
    c = cache_with(ad, KeepNewest(40), {"recall": 100, "quote": 128, "channels_file": chfile})
    sp = c.layers[0].spill
    assert sp.quote == 50 and sp.quotes.max_spans == 1
    assert all(l.spill.quotes is sp.quotes for l in c.layers)  # one log for the cache
    assert cache_with(ad, KeepNewest(40), {"recall": 20, "channels_file": chfile}).layers[0].spill.quotes is None
    assert cache_with(ad, KeepNewest(40), {"recall": 512, "quote": 0, "channels_file": chfile}).layers[0].spill.quotes is None


class KeepNewestAlways(KeepNewest):
    """Also evicts after the final chunk: host rows arrive after the question's recall."""

    def select(self, cache, chunk):
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
        # the ranking is the top 32 by those queries over the host rows it saw
        want = labels.grouped_scores(sp._qs, sp.labels[:, : sp._ranked_n]).topk(32, 1).indices
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
    assert log.ids[: log.n].tolist() == rt.tokens(rt.held.text)
    words = doc.read_text().split()
    question = "Repeat: " + " ".join(words[100:112])
    rt.sync(rt.conv.render(rt.tok, pending=[{"role": "user", "content": question}]))  # the prefill alone
    turn = rt.tokens(question)
    runs = {tuple(turn[i:i + Q.NGRAM]) for i in range(len(turn) - Q.NGRAM + 1)}
    assert log.spans  # each span opens 16 tokens before a run of the question found in the document
    assert all(tuple(log.ids[a + 16:a + 16 + Q.NGRAM].tolist()) in runs and b - a == 32 for a, b in log.spans)
    n0 = log.n
    assert n0 == rt.cache.seen and log.ids[:n0].tolist() == rt.tokens(rt.held.text)  # the question's turn too
    with Decoder(rt.adapter, rt.cache) as dec:
        for t in (41, 42, 43):
            dec.step(t)
    assert log.n == rt.cache.seen == n0 + 3 and log.ids[n0:log.n].tolist() == [41, 42, 43]  # decode steps too
    assert not (log.ids[: log.n] == Q.UNKNOWN).any()


# ---- terms: the words a question names a fact by ------------------------------------------

def _pair_question(doc, pairs, fresh_seed=9):
    """A question of fresh tokens holding each (a, b) pair of doc tokens."""
    fresh = iter(_distinct(200, seed=fresh_seed, lo=30000))
    out = [next(fresh) for _ in range(3)]
    for p in pairs:
        out += list(p) + [next(fresh) for _ in range(3)]
    return out


def test_terms_find_a_rare_word_pair_and_ignore_common_ones_specials_and_earlier_talk():
    doc = _distinct(1000)
    doc[700:702] = doc[300:302]  # the pair at 300 occurs twice: weight 1/2 each, one span
    for p in (100, 400, 600):  # a pair found three times names nothing
        doc[p:p + 2] = [7, 8]
    q = Quotes(128, 512, terms=True, special=(5,))
    _read(q, doc)
    _read(q, _pair_question(doc, [(doc[500], doc[501]), (7, 8)]), start=1000)
    assert q.spans == [(500 - 16, 500 + 112)]  # from the pair on
    # the twice-found pair: two hits of weight 1/2 far apart weigh 1/2 each: no span
    q2 = Quotes(128, 512, terms=True)
    _read(q2, doc)
    _read(q2, _pair_question(doc, [(doc[300], doc[301])]), start=1000)
    assert q2.spans == []
    # a pair holding a special id never matches; terms off: the pair is no quote
    doc3 = _distinct(1000)
    doc3[500] = 5
    for terms, special, want in ((True, (5,), []), (True, (), [(500 - 16, 500 + 112)]), (False, (), [])):
        q3 = Quotes(128, 512, terms=terms, special=special)
        _read(q3, doc3)
        _read(q3, _pair_question(doc3, [(5, doc3[501])]), start=1000)
        assert q3.spans == want, (terms, special)
    # a pair with a line break in it is the chat template's ("user" + line break), not words
    doc4 = _distinct(1000)
    doc4[21] = 10  # the conversation's first "user\n"
    for newline, want in (((10,), []), ((), [(20 - 16, 20 + 112)])):
        q6 = Quotes(128, 512, terms=True, newline=newline)
        _read(q6, doc4)
        _read(q6, _pair_question(doc4, [(doc4[20], 10)]), start=1000)
        assert q6.spans == want, newline
    # a pair an earlier question held is talk, not the document
    q4 = Quotes(128, 512, terms=True)
    _read(q4, doc)
    first = _pair_question(doc, [(doc[500], doc[501])], fresh_seed=1)
    _read(q4, first, start=1000)
    n = 1000 + len(first)
    for i, t in enumerate(_distinct(5, seed=4, lo=60000)):  # its answer
        q4.observe(n + i, torch.tensor([t]), prefill=False)
        q4.at_step()
    n += 5
    again = _pair_question(first, [(first[0], first[1])], fresh_seed=2)  # names a pair of the first question only
    _read(q4, again, start=n)
    assert q4.spans == [] and q4.talk == [(1000, n + len(again))]
    st, meta = q4.state()
    q5 = Quotes(128, 512, terms=True)
    q5.restore(st, meta)
    assert q5.talk == q4.talk


def test_a_question_repeating_an_earlier_questions_words_quotes_nothing():
    doc = _distinct(1000)
    q = Quotes(128, 512)
    _read(q, doc)
    ending = _distinct(8, seed=6, lo=50000)  # "Answer with the number only."
    first = _question(doc, [(300, 309)]) + ending  # quotes the document: a span
    _read(q, first, start=1000)
    assert q.spans == [(300 - 16, 300 + 112)]
    n = 1000 + len(first)
    for i, t in enumerate(_distinct(5, seed=4, lo=60000)):  # its answer
        q.observe(n + i, torch.tensor([t]), prefill=False)
        q.at_step()
    n += 5
    again = _distinct(4, seed=5, lo=40000) + ending  # the first question's closing words again
    _read(q, again, start=n)
    assert q.spans == []  # was a span on the first question itself
    assert q.talk == [(1000, n + len(again))]


def test_the_question_is_the_last_message_and_of_a_long_one_its_last_paragraph():
    """A prefill holding a document's tail (two pairs found earlier near 200: heavier than the
    question's one pair) and, after a paragraph break, the question: the tail names nothing
    when the message is longer than QUESTION; the template's own paragraph break after the
    question (no text after it) is not where the question starts. A short message is all
    question; an earlier message in the same prefill (before a special token) is not."""
    NL, PARA, SPECIAL = 9, 10, (5, 6)
    words = dict(special=SPECIAL, newline=[NL], paragraph=[PARA])
    doc = _distinct(1000)
    tail = _distinct(Q.QUESTION + 100, seed=3, lo=40000)
    tail[-60:-58], tail[-30:-28] = doc[200:202], doc[210:212]  # inside the last QUESTION tokens
    question = _pair_question(doc, [(doc[500], doc[501])])
    end = [5, 6, 7, PARA]  # Llama 3's "<eot><hdr>assistant<hdr>\n\n"
    named, both = [(500 - 16, 500 + 112)], [(200 - 16, 200 + 112), (500 - 16, 500 + 112)]
    for turn, kw, want in ((tail + [NL, NL] + question + end, words, named),  # two line breaks
                           (tail + [PARA] + question + end, words, named),  # one token
                           (tail + [NL, NL] + question + end, {}, both),  # breaks unknown: the last QUESTION
                           (tail + [NL] + question + end, words, both),  # a line break only
                           (tail[-100:] + [NL, NL] + question + end, words, both),  # a short message
                           (tail[-100:] + [5, 7] + question + end, words, named)):  # an earlier message
        q = Quotes(128, 1024, terms=True, **kw)
        _read(q, doc)
        _read(q, turn, start=1000)
        assert sorted(q.spans) == want, (turn[-len(question) - 6:], kw)


def test_rank_off_recalls_the_named_passage_only_and_nothing_when_nothing_is_named(chfile):
    """Keeping the newest 40 of 200 tokens, a question naming the pair at 80..81 gets exactly
    the host rows of its span back in every head with rank=off; rank=on fills the rest of the
    buffer from the label ranking; a question naming nothing recalls nothing with rank=off.
    rank=off needs no channels (the tiny model has none) and keeps no labels."""
    doc = (torch.randperm(250, generator=torch.Generator().manual_seed(0))[:200] + 3).tolist()
    ad = Adapter(tiny_llama(0), None)
    a, b, c = [t for t in range(3, 253) if t not in doc][:3]  # ids the document never holds
    span = set(range(80 - 4, 80 + 28))  # quote=32: [p - 4, p + 28) from the pair on
    for rank, ask, want in ((False, [doc[80], doc[81], a], span), (True, [doc[80], doc[81], a], None),
                            (False, [a, b, c], set())):
        opts = {"recall": 64, "quote": 32, "terms": True, "rank": rank}
        cache = cache_with(ad, KeepNewest(40), opts | ({"channels_file": chfile} if rank else {}))  # rank=off: none
        run_chunks(ad, cache, torch.tensor(doc + doc[:1]), [64, 128, 200, 201])
        run_chunks(ad, cache, torch.tensor(ask), [len(ask)])
        for layer in cache.layers:
            got = [set(r.tolist()) for r in layer.spill.recalled] if layer.spill.m else [set()] * ad.info.n_kv_heads
            for g in got:
                if want is None:
                    assert span <= g and len(g) == 64
                else:
                    assert g == want
            assert (("gpu", "labels") in layer.spill.nbytes()) == rank


def test_rank_off_fills_a_head_with_fewer_span_rows_from_the_rows_nearest_the_span():
    """Heads hold different host rows under a per-head selector: the buffer takes as many rows
    as the fullest head has inside the spans; a head with fewer takes the rows nearest a span."""
    doc = (torch.randperm(250, generator=torch.Generator().manual_seed(0))[:200] + 3).tolist()
    ad = Adapter(tiny_llama(0), None)
    a = next(t for t in range(3, 253) if t not in doc)
    cache = cache_with(ad, KeepNewest(40), {"recall": 64, "quote": 32, "terms": True, "rank": False})
    run_chunks(ad, cache, torch.tensor(doc + doc[:1]), [64, 128, 200, 201])
    run_chunks(ad, cache, torch.tensor([doc[80], doc[81], a]), [3])
    sp = cache.layers[0].spill
    assert sp.quotes.spans == [(76, 108)]
    with torch.inference_mode():  # as the forward runs it
        hpos = sp.hpos[:, :sp.n]
        moved = (hpos[1] >= 100) & (hpos[1] < 108)  # head 1 lost 100..107 (held elsewhere): 24 rows inside
        hpos[1, moved] = 150 + torch.arange(int(moved.sum()))  # far from the span
        sp.row_at = None  # (rows moved behind the spill's back: its row map is rebuilt)
        sp._map_rows()
        sp._recall_spans(cache.layers[0])
    assert sp.m == 32 and set(sp.recalled[0].tolist()) == set(range(76, 108))
    assert set(sp.recalled[1].tolist()) == set(range(72, 100)) | set(range(108, 112))  # and the 8 nearest it


def test_terms_and_rank_off_need_quote_spans():
    from policies import SpecError, parse_spec
    for opts in ("terms=on,quote=0", "rank=off,quote=8"):
        with pytest.raises(SpecError, match="must be 16 or more"):
            parse_spec(f"streaming+offload:{opts}")
    # spans take at most half the buffer: a small recall leaves none, said, not silently recall nothing
    with pytest.raises(SpecError, match=r"at most half of `recall` \(20\): 10 tokens; `recall` must be 32 or more"):
        parse_spec("streaming+offload:rank=off,recall=20")
    parse_spec("streaming+offload:terms=on,rank=off")
    parse_spec("streaming+offload:rank=off,recall=32")
