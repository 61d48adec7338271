"""The HTTP side of `serve`: OpenAI's chat- and text-completions API as a Starlette app,
plus Prometheus metrics at the root (`metrics.py`).

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the
official clients raise them with their message. A streaming request gets its status
line only once its first token (or its refusal) is known: a prompt the policy cannot
hold is a 400, not a broken stream.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import metrics, schema
from .worker import Busy, Job, Outcome, Serving

MAX_BODY = 64 * 2**20  # a 128K-token document is ~0.5 MB of text; this leaves room for many
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error(status: int, message: str, code: str | None = None, param: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    body = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def _watch_disconnect(receive, stop) -> None:
    """Set `stop` when the client goes away (the body is already read, so the next ASGI
    message is the disconnect)."""
    while True:
        if (await receive())["type"] == "http.disconnect":
            stop.set()
            return


def _usage(o: Outcome) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.result.new_tokens,
            "total_tokens": o.prompt_tokens + o.result.new_tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}


def _extension(o: Outcome) -> dict:
    """The answer's `vramchat` field: how it was served, and its sources (the passages of the
    conversation's documents it attended to most, best first; app/runtime/evidence.py)."""
    r = o.result
    return {"policy": r.policy, "auto": o.auto, "prefilled_tokens": r.prompt_tokens, "ttft_s": round(r.ttft_s, 4),
            "prefill_tok_s": round(r.prefill_tok_s, 1), "decode_tok_s": round(r.decode_tok_s, 2),
            "decode_mode": r.decode_mode, "notes": o.notes, "sources": r.sources, "sources_note": r.sources_note}


def _choice(chat: bool, text: str, finish: str | None, delta: bool = False) -> dict:
    """One choice of a chat or text completion (delta: a streamed chat chunk's)."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": None}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def make_app(serving: Serving, api_key: str | None = None, max_body: int = MAX_BODY) -> Starlette:
    started = int(time.time())
    key = api_key.encode() if api_key else None

    def denied(request: Request) -> Response | None:
        if key is None:
            return None
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return error(401, "missing API key: send `Authorization: Bearer KEY` with the key the server "
                         "was started with (--api-key or VRAMCHAT_API_KEY)", "missing_api_key")
        if not hmac.compare_digest(auth[7:].strip().encode(), key):
            return error(401, "wrong API key", "invalid_api_key")
        return None

    async def models(request: Request) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": started, "owned_by": "vramchat",
             "max_model_len": serving.rt.window} for m in serving.models]})

    async def memory(request: Request) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        rt = serving.rt

        def snapshot():
            cmap = rt.snapshot().cache_map
            return {"object": "vramchat.memory", "model": rt.model_id, "policy": rt.policy, "auto": rt.auto,
                    "memory": asdict(rt.memory()), "context": asdict(rt.context()),
                    "cache_map": cmap.to_json() if cmap is not None else [],
                    "queue": {"running": serving.running is not None, "waiting": serving.waiting(),
                              "max": serving.max_queue}}
        try:
            return JSONResponse(await run_in_threadpool(snapshot))
        except Exception as e:  # noqa: BLE001 -- the cache was being replaced mid-read
            return error(503, f"memory snapshot unavailable right now ({type(e).__name__}); retry",
                         "busy", headers={"Retry-After": "1"})

    def parse(raw: bytes, chat: bool) -> schema.ChatRequest:
        if chat:
            return schema.parse(raw, serving.models, serving.rt.window, serving.max_new_tokens, serving.sampling)
        return schema.parse_completion(raw, serving.models, serving.rt.window, serving.sampling)

    async def answer(request: Request, chat: bool) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        try:
            raw = await _read_body(request, max_body)
        except _TooLarge as e:
            return error(413, f"the request body is {e.args[0]:,}+ bytes; the limit is {max_body:,}", "too_large")
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            req = parse(raw, chat)
        except schema.RequestError as e:
            return error(400, str(e), e.code, e.field)
        job = Job(req, asyncio.get_running_loop())
        try:
            serving.submit(job)
        except Busy as e:
            return error(429, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)})
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job.stop))
        try:
            first = await job.events.get()
        except BaseException:
            job.stop.set()
            watcher.cancel()
            raise
        kind, data = first
        if kind in ("error", "gone"):
            watcher.cancel()
            return Response(status_code=499) if kind == "gone" else error(*data)
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            return StreamingResponse(_stream(job, first, watcher, base, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pieces = []
            while kind == "token":
                pieces.append(data)
                kind, data = await job.events.get()
        finally:
            watcher.cancel()
        if kind == "gone":
            return Response(status_code=499)
        if kind == "error":
            return error(*data)
        return JSONResponse({**base, "choices": [_choice(chat, "".join(pieces), data.finish_reason)],
                             "usage": _usage(data), "vramchat": _extension(data)})

    async def _stream(job: Job, first, watcher, base: dict, chat: bool):
        if chat:
            base = {**base, "object": "chat.completion.chunk"}

        def chunk(text: str, finish=None, **extra) -> str:
            return _sse({**base, "choices": [_choice(chat, text, finish, delta=True)], **extra})
        try:
            if chat:
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None, "logprobs": None}]})
            kind, data = first
            while kind == "token":
                yield chunk(data)
                kind, data = await job.events.get()
            if kind == "done":
                yield chunk("", data.finish_reason, vramchat=_extension(data))
                if job.req.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(data)})
            elif kind == "error":
                yield _sse({"error": {"message": data[1], "type": "server_error", "param": None, "code": data[2]}})
            if kind != "gone":
                yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            job.stop.set()  # a client gone mid-answer: the decode stops before its next token

    async def chat(request: Request) -> Response:
        return await answer(request, chat=True)

    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    async def prometheus(request: Request) -> Response:
        if (refusal := denied(request)) is not None:
            return refusal
        try:
            text = await run_in_threadpool(metrics.exposition, serving)
        except Exception as e:  # noqa: BLE001 -- the cache was being replaced mid-read
            return error(503, f"metrics unavailable right now ({type(e).__name__}); retry", "busy",
                         headers={"Retry-After": "1"})
        return Response(text, media_type=metrics.CONTENT_TYPE)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        what = "no such endpoint" if exc.status_code == 404 else exc.detail
        return error(exc.status_code, f"{request.method} {request.url.path}: {what} (vramchat serves "
                     "GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /v1/vramchat/memory, "
                     "GET /metrics)")

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/vramchat/memory", memory, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
