"""Image mode: Meta's image decoder with 3-stream classifier-free guidance, in the jitted loop.

What a call does (facts from Meta's ``chameleon/inference/chameleon.py``, checked against it):

- Each prompt ends with the begin-of-image token (``<racm3:break>``); it is appended when missing.
- Three streams per prompt, each its own cache row with positions from 0 and no pads attended:
  ``full`` = the prompt; ``image`` = only its bos, boi, eoi and image tokens (the ``<image>``
  placeholders, which take the images' VQ tokens, and any IMGIMG ids already in the prompt);
  ``uncond`` = [bos, boi]. For a prompt without images ``image`` equals ``uncond``.
- Every step mixes the streams' next-token logits, ``u + s_img * (i - u) + s_txt * (f - i)``, over
  the image tokens only, then temperature, then top-p (and top-k if asked), draws one token, and
  feeds it to all three streams. Exactly ``image_seq_length`` tokens; the closing eoi is not
  generated (Meta forces it without a model call).
- ``guidance_scale_text == guidance_scale_image == 1`` is no guidance: the full stream alone (one
  cache row per prompt instead of three).

The rows of all prompts go through :class:`~.sampler.Generator` at once: one prefill, one
``while_loop``, no host round trip per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import ChameleonConfig
from ..errors import ChameleonError
from ..vocab import BOI_TOKEN, EOI_TOKEN
from .processors import GenerationSettings

DEFAULT_GUIDANCE_TEXT = 3.0
DEFAULT_GUIDANCE_IMAGE = 1.2


@dataclass(frozen=True)
class ImageSettings:
    """The settings of an image-mode call; ``validate`` raises ChameleonError."""

    guidance_scale_text: float = DEFAULT_GUIDANCE_TEXT
    guidance_scale_image: float = DEFAULT_GUIDANCE_IMAGE
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0

    def validate(self, config: ChameleonConfig, prompt_length: int) -> tuple["ImageSettings", GenerationSettings]:
        """-> (checked self, the decode-loop settings for ``image_seq_length`` tokens)."""
        scales = []
        for name in ("guidance_scale_text", "guidance_scale_image"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)) \
                    or not np.isfinite(v) or v < 0:
                raise ChameleonError(f"{name}: expected a finite number >= 0 (1 = the stream alone), got {v!r}")
            scales.append(float(v))
        vq = config.vq_config
        if vq is None:
            raise ChameleonError("generate_image: this checkpoint has no vq_config, so it has no image tokens")
        n = vq.tokens_per_image
        # room for the image and the eoi that closes it (the +1 boi is counted in prompt_length)
        if prompt_length + n + 1 > config.max_position_embeddings and config.rope_type != "dynamic":
            raise ChameleonError(
                f"input_ids: a prompt of {prompt_length} tokens (with the begin-of-image token) leaves no room "
                f"for an image: it needs {n} image tokens + 1 end-of-image token, and max_position_embeddings "
                f"is {config.max_position_embeddings}; shorten the prompt to at most "
                f"{config.max_position_embeddings - n - 1} tokens")
        loop = GenerationSettings(max_new_tokens=n, do_sample=self.do_sample, temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        loop = loop.validate(config, 0)
        checked = dataclasses.replace(self, guidance_scale_text=scales[0], guidance_scale_image=scales[1],
                                      temperature=loop.temperature, top_p=loop.top_p, top_k=loop.top_k,
                                      seed=loop.seed, do_sample=bool(self.do_sample))
        return checked, loop

    @property
    def streams(self) -> int:
        return 1 if self.guidance_scale_text == 1.0 and self.guidance_scale_image == 1.0 else 3


def special_ids(config: ChameleonConfig) -> tuple[int | None, int, int]:
    """(bos, boi, eoi) ids from the config and vocabulary map (never literals)."""
    vm = config.vocabulary_map or {}
    if BOI_TOKEN not in vm or EOI_TOKEN not in vm:
        raise ChameleonError(
            f"vocabulary_map: image generation needs the begin/end-of-image tokens {BOI_TOKEN!r} and "
            f"{EOI_TOKEN!r}; this config's vocabulary_map lacks "
            f"{[t for t in (BOI_TOKEN, EOI_TOKEN) if t not in vm]}")
    return config.bos_token_id, int(vm[BOI_TOKEN]), int(vm[EOI_TOKEN])


def build_streams(ids: np.ndarray, mask: np.ndarray, config: ChameleonConfig, streams: int):
    """Checked, left-padded prompts [B, T] -> the cache rows of image mode.

    Returns (rows [B * streams, L] int32 left-padded, row mask, image_order [M] int32: for each
    run of ``<image>`` placeholders in the rows, in order, the index of the image it takes), and
    the prompt length including the appended boi (the longest full stream).
    """
    bos, boi, eoi = special_ids(config)
    vocab = config.image_vocab
    placeholder = vocab.image_token_id
    keep = {boi, eoi} | ({bos} if bos is not None else set())
    per_image = config.vq_config.tokens_per_image
    rows, order, first_image = [], [], 0
    for b in range(ids.shape[0]):
        real = ids[b][mask[b] > 0].astype(np.int64)
        if real.size == 0 or real[-1] != boi:
            real = np.append(real, boi)
        n_slots = int(np.sum(real == placeholder)) if placeholder is not None else 0
        mine = list(range(first_image, first_image + n_slots // per_image))
        first_image += len(mine)
        rows.append(real)
        order += mine
        if streams == 3:
            is_image = np.isin(real, list(keep)) | vocab.is_image_token(real)
            if placeholder is not None:
                is_image |= real == placeholder
            rows.append(real[is_image])
            order += mine  # the image-conditioned stream sees the same images again
            rows.append(np.array(([bos] if bos is not None else []) + [boi], np.int64))
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), config.pad_token_id or 0, np.int32)
    row_mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = r
        row_mask[i, width - len(r):] = 1
    longest = max(len(r) for r in rows[::streams])
    return out, row_mask, np.asarray(order, np.int32), longest
