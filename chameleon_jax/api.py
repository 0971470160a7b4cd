"""The user-facing model object and ``load`` (DESIGN.md's public API)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint import read_hf_params
from .config import ChameleonConfig
from .errors import ChameleonError
from .model import Chameleon, causal_mask, default_positions

_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def _forward(module, params, input_ids, attention_mask, position_ids, pixel_values, suppress_image_tokens):
    mask = causal_mask(attention_mask)
    logits, _ = module.apply(
        {"params": params}, input_ids, position_ids, mask, pixel_values,
        suppress_image_tokens=suppress_image_tokens,
    )
    return logits


@dataclass
class ChameleonModel:
    """A loaded model: ``config`` (dataclass), ``module`` (Linen), ``params`` (pytree)."""

    config: ChameleonConfig
    params: Any
    module: Chameleon = field(init=False)

    def __post_init__(self):
        self.module = Chameleon(self.config)
        self._logits_fn = jax.jit(
            lambda *a, suppress: _forward(self.module, *a, suppress), static_argnames=("suppress",)
        )
        self._image_fn = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=Chameleon.image_tokens))

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, input_ids, attention_mask, pixel_values, position_ids):
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ChameleonError(f"input_ids: expected an integer array [batch, seq], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= c.vocab_size):
            raise ChameleonError(f"input_ids: ids must lie in [0, {c.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if ids.shape[1] > c.max_position_embeddings:
            raise ChameleonError(
                f"input_ids: sequence length {ids.shape[1]} exceeds max_position_embeddings "
                f"{c.max_position_embeddings}"
            )
        if attention_mask is None:
            mask = np.ones(ids.shape, np.int32)
        else:
            mask = np.asarray(attention_mask)
            mask = mask[None] if mask.ndim == 1 else mask
            if mask.shape != ids.shape:
                raise ChameleonError(f"attention_mask: shape {mask.shape} does not match input_ids {ids.shape}")
            mask = mask.astype(np.int32)
        if position_ids is None:
            pos = np.asarray(default_positions(mask))
        else:
            pos = np.asarray(position_ids)
            pos = np.broadcast_to(pos[None] if pos.ndim == 1 else pos, ids.shape)
        vocab = c.image_vocab
        n_slots = int(np.sum(ids == vocab.image_token_id)) if vocab.image_token_id is not None else 0
        pixels = None
        if pixel_values is not None:
            pixels = np.asarray(pixel_values, np.float32)
            vq = c.vq_config
            if vq is None:
                raise ChameleonError("pixel_values: this checkpoint has no vq_config (no image tokenizer)")
            want = (vq.in_channels, vq.resolution, vq.resolution)
            if pixels.ndim != 4 or pixels.shape[1:] != want:
                raise ChameleonError(f"pixel_values: expected [N, {want[0]}, {want[1]}, {want[2]}], got {pixels.shape}")
            if vocab.image_token_id is None:
                raise ChameleonError("pixel_values: the vocabulary map has no <image> token")
            need = pixels.shape[0] * vq.tokens_per_image
            if n_slots != need:
                raise ChameleonError(
                    f"input_ids hold {n_slots} <image> placeholder tokens but {pixels.shape[0]} image(s) need "
                    f"{need} ({vq.tokens_per_image} each)"
                )
        elif n_slots:
            raise ChameleonError(f"input_ids hold {n_slots} <image> placeholder tokens but no pixel_values were given")
        return ids.astype(np.int32), mask, pos.astype(np.int32), pixels

    # ------------------------------------------------------------------ public
    def logits(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None,
               suppress_image_tokens: bool = True) -> np.ndarray:
        """Next-token logits [B, T, V] float32 (numpy).

        Default positions count from each row's first real token, so left padding changes
        nothing. Image-token logits are set to the float32 minimum, as transformers does, unless
        ``suppress_image_tokens=False`` (image generation).
        """
        ids, mask, pos, pixels = self._check_inputs(input_ids, attention_mask, pixel_values, position_ids)
        out = self._logits_fn(self.params, ids, mask, pos, pixels, suppress=suppress_image_tokens)
        return np.asarray(out)

    def image_tokens(self, pixel_values) -> np.ndarray:
        """pixel_values [N, 3, H, W] -> BPE ids of the image tokens [N, tokens_per_image]."""
        if self.config.vq_config is None:
            raise ChameleonError("pixel_values: this checkpoint has no vq_config (no image tokenizer)")
        return np.asarray(self._image_fn(self.params, jnp.asarray(pixel_values, jnp.float32)))


def load(path: str | os.PathLike, dtype: str | None = "float32", mesh=None) -> ChameleonModel:
    """Load an HF Chameleon directory (config.json + model.safetensors or a sharded index).

    ``dtype``: params are cast to it and it becomes the compute dtype ("float32", "bfloat16");
    None keeps the checkpoint's dtype.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ChameleonError(f"{path}: no such directory (expected an HF Chameleon checkpoint directory)")
    if mesh is not None:
        raise ChameleonError("mesh: sharded loading is not available yet (planned with the Orbax/sharding issue)")
    config = ChameleonConfig.from_json_file(os.path.join(path, "config.json"))
    if dtype is not None:
        if str(dtype) not in _DTYPE_NAMES:
            raise ChameleonError(f"dtype: {dtype!r} is not supported; expected one of {sorted(set(_DTYPE_NAMES))}")
        dtype = _DTYPE_NAMES[str(dtype)]
        config = config.replace(dtype=dtype)
    params = read_hf_params(path, config, dtype=dtype)
    if dtype is None:
        leaves = jax.tree.leaves(params)
        config = config.replace(dtype=str(leaves[0].dtype) if leaves else "float32")
    return ChameleonModel(config, params)
