"""Decode steps for one answer, and the CUDA graph that makes them cheap.

A decode step of an 8B model is ~1,500 small kernels; launched one by one from Python
they cost far more than the GPU work (measured on an H100: 30 tok/s where the bandwidth
floor allows ~150). So where the cache allows it (`policies.static.reason` is empty:
full-precision stores, no spill, reader or ffn, a selector whose decode scores are pure)
steps run in windows of `ROOM` tokens with fixed shapes (`policies/static.py`):
the first step of a window is captured as a CUDA graph and every step replays it.
Other caches, and the CPU, decode eagerly, one forward per token (`mode` says which and
why). The fixed-shape step also runs without a graph: that is how CI tests it.

Use as a context manager: leaving it commits the steps taken to the cache, whatever
happened in between. `generate` is the answer's loop around it: sampling, stop tokens and
the stop flag, detokenizing, timing, out-of-memory recovery.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from policies import Chunk, KVCache, static

from .sampling import sample
from .types import OnToken, Sampling, VramchatError

ROOM = 256  # decode steps per window: the span attention reads grows by at most this


class Decoder:
    """`step(token) -> logits [V]` for one token after another; see the module doc.

    fixed: None picks (fixed shapes + CUDA graph on CUDA where the cache allows, eager
    elsewhere); True forces fixed shapes (graph only on CUDA), False forces eager.
    `ModelInfo.kernels.graphs` (VRAMCHAT_CUDA_GRAPHS=0 in the environment) turns the graph off.
    """

    def __init__(self, adapter, cache: KVCache, fixed: bool | None = None, room: int = ROOM):
        self.adapter, self.cache, self.room = adapter, cache, room
        dev = adapter.info.device
        why = static.reason(cache)
        if fixed is None:
            fixed = dev.type == "cuda" and not why
        if fixed and why:
            raise ValueError(f"policy `{cache.spec}` cannot decode with fixed shapes: {why}")
        self.fixed = fixed
        self.graphs = fixed and dev.type == "cuda" and cache.info.kernels.graphs
        self.mode = ("cuda graph" if self.graphs else "fixed shapes") if fixed else (
            f"eager ({why})" if why and dev.type == "cuda" else "eager")
        self._st = None  # the open window
        self._done = 0  # steps taken in it
        self._graph = None
        self._out = None
        if fixed:
            self._ids = torch.zeros(1, dtype=torch.long, device=dev)
            self._pos0 = torch.zeros(1, dtype=torch.long, device=dev)
            self._chunk = None

    def __enter__(self) -> "Decoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.inference_mode()
    def step(self, token) -> torch.Tensor:
        """token: an int or a one-element tensor on the device -> float32 logits [V].
        NOTE: with a CUDA graph the logits are the graph's output buffer: valid until the
        next step (clone to keep them)."""
        if not self.fixed:
            ids = token.view(1) if torch.is_tensor(token) else torch.tensor([token], device=self.adapter.info.device)
            return self.adapter.forward(ids, self.cache, Chunk(ids, self.cache.next_position, "decode"))
        if self._st is None or self._done == self._st.room:
            self._open()
        if torch.is_tensor(token):
            self._ids.copy_(token.view(1))
        else:
            self._ids.fill_(int(token))
        self._st.step.fill_(self._done)
        if self._graph is not None:
            self._graph.replay()
            out = self._out
        else:
            out = self._run()
        self._done += 1
        return out

    def close(self) -> None:
        """Commit the open window's steps to the cache (idempotent)."""
        if self._st is not None:
            st, n = self._st, self._done
            self._st, self._done, self._graph, self._out = None, 0, None, None
            static.close_window(self.cache, st, n)

    # ---- fixed shapes -------------------------------------------------------------
    def _open(self) -> None:
        self.close()
        self._st = static.open_window(self.cache, self.room)
        self._pos0.fill_(self.cache.next_position)
        self._chunk = Chunk(self._ids, self.cache.next_position, "decode", static=self._st)
        if self.graphs:
            self._capture()

    def _run(self) -> torch.Tensor:
        return self.adapter.run(self._ids, self._pos0 + self._st.step, self.cache, self._chunk)

    def _capture(self) -> None:
        """Capture one step as a CUDA graph. Warm-up steps first (cuBLAS handles, Triton
        compiles, allocator pools), on a side stream as CUDA graphs require; they write the
        step's slot, which the replay writes again."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._out = self._run()
        except RuntimeError as e:  # something in the step cannot be captured: run it uncaptured
            torch.cuda.synchronize()
            self.graphs, self._graph, self._out = False, None, None
            self.mode = f"fixed shapes (graph capture failed: {str(e).splitlines()[0][:120]})"
            return
        self._graph = graph


_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def is_oom(e: BaseException) -> bool:
    """Whether e is the device (or host) running out of memory."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS))


def free_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks back to the device (after an out-of-memory, or
    when a cache is dropped) so the next allocation does not fail on fragments."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Generated:
    ids: list[int]  # the answer's tokens, all in the cache (a stop token is not)
    text: str  # decoded without special tokens
    finish: str  # "stop" (a stop token), "length", "stopped" (the flag), "oom"
    first_s: float | None  # perf_counter when the first token was sampled
    end_s: float  # perf_counter when decoding ended
    mode: str  # Decoder.mode

    def checked(self, res):
        """-> res (the TurnResult of this generation), unless decoding ran out of memory."""
        if self.finish == "oom":
            raise VramchatError(f"out of memory after {res.new_tokens} generated tokens; the partial answer is "
                                "kept. Try `kivi` or a smaller budget.")
        return res


def generate(adapter, cache: KVCache, logits: torch.Tensor, tok, *, stop_ids: set[int], max_new_tokens: int,
             sampling: Sampling, gen: torch.Generator, on_token: OnToken | None = None,
             stop: threading.Event | None = None, on_step=None) -> Generated:
    """Decode an answer after a prefill whose last logits [V] are `logits`.

    Checks `stop` before every token; streams text pieces to on_token (a piece that ends
    in half a UTF-8 character waits for the next token); calls on_step() after every
    step. Out of memory in a step ends the answer (finish "oom") with the tokens that
    reached the cache; the caller reports it.
    """
    out: list[int] = []
    text, finish, first = "", "length", None
    with Decoder(adapter, cache) as dec:
        while len(out) < max_new_tokens:
            if stop is not None and stop.is_set():
                finish = "stopped"
                break
            t = sample(logits, sampling, gen)
            if t in stop_ids:
                finish = "stop"
                break
            out.append(t)
            piece, text = _detok(tok, out, text)
            if first is None:
                first = time.perf_counter()
            if piece and on_token is not None:
                on_token(piece)
            try:
                logits = dec.step(t)
            except BaseException as e:
                if not is_oom(e):
                    raise
                free_cached(adapter.info.device)
                finish = "oom"
                out.pop()  # that token never reached the cache
                break
            if on_step is not None:
                on_step()
    cache.track_peak()  # NOTE: decode only appends, so the end is the peak
    end = time.perf_counter()
    return Generated(out, tok.decode(out, skip_special_tokens=True), finish, first, end, dec.mode)


def _detok(tok, ids: list[int], prev: str) -> tuple[str, str]:
    """-> (new piece, whole text) for ids, given the text of all but the last."""
    text = tok.decode(ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):
        return "", prev  # an incomplete UTF-8 sequence: wait for the next token
    return text[len(prev):] if text.startswith(prev) else text, text
