"""Generation: the jitted prefill + on-device decode loop (:mod:`.sampler`) and token choice
(:mod:`.processors`)."""

from .processors import GenerationSettings, Mode, choose_tokens
from .sampler import Generator, TextHead, bucket_length

__all__ = ["GenerationSettings", "Generator", "Mode", "TextHead", "bucket_length", "choose_tokens"]
