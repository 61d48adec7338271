"""What is checked before new tokens are read: room kept for an answer, the model's native
window (a policy that keeps every position warns before passing it), and the memory the
policy will need on the device and on the host (refused before reading: nothing is read,
nothing truncated). The host tier (offload's evicted tokens, the host store) is projected
to the end of the read by the same capacity rule its buffers grow by; on a CPU the device
is the host, and both needs are counted once against its available memory."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from policies import KVCache, Policy, capacity
from policies.registry import spec_of

from .prefill import chunk_plan
from .types import VramchatError, fmt_bytes

SLACK = 512 * 2**20  # activations, attention scores of one chunk, the allocator's slack


@dataclass
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
        """Refuse (before reading) what `cache`'s policy cannot hold in this device's memory,
        or in the host's."""
        chunk = chunk_plan(cache, max(n_new, 1), self.chunk_size)[0]
        need_tokens = cache.projected_length(n_new + extra, chunk)
        per_tok = cache.bytes_per_token()
        tiers = cache.bytes_by_tier()
        store = need_tokens * per_tok  # the kept tokens at the read's peak, in the store's tier
        on_host = cache.layers[0].store.tier == "host"
        host = host_rows(cache, n_new + extra, chunk) + (store if on_host else 0)
        dev_more = (0 if on_host else store) - tiers["gpu"]
        host_more = host - tiers["host"]
        cpu = self.device.type != "cuda"
        free = self.free() - SLACK
        if dev_more > free:
            fits = max(0, int((free + tiers["gpu"]) // per_tok))
            raise VramchatError(
                f"this needs {n_new:,} more tokens; policy `{cache.spec}` would hold {need_tokens:,} tokens "
                f"= {need_tokens * per_tok / 2**30:.2f} GiB of KV cache, but only {max(free, 0) / 2**30:.2f} GiB "
                f"is free on {self.device} (room for about {fits:,} tokens). Nothing was read. Try "
                "`auto`, `locret` (a fixed budget) or `kivi` (about 5x smaller), or free memory.")
        room = free - max(dev_more, 0) if cpu else host_available() - SLACK  # NOTE: a CPU's one memory
        if host_more > max(room, 0):
            raise VramchatError(self._host_refusal(cache, n_new + extra, chunk, host, max(room, 0), tiers))

    def _host_refusal(self, cache: KVCache, n_new: int, chunk: int, host: int, room: int, tiers: dict) -> str:
        """Why the host tier cannot take the read, with the numbers and the settings that fit."""
        where = "this machine's memory (device and host are one here)" if self.device.type != "cuda" else "host RAM"
        more = host - tiers["host"]
        fits = []
        spill = cache.slots.get("spill")
        if spill is not None and spill.name == "offload":
            for kb, vb in QUANTIZED:
                if (kb, vb) < (spill.opts["kbits"], spill.opts["vbits"]):
                    got = host_rows(cache, n_new, chunk, kb, vb) - tiers["host"]
                    if got <= room:
                        slots = dict(cache.slots, spill=Policy("offload", "spill", spill.opts | {"kbits": kb,
                                                                                          "vbits": vb}))
                        fits.append(f"`{spec_of(slots)}` ({fmt_bytes(got)} more)")
            fits.append(f"`{spec_of({k: v for k, v in cache.slots.items() if k != 'spill'})}` (evicted tokens "
                        "dropped, nothing on the host)")
        else:
            fits.append("`locret` or `locret+kivi` (a fixed budget on the device, nothing on the host)")
        return (f"this needs {n_new:,} more tokens; policy `{cache.spec}` would hold {fmt_bytes(host)} in host "
                f"memory at the end of the read ({fmt_bytes(more)} more than now), but only {fmt_bytes(room)} of "
                f"{where} is available for it. Nothing was read. Options that fit: "
                + ", ".join(fits) + "; or free memory.")

    def free(self) -> int:
        """Bytes a cache may still take on the device (a CPU: the host's available memory)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0] + (
                torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device))
        return host_available()


QUANTIZED = ((8, 4), (4, 4), (2, 2))  # host-tier settings a refusal offers (`offload:kbits=..,vbits=..`)


def host_available() -> int:
    import psutil
    return psutil.virtual_memory().available


def host_rows(cache: KVCache, n_new: int, chunk: int, kbits: int | None = None, vbits: int | None = None) -> int:
    """Host bytes the cache's offload spills will hold once n_new more tokens are read in
    chunks of `chunk` (`OffloadSpill.host_after`: every layer's evictions by the capacity
    rule, `policies.capacity`), at their own kbits/vbits or the ones given."""
    from offload.spill import OffloadSpill
    total = 0
    for layer in cache.layers:
        sp = layer.spill
        if not isinstance(sp, OffloadSpill):
            continue
        trace = capacity.lengths(layer.selector, n_new, chunk, layer.length)
        evictions = [before - after for before, after in zip(trace, trace[1:]) if after < before]
        total += sp.host_after(evictions, capacity.chunks(layer.selector, n_new, chunk), kbits, vbits)
    return total
