"""app/runtime/published.py: how often a read and a decode publish the cache's state."""
from __future__ import annotations

from app.runtime.published import EVERY_S, SHARE, Published


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _published(clock: Clock, cost: float):
    built = []

    def build(last):
        clock.t += cost  # building takes `cost` seconds
        built.append(clock.t)
        return object()
    return Published(build, clock), built


def _decode(clock: Clock, pub: Published, steps: int, step_s: float) -> None:
    for _ in range(steps):
        clock.t += step_s
        pub.now_and_then()


def test_a_cheap_state_is_published_every_tenth_of_a_second_while_decoding():
    clock = Clock()
    pub, built = _published(clock, cost=0.001)
    _decode(clock, pub, 100, 0.02)  # 2 s of 20 ms steps
    gaps = [b - a for a, b in zip(built, built[1:])]
    assert len(built) - 1 in range(15, 21) and min(gaps) >= EVERY_S  # (each gap: 0.1 s and the step that passed it)


def test_a_costly_state_takes_at_most_its_share_of_the_decode():
    """A state that takes 50 ms to build (the cache map at a million tokens) is built at most
    once per 0.5 s: 10 % of the decode's time, not half of it."""
    clock = Clock()
    pub, built = _published(clock, cost=0.05)
    t0 = clock.t
    _decode(clock, pub, 100, 0.05)
    spent = 0.05 * (len(built) - 1)
    assert spent <= SHARE * (clock.t - t0) + 0.05 and len(built) - 1 >= 8
    assert min(b - a for a, b in zip(built, built[1:])) >= 0.05 / SHARE


def _read(clock: Clock, pub: Published, chunks: int, chunk_s: float) -> None:
    for i in range(chunks):
        clock.t += chunk_s
        pub.chunk_read(last=i == chunks - 1)


def test_a_read_publishes_every_chunk_where_the_state_is_cheap():
    """1 ms states after 20 ms chunks (or 50 ms maps after 1.1 s chunks: the CPU at 1M):
    every chunk's state is shown, however fast the chunks come."""
    for cost, chunk_s in ((0.001, 0.02), (0.05, 1.1)):
        clock = Clock()
        pub, built = _published(clock, cost=cost)
        _read(clock, pub, 40, chunk_s)
        assert len(built) - 1 == 40, (cost, chunk_s)


def test_a_costly_state_takes_at_most_its_share_of_a_read_and_the_last_chunk_is_always_shown():
    """A 50 ms map after 30 ms chunks (a small model's read on a GPU) would triple the read
    if built per chunk: built at most once per 0.5 s, and at the read's end at once."""
    clock = Clock()
    pub, built = _published(clock, cost=0.05)
    t0 = clock.t
    _read(clock, pub, 101, 0.03)
    spent = 0.05 * (len(built) - 1)
    assert spent <= SHARE * (clock.t - t0) + 2 * 0.05 and len(built) - 1 >= 5
    assert built[-1] == clock.t  # the last chunk's state, built after it
    gaps = [b - a for a, b in zip(built, built[1:-1])]
    assert min(gaps) >= 0.05 / SHARE


def test_now_publishes_at_once_and_a_none_keeps_the_last_state():
    clock = Clock()
    states = iter([1, None, 3])
    pub = Published(lambda last: next(states), clock)
    assert pub.state == 1
    pub.now()
    assert pub.state == 1
    pub.now()
    assert pub.state == 3
