"""`bench serve`: the same document, policy and questions through `ask` (the runtime in this
process) and through `serve` (HTTP + SSE on loopback, the official `openai` client).

Per path: time to first token of the first turn (the document is read), decode tok/s, and
time to first token of the second turn (only its new tokens are read). The server runs in
a thread of this process on the same Runtime, so both paths use the same weights; every
trial starts from an empty cache.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from .common import Bar, table, write_json
from .locret import HAYSTACK

QUESTIONS = ("Summarise this document in detail, section by section.",
             "What does it say about patents? Explain at length.")


def document(rt, n_tokens: int) -> str:
    """The first ~n_tokens of the licence haystack, ending at a paragraph break."""
    ids = rt.tokens(HAYSTACK.read_text())
    if n_tokens > len(ids):
        raise SystemExit(f"bench serve: {n_tokens:,} tokens asked, {HAYSTACK} has {len(ids):,}")
    body = rt.tok.decode(ids[:n_tokens])
    end = body.rfind("\n\n")
    return body[:end] if end > len(body) // 2 else body


def _ask(rt, path: Path, decode: int) -> dict:
    """`main.py ask --doc PATH Q1 Q2`, in-process, timed from before the document is read."""
    from app.runtime.types import Sampling
    greedy, first = Sampling(temperature=0.0), []
    t0 = time.perf_counter()
    rt.load_document(str(path))
    r1 = rt.ask(QUESTIONS[0], max_new_tokens=decode, sampling=greedy,
                on_token=lambda p: first or first.append(time.perf_counter()))
    r2 = rt.ask(QUESTIONS[1], max_new_tokens=decode, sampling=greedy)
    return {"ttft1_s": first[0] - t0, "decode_tok_s": r1.decode_tok_s, "tokens": r1.new_tokens,
            "ttft2_s": r2.ttft_s, "prefilled2": r2.prompt_tokens}


def _turn(client, model: str, messages: list, decode: int) -> tuple[str, float, float, object, dict]:
    """One streamed turn. -> (answer, ttft, decode tok/s, usage, vramchat extension) as the client sees them."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=decode, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    pieces, t_first, t_end, usage, ext = [], None, None, None, {}
    for chunk in stream:
        usage = chunk.usage or usage
        ext = (chunk.model_extra or {}).get("vramchat") or ext
        for choice in chunk.choices:
            if choice.delta.content:
                t_first = t_first or time.perf_counter()
                pieces.append(choice.delta.content)
            if choice.finish_reason:  # the runtime's decode time ends after its last step, as here
                t_end = time.perf_counter()
    n = usage.completion_tokens
    rate = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0
    return "".join(pieces), t_first - t0, rate, usage, ext


def _serve(client, model: str, path: Path, decode: int) -> dict:
    from app.runtime.session import document_block
    user1 = document_block(path.name, path.read_text()) + "\n\n" + QUESTIONS[0]
    msgs = [{"role": "user", "content": user1}]
    answer, ttft1, rate, u1, ext1 = _turn(client, model, msgs, decode)
    msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
    _, ttft2, _, u2, _ = _turn(client, model, msgs, decode)
    return {"ttft1_s": ttft1, "decode_tok_s": rate, "tokens": u1.completion_tokens, "ttft2_s": ttft2,
            "prefilled2": u2.prompt_tokens - u2.prompt_tokens_details.cached_tokens,
            "server_ttft1_s": ext1.get("ttft_s"), "server_decode_tok_s": ext1.get("decode_tok_s")}


def _median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def run(rt, policies=("full",), lengths=(2048,), decode: int = 64, trials: int = 3, out_dir=None) -> list[dict]:
    import tempfile

    import openai

    from app.server import Background, Serving
    policy, n_tokens = policies[0], lengths[0]
    rt.clear()
    rt.set_policy(policy, reprefill=True)
    serving = Serving(rt, policy=policy, max_queue=1).start()
    runs: dict[str, list[dict]] = {"ask": [], "serve": []}
    with tempfile.TemporaryDirectory() as tmp, Background(serving) as url:
        path = Path(tmp) / "document.txt"
        path.write_text(document(rt, n_tokens))
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0)
        rt.ask("Hello.", max_new_tokens=4)  # untimed: the first forward, request and connection pay one-time costs
        _turn(client, rt.model_id, [{"role": "user", "content": "Hello."}], 4)
        bar = Bar(2 * trials, "bench serve")
        for t in range(trials):
            for name in (("ask", "serve") if t % 2 == 0 else ("serve", "ask")):  # alternate: the machine drifts
                rt.clear()
                runs[name].append(_ask(rt, path, decode) if name == "ask" else _serve(client, rt.model_id, path, decode))
                bar.step(f"{name} trial {t + 1}")
    rt.clear()
    rows = []
    for name, rs in runs.items():
        row = {"path": name, "policy": policy, "doc_tokens": n_tokens, "trials": len(rs)}
        for key in ("ttft1_s", "decode_tok_s", "tokens", "ttft2_s", "prefilled2", "server_ttft1_s",
                    "server_decode_tok_s"):
            row[key] = _median(rs, key)
        row["ttft2_over_ttft1"] = row["ttft2_s"] / row["ttft1_s"]
        rows.append(row)
    ask, srv = rows
    ratio = {"path": "serve / ask", "policy": policy, "doc_tokens": n_tokens,
             "ttft1_s": srv["ttft1_s"] / ask["ttft1_s"], "decode_tok_s": srv["decode_tok_s"] / ask["decode_tok_s"],
             "ttft2_s": srv["ttft2_s"] / ask["ttft2_s"]}
    cols = ["path", "policy", "doc_tokens", "ttft1_s", "decode_tok_s", "tokens", "ttft2_s", "prefilled2",
            "ttft2_over_ttft1", "server_ttft1_s", "server_decode_tok_s"]
    print(table(rows + [ratio], cols))
    if out_dir is not None:
        write_json(Path(out_dir), "serve", rows + [ratio], {"model": rt.model_id, "device": str(rt.device),
                                                            "decode": decode, "questions": QUESTIONS, "runs": runs})
    return rows + [ratio]
