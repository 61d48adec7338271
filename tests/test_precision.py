"""Recall precision per question (app/bench/precision.py): exact numbers on spills whose
ranking the test lays out, and a real question on the tiny model under locret+offload."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from app.bench import precision
from offload import labels
from offload.spill import OffloadSpill
from tiny import tiny_pair, tiny_policy_files

ASKED, OTHER, THIRD = {120, 121}, {130, 131}, {140}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_policy_files(tmp_path_factory.mktemp("precision"), max_position_embeddings=1024)


def _runtime(spec: str = "full"):
    from app.runtime.engine import Runtime
    m, t = tiny_pair(0, max_position_embeddings=1024)
    return Runtime.from_model(m, t, policy=spec, model_id="tiny", chunk_size=128)


def _spill(info, ch: str, quote: int, n: int, gen, pool: int = 1) -> OffloadSpill:
    """A spill with n host rows of random keys, values and labels (conversation indices 0..n-1)."""
    sp = OffloadSpill(info, 0, 32, 8, 0, ch, pool=pool, quote=quote)
    OffloadSpill.link([sp])
    h, d = info.n_kv_heads, info.head_dim
    sp._put(torch.randn(h, n, d, generator=gen), torch.randn(h, n, d, generator=gen),
            torch.randn(h, n, sp.ch.shape[1], generator=gen), torch.arange(n).expand(h, -1))
    return sp


def _lay_out(sp: OffloadSpill, q: torch.Tensor, at: list[dict[int, int]], seed: int = 0) -> None:
    """Give host rows the conversation indices that put at[h][rank] = index in head h's
    ranking by q's label scores; the other rows get indices of no fact."""
    n = sp.n
    s = sp.labels.scores(labels.group_queries(q, sp.ch), n)  # [Hkv, n]
    rng = random.Random(seed)
    for h, fixed in enumerate(at):
        free = [p for p in range(60, 200) if p not in ASKED | OTHER | THIRD]
        rng.shuffle(free)
        for rank, row in enumerate(s[h].argsort(descending=True).tolist()):
            sp.hpos[h, row] = fixed[rank] if rank in fixed else free.pop()


@pytest.mark.parametrize("quote", [16, 0])
def test_exact_numbers_where_the_asked_fact_ranks_first_in_one_head_and_last_in_another(files, quote):
    info = _runtime().adapter.info
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(info.n_q_heads, 3, info.head_dim, generator=gen)  # the question's queries
    # layer 0: head 0 ranks the asked fact 0 and 1, another fact 2 and 40, a third 45;
    # head 1 ranks the asked fact last (46, 47), another fact 0 and 1, the third 5. k = 32.
    sp = _spill(info, files["ch"], quote, 48, gen)
    _lay_out(sp, q, [{0: 120, 1: 121, 2: 130, 40: 131, 45: 140}, {46: 120, 47: 121, 0: 130, 1: 131, 5: 140}])
    sp._recall(SimpleNamespace(base=200), q)
    assert sp._qs is not None  # kept with quotes on or off (the question's evictions rank with it)
    # layer 1: no fact on the host at the recall; then head 1 evicts the asked fact (late),
    # while head 0 keeps it
    sp2 = _spill(info, files["ch"], quote, 20, gen)
    sp2._recall(SimpleNamespace(base=200), q)
    h, d = info.n_kv_heads, info.head_dim
    sp2._put(torch.randn(h, 2, d, generator=gen), torch.randn(h, 2, d, generator=gen),
             torch.randn(h, 2, sp2.ch.shape[1], generator=gen), torch.tensor([[150, 151], [120, 121]]))
    kept = [torch.tensor([[10, 11, 12], [13, 14, 15]]), torch.tensor([[120, 121, 160], [160, 161, 162]])]
    rt = SimpleNamespace(cache=SimpleNamespace(layers=[SimpleNamespace(spill=s, positions=lambda p=p: p)
                                                       for s, p in zip((sp, sp2), kept)]))
    heads = precision.heads(rt, ASKED, [OTHER, THIRD])
    past = 46.0
    assert [(x.layer, x.head, x.kept, x.host, x.recalled, x.rank, x.facts) for x in heads] == [
        (0, 0, 0, 2, 2, 0.0, 3), (0, 1, 0, 2, 0, past, 3), (1, 0, 2, 0, 0, None, 0), (1, 1, 0, 2, 0, None, 0)]
    got = precision.recall_precision(rt, ASKED, [OTHER, THIRD])
    assert got == {"heads": 4, "heads_kept": 1, "heads_on_host": 3, "heads_late": 1, "k": 32,
                   "asked_recalled": round(1 / 3, 4), "asked_rank_median": 23.0,
                   "precision": round((2 / 3 + 0) / 2, 4), "precision_heads": 2}
    # and the check can fail: the same spill read for the other fact
    other = precision.recall_precision(rt, OTHER, [ASKED, THIRD])
    assert other["asked_recalled"] == 0.75 and other["precision"] == round((1 / 3 + 2 / 3) / 2, 4)


def test_scores_are_the_recalls_own_including_pooling(files):
    """question_scores ranks the host rows as `_recall` did: its top k is the spill's, pooled
    along the text (host rows in eviction order) as the spill pools."""
    info = _runtime().adapter.info
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(info.n_q_heads, 5, info.head_dim, generator=gen)
    sp = _spill(info, files["ch"], 16, 80, gen, pool=5)
    sp.hpos[:, :80] = torch.stack([torch.randperm(80, generator=gen) for _ in range(info.n_kv_heads)])
    sp._recall(SimpleNamespace(base=100), q)
    s = precision.question_scores(sp)
    plain = sp.labels.scores(sp._qs, 80)
    assert not torch.equal(s, plain)  # pooling changed them
    for h in range(info.n_kv_heads):
        assert set(s[h].topk(32).indices.tolist()) == set(sp._ranked[h].tolist())
        assert set(sp.hpos[h].gather(0, sp._ranked[h]).tolist()) == set(sp.recalled[h].tolist())  # no quote spans


def test_span_shares():
    conv = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    got = torch.tensor([[5, 7], [1, 2]])
    assert precision.span_shares(conv, got, {6, 7}) == [0.5, None]
    assert precision.span_shares(conv, got, {1, 2, 3, 7}) == [1.0, 2 / 3]


def _real_doc(rt, n_facts: int = 4):
    from app.bench import dense
    return dense.build(rt.tok, dense.HAYSTACK.read_text(), 700, "multikey", seed=1, n_facts=n_facts)


def test_after_a_real_question_the_numbers_agree_with_what_the_spills_recalled(files, tmp_path, one_thread):
    spec = (f"locret:budget=96,chunk=128,stabilizers=8,local=0,heads={files['heads']}"
            f"+offload:recall=32,channels_file={files['ch']}")
    rt = _runtime(spec)
    doc = _real_doc(rt)
    path = tmp_path / "doc.txt"
    path.write_text(doc.text)
    rt.load_document(str(path))
    spans = precision.fact_spans(rt, doc.facts)
    for f in doc.facts:  # the positions are the value's tokens in the conversation
        assert rt.tok.decode([rt.held.ids[i] for i in sorted(spans[f.name])]) == f.value
    log = rt.cache.layers[0].spill.quotes  # the spills' own token log, by conversation index
    assert log.ids[:log.n].tolist() == rt.held.ids
    turn = doc.turns[0]
    (asked,) = [f.name for f in doc.facts if f.value in turn.want]
    others = [s for name, s in spans.items() if name != asked]
    seen, scans = [], [lay.spill.recalls for lay in rt.cache.layers]  # the document's last chunk recalled too

    def read(done: int, total: int) -> None:  # as dense reads it: the question read, nothing decoded
        if done == total:
            layers = rt.cache.layers
            # the question's recall, and one more for each eviction its chunk made after it
            assert all(lay.spill.steps == 0 and lay.spill.recalls > r for lay, r in zip(layers, scans))
            seen.append((precision.recall_precision(rt, spans[asked], others),
                         precision.heads(rt, spans[asked], others),
                         [(lay.spill.hpos[:, :lay.spill.n].clone(), lay.spill.recalled.clone(),
                           lay.positions().clone(), lay.spill.hpos[:, :lay.spill._ranked_n].clone(),
                           lay.spill._ranked.clone(), precision.question_scores(lay.spill)) for lay in layers]))
    rt.ask(turn.question, max_new_tokens=4, progress=read)
    ((got, heads, state),) = seen
    a = spans[asked]
    shares, kept, late = [], 0, 0
    for (host, recalled, pos, scored, ranked, s), lay_heads in zip(state, [heads[i:i + 2] for i in (0, 2, 4)]):
        for h, x in enumerate(lay_heads):
            on = a & set(host[h].tolist())
            assert x.host == len(on) and x.kept == len(a & set(pos[h].tolist()))
            if on:
                shares.append(len(on & set(recalled[h].tolist())) / len(on))
                assert set(s[h].topk(ranked.shape[1]).indices.tolist()) == set(ranked[h].tolist())
                if a & set(scored[h].tolist()):  # on the host when the question's recall ranked it
                    top = set(scored[h].gather(0, ranked[h]).tolist())  # the ranking's top k
                    assert (x.rank < 32) == bool(a & top)
                else:  # evicted after that recall
                    late += 1
                    assert x.rank is None and x.recalled == 0
            elif a & set(pos[h].tolist()):
                kept += 1
    assert got["heads"] == 6 and got["heads_on_host"] == len(shares) >= 1 and got["heads_kept"] == kept
    assert got["heads_late"] == late == 0  # what the question's chunk evicted was ranked too
    assert got["asked_recalled"] == round(sum(shares) / len(shares), 4)
    assert 0 <= got["asked_recalled"] <= 1 and (got["precision"] is None or 0 <= got["precision"] <= 1)
    assert got["asked_rank_median"] is None or 0 <= got["asked_rank_median"] < max(len(st[0][0]) for st in state)


def test_dense_rows_carry_recall_precision_for_offload_specs(files, one_thread):
    from app.bench import dense
    rt = _runtime()
    spec = (f"locret:budget=96,chunk=128,stabilizers=8,local=0,heads={files['heads']}"
            f"+offload:recall=32,channels_file={files['ch']}")
    rows = dense.run(rt, policies=("full", spec), lengths=(400,), trials=1, kinds=("multikey", "after-turn"))
    by = {(r["task"], r["policy"]): r for r in rows}
    for task in ("multikey", "after-turn"):
        assert "asked_recalled" not in by[(task, "full")]
        assert all("recall" not in a for tr in by[(task, "full")]["answers"] for a in tr)
        r = by[(task, spec)]
        turns = r["answers"][0]
        measured = [a["recall"] for a in turns if "recall" in a]
        assert len(measured) == (2 if task == "multikey" else 1)  # after-turn's first turn asks no fact
        assert all(m["heads"] == 6 for m in measured)
        assert r["heads_on_host"] == round(sum(m["heads_on_host"] for m in measured) / len(measured), 4)
        assert set(precision.average(measured)) <= set(r) and set(precision.average(measured)) <= set(dense.COLUMNS)
