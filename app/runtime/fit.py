"""What is checked before new tokens are read: room kept for an answer, the model's native
window (a policy that keeps every position warns before passing it), and the memory the
policy will need (refused before reading: nothing is read, nothing truncated)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import KVCache

from .prefill import chunk_plan
from .types import VramchatError

SLACK = 512 * 2**20  # activations, attention scores of one chunk, the allocator's slack


@dataclass(frozen=True)
class Fit:
    window: int  # the model's native window (0: it states none)
    chunk_size: int  # the runtime's default prefill chunk
    device: torch.device

    @property
    def answer_room(self) -> int:
        """Tokens kept free for an answer when a conversation is sized against the window."""
        return min(1024, self.window // 4) if self.window else 1024

    def window_warning(self, cache: KVCache, n_new: int, answer: int | None = None) -> str:
        """Why reading n_new more tokens (and an answer) into `cache` passes the native window
        with positions the model never saw in training ("" when it does not)."""
        answer = self.answer_room if answer is None else answer
        total = cache.seen + n_new + answer
        if cache.evicts or not self.window or total <= self.window:
            return ""
        return (f"the conversation will be {total:,} tokens with a {answer:,}-token answer, past the model's "
                f"native window of {self.window:,}; `{cache.spec}` keeps every position, so the model reads "
                "positions it was never trained on and its answers degrade. Policies that hold it: `auto`, "
                "`locret` (retaining heads), `snapkv`, `streaming`")

    def check(self, cache: KVCache, n_new: int, extra: int = 0) -> None:
        """Refuse (before reading) what `cache`'s policy cannot hold in this device's memory."""
        need_tokens = cache.projected_length(n_new + extra, chunk_plan(cache, max(n_new, 1), self.chunk_size)[0])
        per_tok = cache.bytes_per_token()
        held = sum(cache.bytes_by_tier().values())
        need = need_tokens * per_tok - held
        free = self.free() - SLACK
        if need > free:
            fits = max(0, int((free + held) // per_tok))
            raise VramchatError(
                f"this needs {n_new:,} more tokens; policy `{cache.spec}` would hold {need_tokens:,} tokens "
                f"= {need_tokens * per_tok / 2**30:.2f} GiB of KV cache, but only {max(free, 0) / 2**30:.2f} GiB "
                f"is free on {self.device} (room for about {fits:,} tokens). Nothing was read. Try "
                "`auto`, `locret` (a fixed budget) or `kivi` (about 5x smaller), or free memory.")

    def free(self) -> int:
        """Bytes a cache may still take on the device (a CPU: the host's available memory)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] + (
                torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        import psutil
        return psutil.virtual_memory().available
