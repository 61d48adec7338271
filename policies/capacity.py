"""How many tokens a layer holds, and how far its buffers grow, for reads not made yet.

The budget rule of `EvictingSelector` (policies/slots.py) as arithmetic: after a non-final
prefill chunk a layer keeps `budget` tokens per KV head, after the final chunk `budget` plus
that chunk; decoding never evicts. `KVCache.projected_length` and `expect` (before a read)
and `app/estimate` (`main.py plan`, `auto`'s choice) all ask here, and every buffer that
grows takes its new capacity from `grown`. tests/test_capacity.py holds these answers to
what real caches hold after the same reads.
"""
from __future__ import annotations

ANSWER = 1024  # answer tokens `KVCache.expect` makes room for unless told


def padded(n: int) -> int:
    """n rows and an eighth more: the room a growing buffer takes, so appends amortize."""
    return n + n // 8


def blocks(n: int, block: int) -> int:
    """n rounded up to whole blocks."""
    return -(-n // block) * block


def grown(cap: int, need: int, block: int) -> int:
    """The capacity of a buffer of `cap` rows asked to hold `need`: `cap` where that fits,
    else at least `need` and an eighth more than `cap`, in whole blocks."""
    return cap if need <= cap else blocks(max(need, padded(cap)), block)


def reserved(needs, block: int, cap: int = 0) -> int:
    """The capacity of a buffer of `cap` rows after it is asked for each of `needs` in turn."""
    for n in needs:
        cap = grown(cap, n, block)
    return cap


def chunks(selector, n: int, size: int) -> list[int]:
    """Chunk lengths that read n tokens: the selector's plan in its own chunk size where it
    has one, else `size` (the runtime's)."""
    return selector.plan(n, selector.chunk or size) if n else []


def read(budget: int | None, plan: list[int], held: int = 0, final: bool = True) -> list[tuple[int, int]]:
    """Tokens per KV head of a layer that holds `held` and reads `plan`'s chunks, for each
    chunk: (once it is appended, once the selector has evicted). budget None keeps all;
    final False: more tokens follow at once, so the last chunk is not a final one."""
    out = []
    for i, t in enumerate(plan):
        held += t
        cap = None if budget is None else budget + (t if final and i == len(plan) - 1 else 0)
        out.append((held, held if cap is None else min(held, cap)))
        held = out[-1][1]
    return out


def lengths(selector, n: int, size: int, held: int = 0, answer: int = 0) -> list[int]:
    """Tokens per KV head a layer with `selector` holds at every step of reading n tokens
    (chunks of `size` unless it has its own) and then decoding `answer`: `held` first, per
    chunk its length once appended and once evicted, then one more per answer token.

    Exact for a selector that keeps its whole budget (`full`, `locret`, `streaming`, `h2o`,
    `snapkv`); an upper bound where one keeps less (`anchor` drops separators under its
    budget; `lighttransfer` has no budget, and only its lazy layers evict)."""
    out = [held]
    for appended, kept in read(selector.budget, chunks(selector, n, size), held):
        out += [appended, kept]
    return out + list(range(out[-1] + 1, out[-1] + answer + 1))
