"""Generation: the jitted prefill + on-device decode loop (:mod:`.sampler`) and token choice
(:mod:`.processors`)."""

from .processors import GenerationSettings, Mode, choose_tokens
from .heads import TextHead, VocabHead, guide
from .sampler import Generator, Plan, bucket_length, check_finite

__all__ = ["GenerationSettings", "Generator", "Mode", "Plan", "TextHead", "VocabHead", "bucket_length", "check_finite",
           "choose_tokens", "guide"]
