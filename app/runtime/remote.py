"""RemoteRuntime: the Runtime's face for the app and `ask`, over an OpenAI-compatible server.

vLLM, SGLang, llama-server, Ollama or `vramchat serve`: the conversation stays here and
is sent whole with every question (documents as user content, as the local runtime
renders them); the server owns the model and its cache. What a server does not expose
(KV policy, per-layer bytes, tokens of a document before it is read) is said, not guessed.
"""
from __future__ import annotations

import threading
import time
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit

from . import documents
from .metrics import NOT_REPORTED, RemoteMemory, kv_usage_line, prometheus
from .session import Conversation
from .types import ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Sampling, TurnResult, VramchatError

KEY_ENV = "VRAMCHAT_API_KEY"
POLL_S = 1.0  # the gauge's remote numbers are fetched this often, off the UI thread
def split_url(url: str) -> tuple[str, str]:
    """--backend URL -> (API base ending in /v1 or as given, server root for /metrics)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise VramchatError(f"--backend {url}: give the server's URL, e.g. http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    base = f"{parts.scheme}://{parts.netloc}{path or '/v1'}"
    root = f"{parts.scheme}://{parts.netloc}{path[:-3] if path.endswith('/v1') else path}"
    return base, root


class RemoteRuntime:
    """A server's runtime as the app uses it (`protocol.ChatRuntime`): the conversation is kept
    here and sent whole with every question; the server holds the cache."""

    auto = False  # the server chooses its own policy
    on_note = None  # (the server's notes come with each answer)

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, status=None):
        import httpx
        import openai
        self.base, self.root = split_url(url)
        self.url = url
        self._openai = openai
        # NOTE: openai's own Timeout, never httpx's: openai 3 is built on httpx2 and refuses httpx types.
        self.client = openai.OpenAI(base_url=self.base, api_key=api_key or "none", max_retries=0,
                                    timeout=openai.Timeout(3600.0, connect=10.0))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(5.0), headers=headers)
        self.conv = Conversation()
        self.device, self.weights = f"remote {self.root}", "remote"
        self._policy = "server's"
        self._context = ContextInfo(0, 0, 0)
        self._mem: RemoteMemory | None = None
        self._source: str | None = None  # "vramchat", "prometheus" or "none": what the server exposes
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        if status is not None:
            status(f"connecting to {self.base}")
        self.model_id, self.window = self._pick_model(model)
        self._context = ContextInfo(0, 0, self.window)

    # ---- connection -------------------------------------------------------------------
    def _failure(self, e: Exception, doing: str) -> VramchatError:
        o = self._openai
        if isinstance(e, o.AuthenticationError):
            return VramchatError(f"the backend at {self.base} refused the API key while {doing}: pass "
                                 f"--api-key KEY (or set {KEY_ENV}) with the key the server was started with")
        if isinstance(e, o.RateLimitError):
            wait = e.response.headers.get("retry-after")
            return VramchatError(f"the backend at {self.base} is busy (429)"
                                 + (f"; retry in {wait} s" if wait else "; retry in a moment"))
        if isinstance(e, o.APIStatusError):
            body = e.body if isinstance(e.body, dict) else {}
            msg = body.get("message") or str(e.body or e.message)[:400]
            return VramchatError(f"the backend at {self.base} answered {e.status_code} while {doing}: {msg}")
        if isinstance(e, o.APIConnectionError):
            cause = e.__cause__ or e
            return VramchatError(f"cannot reach the backend at {self.base} while {doing} "
                                 f"({type(cause).__name__}: {cause}). Is the server running at that address?")
        return VramchatError(f"the backend at {self.base} failed while {doing}: {type(e).__name__}: {e}")

    def _pick_model(self, wanted: str | None) -> tuple[str, int]:
        try:
            listed = list(self.client.models.list())
        except self._openai.NotFoundError:
            if wanted:  # some servers have no /models; trust the name given
                return wanted, 0
            raise VramchatError(f"the backend at {self.base} does not list its models (GET /models: 404); "
                                "name one with --model") from None
        except self._openai.OpenAIError as e:
            raise self._failure(e, "listing its models") from None
        ids = [m.id for m in listed]
        if not ids:
            raise VramchatError(f"the backend at {self.base} serves no model")
        name = wanted or ids[0]
        if name not in ids:
            raise VramchatError(f"the backend at {self.base} does not serve {name!r}; it serves: {', '.join(ids)}")
        extra = (listed[ids.index(name)].model_extra or {})
        window = extra.get("max_model_len")
        return name, window if isinstance(window, int) and window > 0 else 0

    def close(self) -> None:
        self._closed.set()
        self.http.close()
        self.client.close()

    # ---- what the panels show ---------------------------------------------------------
    @property
    def policy(self) -> str:
        return self._policy

    @property
    def system(self) -> str | None:
        return self.conv.system

    @property
    def messages(self) -> list:
        return self.conv.messages

    def context(self) -> ContextInfo:
        return self._context

    def policy_warnings(self) -> list[str]:
        return []

    def layer_bytes(self) -> list[int]:
        return []

    def snapshot(self):
        from .types import CacheState
        return CacheState(policy=self._policy, context=self._context)

    def memory(self) -> RemoteMemory:
        """The last numbers fetched (never blocks after the first call: a thread refreshes them)."""
        if self._mem is None:
            self.refresh_memory()
            if self._source != "none":
                self._poller = threading.Thread(target=self._poll, name="vramchat-remote-gauge", daemon=True)
                self._poller.start()
        return self._mem

    def _poll(self) -> None:
        while not self._closed.wait(POLL_S):
            self.refresh_memory()

    def refresh_memory(self) -> RemoteMemory:
        import httpx
        try:
            if self._source in (None, "vramchat"):
                r = self.http.get(f"{self.base}/vramchat/memory")
                data = r.json() if r.status_code == 200 else None
                if isinstance(data, dict) and isinstance(data.get("memory"), dict):
                    self._source = "vramchat"
                    self._policy = str(data.get("policy", self._policy))
                    ctx = data.get("context") or {}
                    self._context = ContextInfo(int(ctx.get("read", 0)), int(ctx.get("retained", 0)),
                                                int(ctx.get("window", self.window)))
                    known = {f.name for f in fields(MemoryReport)}
                    self._mem = RemoteMemory(**{k: v for k, v in data["memory"].items() if k in known},
                                             remote=f"remote: {self.root} · policy {self._policy}")
                    return self._mem
            if self._source in (None, "prometheus"):
                r = self.http.get(f"{self.root}/metrics")
                line = kv_usage_line(prometheus(r.text)) if r.status_code == 200 else None
                if line is not None:
                    self._source = "prometheus"
                    self._mem = RemoteMemory(device=self.device, has_gpu=True, remote=line)
                    return self._mem
            self._source = "none"
            self._mem = RemoteMemory(device=self.device, has_gpu=True, remote=NOT_REPORTED)
        except (httpx.HTTPError, ValueError) as e:
            self._mem = RemoteMemory(device=self.device, has_gpu=True,
                                     remote=f"remote: {self.root} not answering ({type(e).__name__})")
        return self._mem

    # ---- conversation -----------------------------------------------------------------
    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo:
        """Added to the conversation here; the server reads it with the next question."""
        text = documents.read_document(path)
        name = Path(path).name
        self.conv.messages.append({"role": "document", "name": name, "content": text,
                                   "path": str(Path(path).resolve())})
        return DocumentInfo(name, str(path), len(text), 0, 0.0)

    def ask(self, question: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
            on_token=None, progress=None, stop: threading.Event | None = None) -> TurnResult:
        if not question.strip():
            raise VramchatError("empty question")
        if max_new_tokens < 1:
            raise VramchatError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
        s = sampling or Sampling()
        msg = {"role": "user", "content": question}
        kw = dict(model=self.model_id, messages=self.conv.template_messages(pending=[msg]), stream=True,
                  max_tokens=max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                  stream_options={"include_usage": True})
        if s.seed is not None:
            kw["seed"] = s.seed
        if s.top_k:
            kw["extra_body"] = {"top_k": s.top_k}
        t0 = time.perf_counter()
        pieces, chunks, usage, ext, finish, t_first = [], 0, None, {}, None, None
        stream = None
        done = threading.Event()
        try:
            stream = self.client.chat.completions.create(**kw)
            if stop is not None:  # Esc during a long prefill: close the connection, the server stops
                threading.Thread(target=self._close_on_stop, args=(stream, stop, done), daemon=True).start()
            for chunk in stream:
                usage = chunk.usage or usage
                ext = (chunk.model_extra or {}).get("vramchat") or ext
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    piece = choice.delta.content if choice.delta is not None else None
                    if piece:
                        chunks += 1
                        t_first = t_first or time.perf_counter()
                        pieces.append(piece)
                        if on_token is not None:
                            on_token(piece)
                if stop is not None and stop.is_set():
                    break
        except self._openai.OpenAIError as e:
            if stop is None or not stop.is_set() or isinstance(e, self._openai.APIStatusError):
                raise self._failure(e, "answering") from None
        finally:
            done.set()
            if stream is not None:
                stream.close()
        t_end = time.perf_counter()
        stopped = stop is not None and stop.is_set() and finish is None
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", 0) or 0
        n = getattr(usage, "completion_tokens", None) or chunks  # without usage: one chunk per token
        self._policy = ext.get("policy", self._policy) if isinstance(ext, dict) else self._policy
        if usage is not None and self._source != "vramchat":
            self._context = ContextInfo(prompt + n, prompt + n, self.window)
        text = "".join(pieces)
        decode_s = t_end - t_first if t_first else 0.0
        res = TurnResult(
            question=question, answer=text, prompt_tokens=max(prompt - cached, 0), new_tokens=n,
            ttft_s=(t_first or t_end) - t0,
            prefill_tok_s=(prompt - cached) / (t_first - t0) if t_first and prompt else 0.0,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, policy=self._policy,
            stopped=stopped, finish="stopped" if stopped else ("length" if finish == "length" else "stop"),
            decode_mode="remote")
        self.conv.messages.append(msg)
        self.conv.messages.append({"role": "assistant", "content": text, "partial": stopped, "stats": res.to_json()})
        return res

    @staticmethod
    def _close_on_stop(stream, stop: threading.Event, done: threading.Event) -> None:
        while not done.is_set():
            if stop.wait(0.1):
                if not done.is_set():
                    stream.close()
                return

    def set_system(self, text: str | None) -> None:
        self.conv.system = text or None

    def clear(self) -> None:
        self.conv = Conversation(system=self.conv.system)

    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult:
        raise VramchatError(f"switching the KV policy needs the local runtime: this chat runs on the backend at "
                            f"{self.base}, whose server chooses its cache (`vramchat serve --policy SPEC`). "
                            "Restart without --backend to switch policies here.")

    # ---- save / restore ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": self.model_id, "policy": self._policy, "backend": self.base, **self.conv.to_json()}

    def save_cache(self, path, extra: dict | None = None) -> int:
        """The server holds the cache: nothing is written. -> 0."""
        return 0

    def restore(self, data: dict, progress=None, stop=None, cache_file=None) -> str:
        """The conversation only: the server reads it with the next question."""
        self.conv = Conversation.from_saved(data)
        return "the backend reads it with the next question"
