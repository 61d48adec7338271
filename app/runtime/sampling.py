"""Next-token choice: greedy, or temperature / top-k / top-p with a seeded generator."""
from __future__ import annotations

import torch

from .types import Sampling

_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<end_of_turn>")


def generator(s: Sampling) -> torch.Generator:
    """The random source of one answer: seeded where the sampling asks for it."""
    gen = torch.Generator(device="cpu")
    if s.seed is not None:
        gen.manual_seed(s.seed)
    return gen


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """logits [V] float32 -> token id."""
    if s.temperature <= 0:
        return int(logits.argmax())
    x = logits.float().cpu() / s.temperature
    if s.top_k and s.top_k < x.numel():
        kth = torch.topk(x, s.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if s.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        drop = sp.cumsum(0) - sp > s.top_p  # keep the smallest prefix reaching top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def stop_token_ids(tokenizer, model) -> set[int]:
    """EOS ids from the generation config and tokenizer, plus the template's end-of-turn tokens."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[m] for m in _END_MARKERS if m in vocab)
    return ids


def validate(s: Sampling) -> Sampling:
    from .types import VramchatError
    if not (s.temperature >= 0):
        raise VramchatError(f"--temperature {s.temperature}: must be >= 0")
    if not (0 < s.top_p <= 1):
        raise VramchatError(f"--top-p {s.top_p}: must be in (0, 1]")
    if s.top_k < 0:
        raise VramchatError(f"--top-k {s.top_k}: must be >= 0 (0 = off)")
    return s
