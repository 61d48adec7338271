"""What the KV cache encodes, as text and as token ids: the one record of it.

The runtime renders the conversation to text and keeps the cache holding a prefix of that
rendering. `Held` knows which text and which ids the cache encodes, where the last answer
began in that text (the chat template may render an answer differently once it is part of
the history: a difference inside it is tolerated) and the marks where a read ended (the
points the cache can be cut back to when the history is edited). Every change goes through
its methods; cache files (`snapshot.py`) save and restore it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .session import common_prefix


@dataclass
class Held:
    text: str = ""  # the rendering of the conversation the cache encodes
    answer_start: int | None = None  # index in text where the last answer began
    marks: list = field(default_factory=list)  # [(len(text), tokens)] where a read ended
    ids: list = field(default_factory=list)  # the token ids the cache encodes, in order
    answer: str | None = None  # saved copies only: the last answer as the conversation records it

    def clear(self) -> None:
        self.text, self.answer_start, self.marks, self.ids = "", None, [], []

    def replace(self, other: "Held", messages: list | None = None) -> None:
        """Hold what `other` (a cache file's record) holds; `messages`: the conversation it is
        restored under (its last answer is tolerated only if they still end with it as saved)."""
        self.text = other.text
        self.answer_start = other.answer_start if messages is None else other.answer_start_for(messages)
        self.marks, self.ids = [tuple(m) for m in other.marks], list(other.ids)

    def saved(self, answer: str | None) -> "Held":
        """A copy to write beside the cache; `answer`: the conversation's last answer, if it ends with one."""
        return Held(self.text, self.answer_start, list(self.marks), list(self.ids), answer)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    # ---- reads ----------------------------------------------------------------------
    def keeps(self, target: str, truncate) -> int | None:
        """How many characters of `target` the cache keeps, after cutting it back where the
        history differs (`truncate(tokens) -> bool`: the cache's); None: it cannot be cut
        there and must be emptied and read anew."""
        keep = common_prefix(self.text, target)
        if keep == len(self.text):
            return keep
        # Inside the last answer the template may render it differently (whitespace it strips,
        # reasoning it drops): tolerated. Else cut back to the last read end both share (a chat
        # edited or regenerated), if the cache can be.
        if self.answer_start is not None and self.answer_start <= keep < len(target):
            return keep
        marks = [m for m in self.marks if m[0] <= keep and m[0] < len(target)]  # the new text's last token
        if not marks or not truncate(marks[-1][1]):  # must be read for its logits
            return None
        self.marks = marks
        del self.ids[marks[-1][1]:]
        self.text, self.answer_start = self.text[:marks[-1][0]], None
        return len(self.text)

    def read(self, target: str, ids, tokens: int) -> None:
        """The cache read `ids` and now holds `target` (`tokens` in all)."""
        self.text, self.answer_start = target, None
        self.marks.append((len(target), tokens))
        self.ids.extend(int(i) for i in ids)

    def begin_answer(self) -> None:
        self.answer_start = len(self.text)

    def answered(self, text: str, ids, tokens: int) -> None:
        """The cache decoded `ids` (rendered `text`) after the answer began."""
        self.text += text
        self.ids.extend(int(i) for i in ids)
        self.marks.append((len(self.text), tokens))

    def no_answer(self) -> None:
        """The conversation no longer ends with the answer as it was given: no tolerance inside it."""
        self.answer_start = None

    def covers(self, target: str) -> bool:
        """Whether the cache continues into `target` without cutting back (the rule of `keeps`)."""
        n = common_prefix(self.text, target)
        return n == len(self.text) or (self.answer_start is not None and self.answer_start <= n < len(target))

    def answer_start_for(self, messages: list) -> int | None:
        """Where the last answer begins, if `messages` still end with that answer as it was
        saved (`answer`), else None: an edited answer is cut back like any other edit."""
        last = messages[-1] if messages else None
        if last is None or last.get("role") != "assistant" or last.get("content") != self.answer:
            return None
        return self.answer_start
