"""What the runtime checks before it reads new tokens: `auto` re-chooses the stack for the
longer conversation, a policy that keeps every position warns before passing the model's
native window, and what the policy cannot hold in this device's memory is refused (nothing
is read, nothing truncated)."""
from __future__ import annotations

import torch

from . import auto
from .prefill import chunk_plan
from .types import VramchatError


def answer_room(rt) -> int:
    """Tokens kept free for an answer when a conversation is sized against the window."""
    return min(1024, rt.window // 4) if rt.window else 1024


def window_warning(rt, n_new: int, answer: int | None = None) -> str:
    """Why reading n_new more tokens (and an answer) under rt's policy passes the model's
    native window with positions it never saw in training ("" when it does not)."""
    answer = answer_room(rt) if answer is None else answer
    total = rt.cache.seen + n_new + answer
    if rt.cache.evicts or not rt.window or total <= rt.window:
        return ""
    return (f"the conversation will be {total:,} tokens with a {answer:,}-token answer, past the model's "
            f"native window of {rt.window:,}; `{rt.policy}` keeps every position, so the model reads "
            "positions it was never trained on and its answers degrade. Policies that hold it: `auto`, "
            "`locret` (retaining heads), `snapkv`, `streaming`")


def before_reading(rt, n_new: int, progress=None, stop=None) -> None:
    """Before rt reads n_new tokens: auto's choice (a live conversion where the math allows,
    else a re-read, said in a note), the window warning, then the memory check."""
    if not rt._choosing:  # a re-read for auto's own switch comes back here
        rt._choosing = True
        try:
            if rt.auto:
                choice = auto.choose(rt, rt.cache.seen + n_new, answer_room(rt))
                rt.auto_choice = choice
                # NOTE: both canonical (auto.choose_for, KVCache.spec): equal strings, the same stack
                if choice.spec != rt.policy:
                    res = rt._convert(choice.spec, progress, stop)
                    rt._note(f"auto chose `{choice.spec}` (was `{res.old_policy}`): {choice.reason}; {res.message}")
            warning = window_warning(rt, n_new)
            if warning:
                rt._note("warning: " + warning)
        finally:
            rt._choosing = False
    check_fit(rt, n_new)


def check_fit(rt, n_new: int, extra: int = 0) -> None:
    """Refuse (before reading) what the policy cannot hold in this device's memory."""
    cache = rt.cache
    need_tokens = cache.projected_length(n_new + extra, chunk_plan(cache, max(n_new, 1), rt.chunk_size)[0])
    per_tok = cache.bytes_per_token()
    held = sum(cache.bytes_by_tier().values())
    need = need_tokens * per_tok - held
    if rt.device.type == "cuda":
        free = torch.cuda.mem_get_info(rt.device)[0] + (
            torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device))
    else:
        import psutil
        free = psutil.virtual_memory().available
    free -= 512 * 2**20  # activations, attention scores of one chunk, the allocator's slack
    if need > free:
        fits = max(0, int((free + held) // per_tok))
        raise VramchatError(
            f"this needs {n_new:,} more tokens; policy `{rt.policy}` would hold {need_tokens:,} tokens "
            f"= {need_tokens * per_tok / 2**30:.2f} GiB of KV cache, but only {max(free, 0) / 2**30:.2f} GiB "
            f"is free on {rt.device} (room for about {fits:,} tokens). Nothing was read. Try "
            "`auto`, `locret` (a fixed budget) or `kivi` (about 5x smaller), or free memory.")
