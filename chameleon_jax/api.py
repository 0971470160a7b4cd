"""The user-facing model object and ``load`` (DESIGN.md's public API)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .checkpoint.hf import read_hf_params
from .checkpoint.orbax import is_orbax_dir, read_orbax
from .config import ChameleonConfig
from .errors import ChameleonError
from .model import Chameleon, causal_mask, default_positions
from .model.loss import model_loss
from .sharding import batch_sharding, param_shardings, to_host

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
    mesh: Any = None
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
        # Dynamic NTK RoPE exists to run past max_position_embeddings; other kinds may not.
        if ids.shape[1] > c.max_position_embeddings and c.rope_type != "dynamic":
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
        ids, mask, pos, pixels = self.put_batch(ids, mask, pos, pixels)
        out = self._logits_fn(self.params, ids, mask, pos, pixels, suppress=suppress_image_tokens)
        return to_host(out)

    def put_batch(self, *arrays):
        """Place batch-major host arrays on the mesh (batch over data+fsdp); no-op without one."""
        if self.mesh is None:
            return arrays
        return tuple(None if a is None else jax.device_put(a, batch_sharding(self.mesh, a.shape)) for a in arrays)

    def image_tokens(self, pixel_values) -> np.ndarray:
        """pixel_values [N, 3, H, W] -> BPE ids of the image tokens [N, tokens_per_image]."""
        if self.config.vq_config is None:
            raise ChameleonError("pixel_values: this checkpoint has no vq_config (no image tokenizer)")
        (pixels,) = self.put_batch(np.asarray(pixel_values, np.float32))
        return to_host(self._image_fn(self.params, pixels))

    # ------------------------------------------------------------------ generation
    def _generation_inputs(self, input_ids, attention_mask, pixel_values, settings):
        from .generation import GenerationSettings, Generator

        ids, mask, _, pixels = self._check_inputs(input_ids, attention_mask, pixel_values, None)
        if ids.shape[1] == 0:
            raise ChameleonError("input_ids: the prompt is empty; generation needs at least one token")
        bad = np.flatnonzero(mask[:, -1] == 0)
        if bad.size:
            raise ChameleonError(
                f"attention_mask: row {int(bad[0])} ends with padding; generate needs left-padded prompts "
                "(every row's last token real; the processor pads on the left)"
            )
        settings = GenerationSettings(**settings)
        settings = settings.validate(self.config, ids.shape[1])
        if "_generator" not in self.__dict__:
            self._generator = Generator(self.module, self.config, put=self.put_batch)
        return self._generator, ids, mask, pixels, settings

    @staticmethod
    def _settings(max_new_tokens, do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                  stop_token_ids, min_new_tokens) -> dict:
        if stop_token_ids is None:
            stop_token_ids = ()
        elif isinstance(stop_token_ids, (int, np.integer)):
            stop_token_ids = (stop_token_ids,)
        return dict(max_new_tokens=max_new_tokens, do_sample=bool(do_sample), temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, repetition_penalty=repetition_penalty,
                    stop_token_ids=tuple(stop_token_ids), min_new_tokens=min_new_tokens)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, repetition_penalty: float = 1.0, stop_token_ids=None,
                 min_new_tokens: int = 0) -> np.ndarray:
        """Generate text tokens after left-padded prompts: (B, max_new_tokens) int32 numpy, new tokens
        only; after a row's stop token (config eos or ``stop_token_ids``) the row holds pad_token_id.

        Greedy unless ``do_sample`` (or when temperature is 0). Sampling applies, in transformers'
        order, ``repetition_penalty`` (also in greedy mode), ``temperature``, ``top_k`` (0 = off),
        ``top_p`` (1 = off); ``seed`` makes draws reproducible (per row: a row's draws depend only on
        the seed, its row index and the step). ``min_new_tokens`` suppresses stop tokens that long.
        Prompts are left-padded to a length bucket (``generation.bucket_length``), so a new prompt length
        in a seen bucket reuses the compiled program. Image tokens are never generated (text mode); the
        first call keeps a copy of the LM head's text rows for fast decoding (``generation.TextHead``).
        """
        gen, ids, mask, pixels, settings = self._generation_inputs(
            input_ids, attention_mask, pixel_values,
            self._settings(max_new_tokens, do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                           stop_token_ids, min_new_tokens),
        )
        return gen.generate(self.params, ids, mask, pixels, settings)

    def generate_stream(self, input_ids, attention_mask=None, pixel_values=None, max_new_tokens: int = 32,
                        do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        seed: int = 0, repetition_penalty: float = 1.0, stop_token_ids=None,
                        min_new_tokens: int = 0, chunk_size: int = 8):
        """Like :meth:`generate`, but yields (B, n) int32 numpy chunks as they are produced: the first
        token alone right after the prompt is processed, then up to ``chunk_size`` tokens per chunk
        (each chunk one on-device loop). Stops early once every row has stopped, so the chunks
        concatenated equal ``generate(...)`` up to its all-pad tail. Arguments are checked when
        this is called, before the first chunk is requested.
        """
        if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ChameleonError(f"chunk_size: expected an integer >= 1, got {chunk_size!r}")
        gen, ids, mask, pixels, settings = self._generation_inputs(
            input_ids, attention_mask, pixel_values,
            self._settings(max_new_tokens, do_sample, temperature, top_k, top_p, seed, repetition_penalty,
                           stop_token_ids, min_new_tokens),
        )
        return gen.stream(self.params, ids, mask, pixels, settings, int(chunk_size))

    # ------------------------------------------------------------------ training loss (model/loss.py)
    def loss(self, input_ids, labels=None, attention_mask=None, pixel_values=None, position_ids=None, *,
             loss_mask=None, loss_on: str = "all", image_targets: bool = False, z_loss: float = 0.0) -> float:
        """Causal-LM loss with transformers' ``labels=`` convention: labels [B, T] are shifted inside
        (position t predicts labels[t + 1]), -100 is ignored, the mean is over the remaining tokens.
        ``labels`` default: ``input_ids`` with padding set to -100.

        By default image-token logits are masked as in transformers' forward (numbers match); with
        ``image_targets=True`` they are not and ``<image>`` placeholder labels become the image
        tokens, so images are trainable targets. ``loss_on``: "all", "text" (ignore image-token
        labels) or "image" (only those); ``loss_mask`` [B, T]: 0 drops a label; ``z_loss``: adds
        ``z_loss * mean(logsumexp(logits)^2)``. Returns a Python float.
        """
        ids, mask, pos, pixels = self._check_inputs(input_ids, attention_mask, pixel_values, position_ids)
        if labels is None:
            labels = np.where(mask > 0, ids, -100)
        labels = np.asarray(labels)
        labels = labels[None] if labels.ndim == 1 else labels
        if labels.shape != ids.shape or not np.issubdtype(labels.dtype, np.integer):
            raise ChameleonError(f"labels: expected integers shaped like input_ids {ids.shape}, got "
                                 f"{labels.dtype} {labels.shape}")
        lm = np.ones(ids.shape, np.int32) if loss_mask is None else np.asarray(loss_mask)
        lm = lm[None] if lm.ndim == 1 else lm
        if lm.shape != ids.shape:
            raise ChameleonError(f"loss_mask: shape {lm.shape} does not match input_ids {ids.shape}")
        key = (loss_on, bool(image_targets))
        fns = self.__dict__.setdefault("_loss_fns", {})
        if key not in fns:
            fns[key] = jax.jit(lambda p, i, l, m, q, x, k, z: model_loss(
                self.module, p, i, l, m, q, x, loss_mask=k, loss_on=loss_on, image_targets=image_targets, z_loss=z)[0])
        ids, labels, mask, pos, lm, pixels = self.put_batch(ids, labels.astype(np.int32), mask, pos,
                                                            lm.astype(np.int32), pixels)
        return float(fns[key](self.params, ids, labels, mask, pos, pixels, lm, jnp.float32(z_loss)))


def load(path: str | os.PathLike, dtype: str | None = "float32", mesh=None) -> ChameleonModel:
    """Load a Chameleon checkpoint directory.

    ``path``: an HF directory (config.json + model.safetensors or a sharded index) or a
    directory written by ``chameleon-jax convert`` (Orbax). ``dtype``: params are cast to it and
    it becomes the compute dtype ("float32", "bfloat16"); None keeps the checkpoint's dtype.
    ``mesh`` (from :func:`chameleon_jax.make_mesh`): params are placed straight into their
    shardings (sharding.RULES); an Orbax directory is restored slice by slice, so no host holds
    the whole model. ``logits`` and ``generate`` then run over the mesh with the batch sharded.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ChameleonError(f"{path}: no such directory (expected an HF or converted Chameleon checkpoint directory)")
    config = ChameleonConfig.from_json_file(os.path.join(path, "config.json"))
    if dtype is not None:
        if str(dtype) not in _DTYPE_NAMES:
            raise ChameleonError(f"dtype: {dtype!r} is not supported; expected one of {sorted(set(_DTYPE_NAMES))}")
        dtype = _DTYPE_NAMES[str(dtype)]
        config = config.replace(dtype=dtype)
    shardings = param_shardings(config, mesh) if mesh is not None else None
    if is_orbax_dir(path):
        params = read_orbax(path, config, shardings, dtype)
    else:
        put = (lambda p, a: jax.device_put(a, shardings[p])) if shardings is not None else None
        params = read_hf_params(path, config, dtype=dtype, put=put)
    if dtype is None:
        leaves = jax.tree.leaves(params)
        config = config.replace(dtype=str(leaves[0].dtype) if leaves else "float32")
    return ChameleonModel(config, params, mesh=mesh)
