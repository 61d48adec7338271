"""A chat- or text-completions request, checked field by field: every refusal names its field.

Fields the OpenAI API defines but vramchat cannot honour (`n` > 1, tools, logprobs,
penalties, JSON modes) are refused when they ask for something, never silently dropped;
fields it does not know are ignored, as other OpenAI-compatible servers do, because
clients send their own (`user`, `metadata`, ...). The vramchat extension lives under one
key, `vramchat`, and is strict. Sampling fields a request leaves out take the model's own
defaults (`model_defaults`), as vLLM does, not OpenAI's temperature 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from app.runtime.types import Sampling

MAX_STOP = 4  # the OpenAI API's limit on `stop` sequences
TEXT_MAX_TOKENS = 16  # the legacy completions API's default answer length (OpenAI's, vLLM's)
AUTO = "auto"  # app.runtime.auto.AUTO (not imported: it loads torch)


class RequestError(Exception):
    """A bad request: `field` is the JSON path of what is wrong ("" for the body)."""

    def __init__(self, field: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.code = field or None, code


@dataclass
class ChatRequest:
    """A chat request (system, history, question, and `prefix` where the last message is the
    assistant's, to be continued), or a text completion (`prompt`: raw text, no template)."""

    model: str
    system: str | None = None
    history: list[dict] = field(default_factory=list)  # user/assistant messages before the question
    question: str = ""
    prefix: str | None = None  # a final assistant message: the answer begins with it
    prompt: str | None = None  # POST /v1/completions
    stream: bool = False
    include_usage: bool = False
    max_tokens: int = 1024
    temperature: float = 0.0  # the server's defaults (`model_defaults`) when the request has none
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    policy: str | None = None  # vramchat.policy: None = the server's default


def model_defaults(model) -> tuple[Sampling, str]:
    """The sampling a request gets for the fields it leaves out: what the model's
    generation_config.json sets (only what it sets, as vLLM reads it), else greedy, as
    `ask` and the app answer. A config that does not set `do_sample` means greedy, as
    `generate()` reads it. -> (defaults, where they come from, in words)."""
    gc = getattr(model, "generation_config", None)
    set_ = gc.to_diff_dict() if gc is not None else {}
    if not any(k in set_ for k in ("do_sample", "temperature", "top_p", "top_k")):
        return Sampling(), "the model's generation config sets no sampling"
    if not set_.get("do_sample"):
        return Sampling(), "the model's generation config does not set do_sample"
    s = Sampling(temperature=float(set_.get("temperature", 1.0)), top_p=float(set_.get("top_p", 1.0)),
                 top_k=int(set_.get("top_k") or 0))
    return s, "the model's generation config"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _number(body: dict, key: str, lo: float, hi: float, default):
    v = body.get(key)
    if v is None:
        return default
    if not _is_num(v):
        raise RequestError(key, f"must be a number, got {json.dumps(v)[:40]}", "invalid_type")
    if not lo <= v <= hi:
        raise RequestError(key, f"{v} is out of range [{lo}, {hi}]")
    return float(v)


def _content(m: dict, where: str) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}.content[{j}]", f"only text parts are supported (got {kind!r})",
                                   "invalid_type")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"{where}.content", "must be a string or a list of text parts", "invalid_type")


def _messages(body: dict) -> tuple[str | None, list[dict], str, str | None]:
    """-> (system, history, question, prefix): a final assistant message is continued (vLLM's
    `continue_final_message`), so it must follow the user's question."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages", "must be a non-empty list of {role, content}",
                           "missing" if msgs is None else "invalid_type")
    system, turns = [], []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(where, "must be an object {role, content}", "invalid_type")
        role = m.get("role")
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"{where}.role", "a system message after the conversation began is "
                                   "not supported; put system messages first")
            system.append(_content(m, where))
        elif role in ("user", "assistant"):
            if m.get("tool_calls"):
                raise RequestError(f"{where}.tool_calls", "tool calls are not supported", "unsupported")
            turns.append({"role": role, "content": _content(m, where)})
        else:
            raise RequestError(f"{where}.role", f"{json.dumps(role)[:40]} is not supported "
                               "(system, developer, user or assistant)", "unsupported")
    last = len(msgs) - 1
    prefix = turns.pop()["content"] if turns and turns[-1]["role"] == "assistant" else None
    if not turns or turns[-1]["role"] != "user":
        raise RequestError(f"messages[{last}].role", "the last message must be from the user, or an assistant "
                           "message to continue right after the user's")
    at = last - (prefix is not None)
    if not turns[-1]["content"].strip():
        raise RequestError(f"messages[{at}].content", "the question is empty")
    return ("\n\n".join(system) or None), turns[:-1], turns[-1]["content"], prefix


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("n", "only n=1 is supported (one answer per request)", "unsupported")
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise RequestError(key, "not supported by vramchat serve", "unsupported")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise RequestError("tool_choice", "tools are not supported", "unsupported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise RequestError("logprobs" if body.get("logprobs") else "top_logprobs", "not supported", "unsupported")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, -2.0, 2.0, 0.0) != 0.0:
            raise RequestError(key, "not supported (only 0)", "unsupported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format", "only {\"type\": \"text\"} is supported", "unsupported")


def _body(raw: bytes, models: list[str]) -> tuple[dict, str]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError("", f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("", "the request body must be a JSON object", "invalid_json")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model", "required: a model id from GET /v1/models" if model is None
                           else "must be a string: a model id from GET /v1/models",
                           "missing" if model is None else "invalid_type")
    if model not in models:
        raise RequestError("model", f"unknown model {model!r}; this server serves {', '.join(map(repr, models))}",
                           "model_not_found")
    return body, model


def parse(raw: bytes, models: list[str], max_tokens_limit: int, default_max_tokens: int,
          defaults: Sampling | None = None) -> ChatRequest:
    """A chat-completions body -> ChatRequest, or RequestError naming the first bad field."""
    body, model = _body(raw, models)
    system, history, question, prefix = _messages(body)
    _refuse_unsupported(body)
    req = ChatRequest(model=model, system=system, history=history, question=question, prefix=prefix)
    return _options(body, req, max_tokens_limit, default_max_tokens, defaults or Sampling())


def parse_completion(raw: bytes, models: list[str], max_tokens_limit: int,
                     defaults: Sampling | None = None) -> ChatRequest:
    """A legacy text-completions body (`prompt`: raw text, no chat template) -> ChatRequest."""
    body, model = _body(raw, models)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise RequestError("prompt", f"one prompt per request (got {len(prompt)})", "unsupported")
    if not isinstance(prompt, str):
        raise RequestError("prompt", "required: the text to continue" if prompt is None else
                           "must be a string (token-id prompts are not supported)",
                           "missing" if prompt is None else "invalid_type")
    if not prompt:
        raise RequestError("prompt", "is empty")
    for key, why in (("echo", "the prompt is not echoed"), ("suffix", "insertion is not supported")):
        if body.get(key):
            raise RequestError(key, f"not supported ({why})", "unsupported")
    if body.get("logprobs") is not None and body.get("logprobs") is not False:
        raise RequestError("logprobs", "not supported", "unsupported")
    if body.get("best_of") not in (None, 1):
        raise RequestError("best_of", "only best_of=1 is supported", "unsupported")
    body = {k: v for k, v in body.items() if k not in ("logprobs", "echo")}
    _refuse_unsupported(body)
    req = ChatRequest(model=model, prompt=prompt)
    return _options(body, req, max_tokens_limit, TEXT_MAX_TOKENS, defaults or Sampling())


def _options(body: dict, req: ChatRequest, max_tokens_limit: int, default_max_tokens: int,
             defaults: Sampling) -> ChatRequest:
    """The fields chat and text completions share: streaming, length, sampling, stop, vramchat."""
    from policies import SpecError, parse_spec
    for key in ("stream",):
        v = body.get(key)
        if v is not None and not isinstance(v, bool):
            raise RequestError(key, "must be true or false", "invalid_type")
    req.stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise RequestError("stream_options", "must be {\"include_usage\": true|false}", "invalid_type")
        req.include_usage = bool(opts.get("include_usage"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(key)
    if mt is not None:
        if not _is_int(mt):
            raise RequestError(key, f"must be an integer, got {json.dumps(mt)[:40]}", "invalid_type")
        if mt < 1:
            raise RequestError(key, f"{mt}: must be at least 1")
        if mt > max_tokens_limit:
            raise RequestError(key, f"{mt:,} is more than this server allows in one answer "
                               f"({max_tokens_limit:,} tokens, the model's context window)")
    req.max_tokens = mt if mt is not None else min(default_max_tokens, max_tokens_limit)
    req.temperature = _number(body, "temperature", 0.0, 2.0, defaults.temperature)
    req.top_p = _number(body, "top_p", 0.0, 1.0, defaults.top_p)
    if req.top_p == 0.0:
        raise RequestError("top_p", "must be greater than 0")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise RequestError("top_k", "must be an integer >= 0 (0 = off)", "invalid_type")
    req.top_k = defaults.top_k if top_k is None else top_k
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError("seed", "must be an integer", "invalid_type")
    req.seed = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop", "must be a non-empty string or a list of them", "invalid_type")
    if len(stops) > MAX_STOP:
        raise RequestError("stop", f"at most {MAX_STOP} sequences (got {len(stops)})")
    req.stop = stops
    ext = body.get("vramchat")
    if ext is not None:
        if not isinstance(ext, dict):
            raise RequestError("vramchat", "must be an object, e.g. {\"policy\": \"locret\"}", "invalid_type")
        extra = sorted(set(ext) - {"policy"})
        if extra:
            raise RequestError(f"vramchat.{extra[0]}", "unknown option (vramchat options: policy)", "unknown_field")
        spec = ext.get("policy")
        if spec is not None:
            if not isinstance(spec, str):
                raise RequestError("vramchat.policy", "must be a policy spec string", "invalid_type")
            spec = spec.strip()
            try:
                if spec != AUTO:
                    parse_spec(spec)
            except SpecError as e:
                raise RequestError("vramchat.policy", str(e)) from None
            req.policy = spec
    return req
