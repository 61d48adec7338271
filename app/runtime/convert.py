"""Live conversion of one policy stack's cache into another's, without re-reading (`convert`),
and the runtime's policy switch around it (`switch`: convert, else re-read the conversation).

Generic path, layer by layer: the old store's kept tokens come out at full precision
(`dense`), go into the new store (`load`), and the bookkeeping (positions, scores,
frame) carries over; then the new selector may evict down to its budget using the
scores recorded at prefill. Where that math is impossible (the new selector needs
scores nobody recorded) `convert` returns None and the runtime re-prefills.
"""
from __future__ import annotations

from policies import Chunk, KVCache, ModelInfo


def convert(old: KVCache, info: ModelInfo, spec: str):
    """-> (new_cache, lossy, note) or (None, False, reason) where a re-prefill is needed."""
    new = KVCache(spec, info)
    sel = new.layers[0].selector
    if sel.needs_scores and old.length and any(l.scores is None for l in old.layers):
        return None, False, f"`{new.slots['selector'].name}` needs scores that were not recorded at prefill"
    old_evicts, old_seen = old.evicts, old.seen
    old_lossless = all(l.store.lossless for l in old.layers)
    new_lossless = all(l.store.lossless for l in new.layers)
    for i, (src, dst) in enumerate(zip(old.layers, new.layers)):
        dst.adopt(src)
        old.layers[i] = None  # free the old layer as soon as it is copied
    new.next_position = old.next_position
    new.peak_bytes = 0
    retained0 = new.length
    if new.evicts and new.length:
        new.end_chunk(Chunk(input_ids=_empty(info), start=new.next_position, final=False))
    lossy = not (old_lossless and new_lossless)
    notes = []
    if not new_lossless:
        notes.append("stored lossily (quantized): the precision lost does not come back")
    elif not old_lossless:
        notes.append("dequantized from a lossy cache: its quantization error stays")
    if new.length < retained0:
        notes.append(f"evicted {retained0 - new.length:,} of {retained0:,} tokens per head")
    if old_evicts and not new.evicts and old_seen > retained0:  # the old policy had dropped some
        notes.append("keeps only the tokens the old policy retained; re-read with --reprefill for all of them")
    return new, lossy, "; ".join(notes) or "converted in place"


def _empty(info):
    import torch
    return torch.empty(0, dtype=torch.long, device=info.device)


def switch(rt, spec: str, progress=None, stop=None, reprefill: bool = False):
    """Switch `rt` (a Runtime, its lock held) to `spec`: convert its cache in place, or re-read
    the conversation under `spec` where converting is impossible, ran out of memory or
    `reprefill` asks for it. -> ConversionResult."""
    from .decode import free_cached, is_oom
    from .types import ConversionResult, Stopped, VramchatError
    rt.adapter.check(spec)  # a live switch is refused where a fresh cache would be
    old = rt.cache
    before = sum(old.bytes_by_tier().values())
    old_spec = old.spec
    try:
        new, lossy, note = (None, False, "") if reprefill else convert(old, rt.adapter.info, spec)
    except BaseException as e:
        if not is_oom(e):
            if any(l is None for l in old.layers):  # convert freed some old layers: re-read next turn
                rt.reset_cache(old_spec)
            raise
        new, note = None, "out of memory while converting"
    if new is None:
        target = rt.conv.render(rt.tok, open_user=rt._open_user())
        rt.reset_cache(spec)
        if target:
            try:
                rt._rebuild(target, progress, stop)
            except (Stopped, VramchatError) as e:
                raise VramchatError(f"switched to `{rt.policy}` but re-reading the conversation "
                                    f"failed: {e}. It is re-read on the next question.") from e
        after = sum(rt.cache.bytes_by_tier().values())
        why = note or "this conversion needs the original tokens"
        return ConversionResult(old_spec, rt.policy, before, after, True, False,
                                f"re-read the conversation under `{rt.policy}` ({why})")
    rt.cache = new
    rt.cache.give_tokens(lambda: rt.tokens(rt.cached_text))
    rt.cache.track_peak()
    del old
    free_cached(rt.device)
    after = sum(rt.cache.bytes_by_tier().values())
    return ConversionResult(old_spec, rt.policy, before, after, False, lossy, note)
