"""Interleaved text + image output: text mode until the model opens an image, image mode for it, repeat.

What a call does, per prompt row (rows are independent; each runs its own segments):

1. Any ``<image>`` placeholders in the prompt are replaced by their images' VQ tokens once, so every
   later call sees plain ids.
2. Text mode (:meth:`ChameleonModel.generate`, image tokens suppressed) runs until the model emits
   the begin-of-image token (``<racm3:break>``), a stop token (config eos or ``stop_token_ids``) or
   the text budget (``max_new_tokens``, counted over all text segments) runs out.
3. On a begin-of-image token, image mode (:meth:`ChameleonModel.generate_image`, with its guidance)
   draws ``image_seq_length`` tokens after it; the end-of-image token is appended, as Meta's
   ``chameleon/inference`` forces it, and text mode resumes on the whole sequence so far.
4. The begin-of-image token ends the row instead when ``max_images`` images are out or the image
   would not fit in ``max_position_embeddings`` (Meta bans it there).

This is a host loop over segments: each segment re-reads the sequence so far in one prefill (no
cache is carried across segments), which costs one prompt-length prefill per segment and keeps
each call on the same compiled programs as plain text and image generation.
"""

from __future__ import annotations

import numpy as np

from ..errors import ChameleonError
from .image import special_ids

TEXT_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens")
IMAGE_KEYS = ("guidance_scale_text", "guidance_scale_image", "do_sample", "temperature", "top_p", "top_k")


def _row_seed(seed: int, row: int, segment: int) -> int:
    """A draw seed per (row, segment) from the caller's seed: rows and segments get distinct draws."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, row, segment]).generate_state(1)[0] >> 1)


def generate_interleaved(model, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int = 64,
                         max_images: int = 1, text: dict | None = None, image: dict | None = None,
                         seed: int = 0, stop_token_ids=()) -> list[list[tuple[str, np.ndarray]]]:
    """Per row, the segments it produced, in order: ``("text", ids)`` (int32 token ids, the stop and
    begin-of-image tokens left out; decode them with the processor) or ``("image", ids)`` (int32
    [image_seq_length] image-token ids; :meth:`ChameleonModel.decode_images` draws them).

    ``text`` / ``image``: keyword settings for the text-mode and image-mode calls (as
    ``generate`` / ``generate_image`` take them, minus ``seed``: draws come from ``seed``, the row and
    the segment).
    """
    c = model.config
    for name, v, lo in (("max_new_tokens", max_new_tokens, 1), ("max_images", max_images, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ChameleonError(f"{name}: expected an integer >= {lo}, got {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ChameleonError(f"seed: expected an integer, got {seed!r}")
    text, image = dict(text or {}), dict(image or {})
    for name, kw, allowed in (("text", text, TEXT_KEYS), ("image", image, IMAGE_KEYS)):
        unknown = sorted(set(kw) - set(allowed))
        if unknown:
            raise ChameleonError(f"{name}: unknown setting(s) {unknown}; expected some of {list(allowed)} "
                                 "(seed, max_new_tokens and stop_token_ids are generate_interleaved's own)")
    _, boi, eoi = special_ids(c)
    stops = (stop_token_ids,) if isinstance(stop_token_ids, (int, np.integer)) else tuple(stop_token_ids or ())
    ids, mask, _, pixels = model._check_inputs(input_ids, attention_mask, pixel_values, None)
    if pixels is not None:  # placeholders -> their images' VQ tokens, in placeholder order
        ids = ids.copy()
        ids[ids == c.image_vocab.image_token_id] = model.image_tokens(pixels).reshape(-1)
    n_image = c.vq_config.tokens_per_image if c.vq_config is not None else None
    ends = set(c.eos_token_ids) | {int(s) for s in stops}
    out = []
    for row in range(ids.shape[0]):
        context = ids[row][mask[row] > 0].astype(np.int32)
        if context.size == 0:
            raise ChameleonError(f"attention_mask: row {row} has no real tokens; generation needs a prompt")
        segments, budget, images = [], int(max_new_tokens), 0
        while budget > 0:
            new = model.generate(context[None], max_new_tokens=budget, stop_token_ids=(boi, *stops),
                                 seed=_row_seed(seed, row, len(segments)), **text)[0]
            hits = np.flatnonzero(np.isin(new, [boi, *ends]))
            cut = int(hits[0]) if hits.size else new.size
            words = new[:cut].astype(np.int32)
            budget -= cut + (1 if hits.size else 0)
            if words.size:
                segments.append(("text", words))
            context = np.concatenate([context, words])
            fits = n_image is not None and (context.size + 1 + n_image + 1 <= c.max_position_embeddings
                                            or c.rope_type == "dynamic")
            if not hits.size or int(new[cut]) != boi or images >= max_images or not fits:
                break
            context = np.append(context, boi).astype(np.int32)
            picture = model.generate_image(context[None], seed=_row_seed(seed, row, len(segments)), **image)[0]
            segments.append(("image", picture.astype(np.int32)))
            images += 1
            context = np.concatenate([context, picture, [eoi]]).astype(np.int32)
        out.append(segments)
    return out
