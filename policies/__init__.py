"""KV-cache policies: the registry, the spec parser and one module per policy.

Importing this package registers every policy that lives here; `offload` registers its
own when imported. `policies` never imports `app` or `offload`.
"""
from .registry import REGISTRY, Opt, Policy, SpecError, parse_spec, register  # noqa: F401
from .base import Chunk, KVCache, LayerCache, ModelInfo  # noqa: F401
from . import full  # noqa: F401  (registers `full`)
from . import kivi  # noqa: F401  (registers `kivi`)
from . import locret  # noqa: F401  (registers `locret`)
