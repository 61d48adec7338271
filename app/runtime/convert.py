"""Live conversion of one policy stack's cache into another's, without re-reading (`convert`;
the runtime's switch around it, which re-reads where this cannot convert: `Reader.switch`).

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
