"""What the app (the UI, `ask`, `chat`) needs of a runtime, declared: `Runtime` (in process),
`RemoteRuntime` (a server's) and the tests' fake implement it, and tests/test_protocol.py
checks each against it (names, parameters, defaults).

Every method except `memory`, `snapshot` and `context` runs on the model thread, one at a
time; those three read a published state and never block. Long work takes
`progress(done, total)` and a `stop` event, and raises `types.Stopped` when stopped (what
was done is kept); what a person can act on is a `types.VramchatError`.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from .types import CacheState, ContextInfo, ConversionResult, DocumentInfo, MemoryReport, Sampling, TurnResult


@runtime_checkable
class ChatRuntime(Protocol):
    model_id: str
    device: object  # a torch.device, or words for a remote one
    weights: str  # "bf16", "nf4", ... as loaded
    window: int  # the model's native window (0: unknown)
    on_note: Callable[[str], None] | None  # told, from the model thread, what a person should know

    @property
    def policy(self) -> str: ...

    @property
    def auto(self) -> bool: ...  # `auto` chooses the policy as the conversation grows

    @property
    def system(self) -> str | None: ...

    @property
    def messages(self) -> list: ...

    def memory(self) -> MemoryReport: ...

    def snapshot(self) -> CacheState: ...

    def context(self) -> ContextInfo: ...

    def policy_warnings(self) -> list[str]: ...

    def load_document(self, path: str, progress=None, stop=None) -> DocumentInfo: ...

    def ask(self, question: str, *, max_new_tokens: int = 1024, sampling: Sampling | None = None,
            on_token=None, progress=None, stop=None) -> TurnResult: ...

    def set_policy(self, spec: str, progress=None, stop=None, reprefill: bool = False) -> ConversionResult: ...

    def set_system(self, text: str | None) -> None: ...

    def clear(self) -> None: ...

    def to_json(self) -> dict: ...

    def restore(self, data: dict, progress=None, stop=None, cache_file=None) -> str: ...

    def save_cache(self, path, extra: dict | None = None) -> int: ...
