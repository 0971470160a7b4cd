"""chameleon-jax: Meta's Chameleon mixed-modal model in JAX/Flax."""

from .api import ChameleonModel, load
from .config import ChameleonConfig, VQConfig, load_preset
from .errors import ChameleonError
from .hostmem import reuse_freed_memory
from .processing import ChameleonProcessor
from .sharding import make_mesh

__all__ = ["ChameleonConfig", "ChameleonError", "ChameleonModel", "ChameleonProcessor", "TrainConfig", "Trainer",
           "VQConfig", "convert", "export", "load", "load_preset", "make_mesh",
           "reuse_freed_memory"]
__version__ = "0.1.0"


def __getattr__(name):
    # Training pulls in optax and orbax; import it only when asked for.
    if name in ("Trainer", "TrainConfig"):
        from . import training

        return getattr(training, name)
    if name in ("convert", "export"):  # checkpoint conversion (chameleon-jax convert / export)
        from .checkpoint import convert as conversion

        return getattr(conversion, name)
    if name == "demo":  # cj.demo.caption / draw / checkpoint_dir without a separate import
        import importlib

        return importlib.import_module(".demo", __name__)
    raise AttributeError(f"module 'chameleon_jax' has no attribute {name!r}")
