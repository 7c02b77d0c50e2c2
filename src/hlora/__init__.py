"""hlora: federated fine-tuning with LoRA adapters of different ranks on different clients."""

from hlora.config import RunConfig, load_config
from hlora.engine import run

__version__ = "0.1.0"
__all__ = ["RunConfig", "load_config", "run", "__version__"]
