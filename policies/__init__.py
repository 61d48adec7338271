"""KV-cache policies: the registry, the spec parser and one module per policy.

Importing this package registers every policy that lives here; `offload` registers its
own when imported. `policies` never imports `app` or `offload`.
"""
from .registry import REGISTRY, Opt, Policy, SpecError, parse_spec, register  # noqa: F401
from .base import Chunk, KVCache, LayerCache, ModelInfo  # noqa: F401
from . import static  # noqa: F401  (fixed-shape decode windows)
from . import full  # noqa: F401  (registers `full`)
from . import kivi  # noqa: F401  (registers `kivi`)
from . import locret  # noqa: F401  (registers `locret`)
from . import streaming  # noqa: F401  (registers `streaming`)
from . import h2o  # noqa: F401  (registers `h2o`)
from . import snapkv  # noqa: F401  (registers `snapkv`)
from . import anchor  # noqa: F401  (registers `anchor`)
from . import lighttransfer  # noqa: F401  (registers `lighttransfer`)
from . import ffnskip  # noqa: F401  (registers `ffnskip`)
