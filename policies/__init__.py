"""KV-cache policies: the registry, the spec parser and one module per policy.

Importing this package registers every policy, `offload`'s included: the registry imports
each module its `MODULES` lists (policies/registry.py). `policies` never imports `app`.
"""
from .registry import REGISTRY, Opt, Policy, SpecError, parse_spec, register  # noqa: F401
from .base import Chunk, KVCache, LayerCache, ModelInfo  # noqa: F401
from . import registry as _registry

_registry.load()
