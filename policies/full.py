"""`full`: keep every token in full precision. The reference every policy is tested against."""
from __future__ import annotations

from .base import KeepAll
from .registry import register


@register("full", "selector", {}, "keep every token at full precision (the reference; memory grows with the context)")
def build(policy, info, layer):
    return KeepAll(info)
