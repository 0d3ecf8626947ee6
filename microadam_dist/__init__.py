"""microadam_dist: a sharded, fused MicroAdam optimizer (arXiv 2405.15593) for DeepSpeed and FSDP.

Public API: `MicroAdam`, `MicroAdamConfig`, `state_bytes`, `Layout`.
"""

from .config import MicroAdamConfig
from .layout import Layout, state_bytes
from .optim import MicroAdam
from . import integrations  # noqa: F401,E402  registers "type": "MicroAdam" with DeepSpeed (lazily)

__version__ = "0.1.0"

__all__ = ["MicroAdam", "MicroAdamConfig", "Layout", "state_bytes", "__version__"]
