"""Fine-tuning: settings (:mod:`.config`), the sharded step (:mod:`.step`), the loop with exact
resume (:mod:`.trainer`), JSONL data (:mod:`.data`) and LoRA (:mod:`.lora`)."""

from .config import TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
