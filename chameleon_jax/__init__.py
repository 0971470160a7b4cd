"""chameleon-jax: Meta's Chameleon mixed-modal model in JAX/Flax."""

from .config import ChameleonConfig, VQConfig, load_preset
from .errors import ChameleonError

__all__ = ["ChameleonConfig", "VQConfig", "ChameleonError", "load_preset"]
__version__ = "0.1.0"

from .api import ChameleonModel, load  # noqa: E402

__all__ += ["ChameleonModel", "load"]
