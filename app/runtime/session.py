"""The conversation as the model's chat template renders it, incrementally.

The cache holds the rendering of the conversation so far (`Held.text`, held.py). Each new
message is rendered as part of the whole conversation and only the part past the
longest common prefix is prefilled, so history is never re-read. Documents are user
content: consecutive documents and the question after them merge into one user
message (templates like Mistral's require user/assistant alternation). A document is
prefilled *before* the question is known by rendering it with a sentinel where the
rest of the user message will go and cutting there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .types import VramchatError

SENTINEL = "\u2063VRAMCHAT-CONTINUES\u2063"


def document_block(name: str, text: str) -> str:
    return f"<document name=\"{name}\">\n{text.strip()}\n</document>"


@dataclass
class Conversation:
    system: str | None = None
    messages: list = field(default_factory=list)  # role: user | assistant | document

    @classmethod
    def from_saved(cls, data: dict) -> "Conversation":
        """A saved conversation (`Runtime.to_json`), checked: VramchatError names what is wrong."""
        msgs = data.get("messages")
        if not isinstance(msgs, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "document")
                and isinstance(m.get("content"), str) for m in msgs):
            raise VramchatError("not a vramchat conversation: `messages` must be a list of "
                                "{role: user|assistant|document, content: text}")
        for m in msgs:
            if m["role"] == "document" and not isinstance(m.get("name"), str):
                m["name"] = "document"
        return cls(system=data.get("system") or None, messages=list(msgs))

    def template_messages(self, pending: list | None = None) -> list[dict]:
        """Messages as the chat template sees them: system first, user runs merged."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for m in self.messages + (pending or []):
            if m["role"] == "assistant":
                out.append({"role": "assistant", "content": m["content"]})
                continue
            piece = document_block(m["name"], m["content"]) if m["role"] == "document" else m["content"]
            if out and out[-1]["role"] == "user":
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + piece}
            else:
                out.append({"role": "user", "content": piece})
        return out

    def render(self, tokenizer, pending: list | None = None, open_user: bool = False,
               answer_prefix: str | None = None) -> str:
        """Text of the conversation (+ pending). open_user: end inside the last user
        message, ready for more content; answer_prefix: end inside an assistant message
        that begins with it (the model continues it); else end with the assistant prompt."""
        msgs = self.template_messages(pending)
        if answer_prefix is not None:
            return _cut_at_sentinel(tokenizer, msgs + [{"role": "assistant", "content": answer_prefix + SENTINEL}])
        if open_user:
            if msgs and msgs[-1]["role"] == "user":
                msgs[-1] = {"role": "user", "content": msgs[-1]["content"] + "\n\n" + SENTINEL}
            else:
                msgs.append({"role": "user", "content": SENTINEL})
            return _cut_at_sentinel(tokenizer, msgs)
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False,
                                             add_generation_prompt=msgs[-1]["role"] == "user")

    def rendered(self, tokenizer) -> str:
        """The conversation so far as the cache holds it between turns (after a document the
        user turn stays open for the question)."""
        return self.render(tokenizer, open_user=bool(self.messages) and self.messages[-1]["role"] == "document")

    def to_json(self) -> dict:
        return {"system": self.system, "messages": [dict(m) for m in self.messages]}


def _cut_at_sentinel(tokenizer, msgs: list[dict]) -> str:
    """The template's rendering of msgs up to the SENTINEL in the last message's content."""
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    cut = text.find(SENTINEL)
    if cut < 0:
        raise VramchatError(f"this model's chat template drops the content of a final {msgs[-1]['role']} "
                            "message, so it cannot end inside one")
    return text[:cut]


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on prefix equality: O(n log n) compares of slices
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def with_bos(tok, prompt: str) -> str:
    """Raw text as a tokenizer that begins every text with BOS would read it: BOS first."""
    bos = tok.bos_token
    if bos and not prompt.startswith(bos) and tok("a")["input_ids"][:1] == [tok.bos_token_id]:
        return bos + prompt
    return prompt
