"""The user-facing model object and ``load`` (DESIGN.md's public API)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .checkpoint.hf import has_vq_decoder, read_hf_params
from .checkpoint.orbax import is_orbax_dir, read_orbax
from .config import ChameleonConfig
from .errors import ChameleonError
from .model import Chameleon, causal_mask, default_positions
from .model.loss import model_loss, text_columns_ok
from .sharding import batch_sharding, param_shardings, to_host

_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}


def _forward(module, params, input_ids, attention_mask, position_ids, pixel_values, suppress_image_tokens,
             hidden_states=False):
    mask = causal_mask(attention_mask)
    module = module.causal()  # the mask is causal_mask's
    if hidden_states:  # Chameleon.hidden_states sows them into "intermediates"
        (logits, _), state = module.apply(
            {"params": params}, input_ids, position_ids, mask, pixel_values,
            suppress_image_tokens=suppress_image_tokens, mutable=["intermediates"],
        )
        return logits, tuple(x.astype(jnp.float32) for x in state["intermediates"]["hidden_states"])
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

    @property
    def scan_layers(self) -> bool:
        """Whether the params hold the scanned layout (``layers`` stacked [L, ...]; see :func:`load`)."""
        from .model.scan import is_stacked

        return is_stacked(self.params)

    def __post_init__(self):
        # params holding the stacked "layers" tree (load(..., scan_layers=True)) run the scanned layers
        self.module = Chameleon(self.config, scan_layers=self.scan_layers)
        self._logits_fn = jax.jit(
            lambda *a, suppress, hidden=False: _forward(self.module, *a, suppress, hidden),
            static_argnames=("suppress", "hidden"),
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
               suppress_image_tokens: bool = True, output_hidden_states: bool = False):
        """Next-token logits [B, T, V] float32 (numpy).

        Default positions count from each row's first real token, so left padding changes
        nothing. Image-token logits are set to the float32 minimum, as transformers does, unless
        ``suppress_image_tokens=False`` (image generation). ``output_hidden_states=True`` returns
        ``(logits, hidden_states)`` instead, hidden_states being transformers' tuple of
        num_hidden_layers + 1 float32 arrays [B, T, D]: the embeddings (image tokens merged), each
        layer's output but the last, and the final-norm output.
        """
        if output_hidden_states and self.scan_layers:
            raise ChameleonError("output_hidden_states: not with scanned layers (the layers run as one scan); "
                                 "load the model with scan_layers=False")
        ids, mask, pos, pixels = self._check_inputs(input_ids, attention_mask, pixel_values, position_ids)
        ids, mask, pos, pixels = self.put_batch(ids, mask, pos, pixels)
        out = self._logits_fn(self.params, ids, mask, pos, pixels, suppress=suppress_image_tokens,
                              hidden=bool(output_hidden_states))
        if output_hidden_states:
            return to_host(out[0]), tuple(to_host(h) for h in out[1])
        return to_host(out)

    def put_batch(self, *arrays):
        """Place batch-major host arrays on the mesh (batch over data+fsdp); no-op without one."""
        if self.mesh is None:
            return arrays
        return tuple(None if a is None else jax.device_put(a, batch_sharding(self.mesh, a.shape)) for a in arrays)

    def image_tokens(self, pixel_values) -> np.ndarray:
        """pixel_values [N, 3, H, W] -> BPE ids of the image tokens [N, tokens_per_image]."""
        vq = self.config.vq_config
        if vq is None:
            raise ChameleonError("pixel_values: this checkpoint has no vq_config (no image tokenizer)")
        pixels = np.asarray(pixel_values, np.float32)
        want = (vq.in_channels, vq.resolution, vq.resolution)
        if pixels.ndim != 4 or pixels.shape[1:] != want:
            raise ChameleonError(f"pixel_values: expected [N, {want[0]}, {want[1]}, {want[2]}] (N images), "
                                 f"got shape {pixels.shape}")
        (pixels,) = self.put_batch(pixels)
        return to_host(self._image_fn(self.params, pixels))

    # ------------------------------------------------------------------ image ids -> pixels
    def _check_image_ids(self, image_ids) -> np.ndarray:
        """image_ids [N, image_seq_length] or [image_seq_length] -> int32 [N, image_seq_length]."""
        vq = self.config.vq_config
        if vq is None:
            raise ChameleonError("image_ids: this checkpoint has no vq_config (no VQ-VAE), so it cannot "
                                 "decode images")
        if not has_vq_decoder(self.params):
            raise ChameleonError(
                "image_ids: this checkpoint has no VQ-GAN decoder (model.vqmodel.decoder.*), which turns "
                "image tokens into pixels; transformers' Chameleon checkpoints (e.g. facebook/chameleon-7b) "
                "leave it out. Get one by converting Meta's original release, whose tokenizer/vqgan.ckpt holds it "
                "(`chameleon-jax convert RELEASE_DIR DST`), or load an HF conversion that carries the "
                "model.vqmodel.decoder.* tensors"
            )
        ids = np.asarray(image_ids)
        n = vq.tokens_per_image
        if ids.ndim not in (1, 2) or ids.shape[-1] != n or not np.issubdtype(ids.dtype, np.integer):
            raise ChameleonError(f"image_ids: expected integer BPE ids of image tokens shaped [N, {n}] or "
                                 f"[{n}] (image_seq_length {n}), got {ids.dtype} {ids.shape}")
        flat = ids[None] if ids.ndim == 1 else ids
        vocab = self.config.image_vocab
        codes = vocab.bpe_to_codes(flat)
        bad = (codes < 0) | (codes >= vq.num_embeddings)
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            where = f"image_ids[{c}]" if ids.ndim == 1 else f"image_ids[{r}, {c}]"
            if codes[r, c] < 0:
                span = vocab.image_token_ids
                known = f"ids {span.min()}..{span.max()}" if len(span) else "none in this vocabulary"
                why = f"is not an image token (the BPE ids of IMGIMG* names: {known})"
            else:
                why = f"is image code {codes[r, c]}, but the VQ codebook holds {vq.num_embeddings} codes"
            raise ChameleonError(f"{where} = {flat[r, c]} {why}; {int(bad.sum())} such id(s) in all")
        return flat.astype(np.int32)

    def decode_pixels(self, image_ids) -> np.ndarray:
        """BPE ids of image tokens (what :meth:`image_tokens` returns), [N, image_seq_length] or
        [image_seq_length] -> pixels float32 numpy [N, 3, H, W] (H = W = vq_config.resolution): the
        VQ-GAN decoder's output, unclamped (about [-1, 1]).

        Needs a checkpoint with the VQ-GAN decoder. Jitted; on a mesh the batch is split over it.
        The whole batch is decoded at once (a 512x512 image takes ~1 GB of fp32 activations).
        """
        ids = self._check_image_ids(image_ids)
        if ids.shape[0] == 0:
            r = self.config.vq_config.resolution
            return np.zeros((0, self.config.vq_config.in_channels, r, r), np.float32)
        if "_decode_fn" not in self.__dict__:
            self._decode_fn = jax.jit(
                lambda p, x: self.module.apply({"params": p}, x, method=Chameleon.decode_pixels))
        (ids,) = self.put_batch(ids)
        return to_host(self._decode_fn(self.params, ids))

    def decode_images(self, image_ids) -> list:
        """Like :meth:`decode_pixels`, as RGB PIL images: Meta's conversion (clamp to [-1, 1],
        ``(x + 1) / 2 * 255``, truncated to uint8), one image per row."""
        from PIL import Image

        pixels = self.decode_pixels(image_ids)
        if pixels.shape[1] != 3:
            raise ChameleonError(f"decode_images: the VQ-GAN decodes {pixels.shape[1]} channel(s); "
                                 "PIL RGB images need 3 (use decode_pixels)")
        unit = ((np.clip(pixels, -1.0, 1.0) + 1.0) / 2.0).transpose(0, 2, 3, 1)
        return [Image.fromarray((a * 255).astype(np.uint8)) for a in unit]

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

    def generate_image(self, input_ids, attention_mask=None, pixel_values=None, *,
                       guidance_scale_text: float = 3.0, guidance_scale_image: float = 1.2,
                       do_sample: bool = True, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0,
                       seed: int = 0, progress=None) -> np.ndarray:
        """Generate one image per left-padded prompt: BPE ids of image tokens, int32 numpy
        [B, image_seq_length] (turn them into pictures with :meth:`decode_images`).

        Meta's image mode: the prompt gets a begin-of-image token if it lacks one; three streams
        per prompt (the prompt; its images alone; nothing) are mixed by classifier-free guidance,
        ``u + guidance_scale_image * (i - u) + guidance_scale_text * (f - i)``, over the image
        tokens only, then ``temperature``, ``top_k`` (0 = off) and ``top_p`` (1 = off) and a draw
        (argmax unless ``do_sample``). Both scales 1 = no guidance (the prompt's stream alone).
        All prompts x streams run in one jitted prefill and on-device loop of exactly
        image_seq_length steps. ``seed`` makes draws reproducible per prompt (a prompt's draws depend
        on the seed, its row index and the step). ``progress(done, total)``, if given, is called as
        tokens come out: the same compiled loop then runs in chunks of 64 steps (a host sync each).
        Details: :mod:`chameleon_jax.generation.image`.
        """
        gen, rows, pixels, loop, kw = self._image_inputs(
            input_ids, attention_mask, pixel_values,
            (guidance_scale_text, guidance_scale_image, do_sample, temperature, top_p, top_k, seed))
        if progress is None:
            return gen.generate(self.params, *rows, pixels, loop, **kw)
        chunks = []
        for chunk in gen.stream(self.params, *rows, pixels, loop, 64, **kw):
            chunks.append(chunk)
            progress(sum(c.shape[1] for c in chunks), loop.max_new_tokens)
        return np.concatenate(chunks, axis=1)

    def image_logits(self, input_ids, attention_mask=None, pixel_values=None, *, guidance_scale_text: float = 3.0,
                     guidance_scale_image: float = 1.2) -> np.ndarray:
        """The guided logits image mode draws its first token from: float32 numpy [B, num_codes],
        column c = VQ code c (BPE id ``config.image_vocab.code_to_bpe[c]``), before temperature and
        filtering. For checks and research (e.g. scoring images under a prompt)."""
        gen, rows, pixels, _, kw = self._image_inputs(
            input_ids, attention_mask, pixel_values, (guidance_scale_text, guidance_scale_image))
        return gen.next_logits(self.params, *rows, pixels, **kw)

    def _image_inputs(self, input_ids, attention_mask, pixel_values, settings):
        from .generation.image import ImageSettings, build_streams

        gen, ids, mask, pixels, _ = self._generation_inputs(
            input_ids, attention_mask, pixel_values, self._settings(1, False, 1.0, 0, 1.0, 0, 1.0, None, 0))
        isettings = ImageSettings(*settings)
        longest = build_streams(ids, mask, self.config, 1)[3]
        isettings, loop = isettings.validate(self.config, longest)
        rows, row_mask, order, _ = build_streams(ids, mask, self.config, isettings.streams)
        kw = dict(modality="image", streams=isettings.streams, image_order=order if pixels is not None else None,
                  guidance=(isettings.guidance_scale_text, isettings.guidance_scale_image))
        return gen, (rows, row_mask), pixels, loop, kw

    def generate_interleaved(self, input_ids, attention_mask=None, pixel_values=None, *, max_new_tokens: int = 64,
                             max_images: int = 1, text: dict | None = None, image: dict | None = None,
                             seed: int = 0, stop_token_ids=()) -> list:
        """Mixed-modal output: per row, a list of ``("text", ids)`` and ``("image", ids)`` segments.

        Text mode runs until the model emits the begin-of-image token; image mode then draws that
        image (guidance and sampling from ``image``, as :meth:`generate_image` takes them), the
        end-of-image token is appended and text mode resumes, until a stop token, ``max_new_tokens``
        text tokens in all, or ``max_images`` images. ``text``: :meth:`generate`'s sampling settings.
        Details: :mod:`chameleon_jax.generation.interleaved`.
        """
        from .generation.interleaved import generate_interleaved

        return generate_interleaved(self, input_ids, attention_mask, pixel_values, max_new_tokens=max_new_tokens,
                                    max_images=max_images, text=text, image=image, seed=seed,
                                    stop_token_ids=stop_token_ids)

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
            cols = text_columns_ok(self.config, self.params)
            fns[key] = jax.jit(lambda p, i, l, m, q, x, k, z: model_loss(
                self.module, p, i, l, m, q, x, loss_mask=k, loss_on=loss_on, image_targets=image_targets, z_loss=z,
                text_columns=cols)[0])
        ids, labels, mask, pos, lm, pixels = self.put_batch(ids, labels.astype(np.int32), mask, pos,
                                                            lm.astype(np.int32), pixels)
        return float(fns[key](self.params, ids, labels, mask, pos, pixels, lm, jnp.float32(z_loss)))


def load(path: str | os.PathLike, dtype: str | None = "float32", mesh=None, *, quantize: str | None = None,
         attention_impl: str = "einsum", scan_layers: bool = False, local_files_only: bool | None = None,
         revision: str | None = None) -> ChameleonModel:
    """Load a Chameleon checkpoint directory.

    ``path``: an HF directory (config.json + model.safetensors or a sharded index), a
    directory written by ``chameleon-jax convert`` (Orbax), or a Hugging Face Hub id such as
    ``"facebook/chameleon-7b"`` (through ``huggingface_hub``: its cache, ``HF_TOKEN``,
    ``HF_HUB_OFFLINE`` / ``local_files_only``, ``revision``; see :mod:`chameleon_jax.hub`).
    ``dtype``: params are cast to it and it becomes the compute dtype ("float32", "bfloat16"); None keeps the checkpoint's dtype.
    ``mesh`` (from :func:`chameleon_jax.make_mesh`): params are placed straight into their
    shardings (sharding.RULES); an Orbax directory is restored slice by slice, so no host holds
    the whole model. ``logits`` and ``generate`` then run over the mesh with the batch sharded.
    ``quantize``: "int8" or "int4" stores the decoder's projections and the LM head as weight-only
    integers (:mod:`chameleon_jax.quant`; ``dtype`` stays the compute dtype): each tensor of an HF
    checkpoint is quantized as it is read, so the float model never exists whole on the device.
    For inference (logits, generate); training needs float params. A directory converted with
    ``chameleon-jax convert --quantize MODE`` already holds the integers and scales: they are
    restored directly (straight into their shardings with a mesh; the float kernels never exist),
    with ``quantize=None`` as with ``quantize=MODE``; another mode raises ChameleonError.
    ``attention_impl``: "einsum" (ours), "xla" / "cudnn" (``jax.nn.dot_product_attention``), or a name
    registered with :func:`chameleon_jax.model.attention.register_attention` (e.g. a Pallas kernel).
    ``scan_layers``: stack the decoder layers' params [L, ...] (each leaf's sharding gains a leading
    replicated layer axis) and run them as one ``nn.scan``, the KV cache stacked too: compile time
    stops growing with depth (7B generate on a TPU slice: minutes -> seconds), the numbers are the
    same. Not with ``output_hidden_states``.
    """
    from . import quant
    from .hub import resolve

    from .model.attention import attention_fn

    mode = quant.check_mode(quantize)
    attention_fn(attention_impl)  # an unknown name fails here, before any weight is read
    path = resolve(path, local_files_only=local_files_only, revision=revision)
    if not os.path.isdir(path):
        raise ChameleonError(f"{path}: no such directory (expected an HF or converted Chameleon checkpoint directory)")
    config = ChameleonConfig.from_json_file(os.path.join(path, "config.json")).replace(attention_impl=attention_impl)
    if dtype is not None:
        if str(dtype) not in _DTYPE_NAMES:
            raise ChameleonError(f"dtype: {dtype!r} is not supported; expected one of {sorted(set(_DTYPE_NAMES))}")
        dtype = _DTYPE_NAMES[str(dtype)]
        config = config.replace(dtype=dtype)
    shardings = param_shardings(config, mesh) if mesh is not None else None
    if is_orbax_dir(path):
        from .checkpoint.orbax import stored_quantization

        stored = stored_quantization(path)
        if stored is not None and mode not in (None, stored["mode"]):
            raise ChameleonError(
                f"quantize: {path} holds {stored['mode']}-quantized weights (converted with --quantize "
                f"{stored['mode']}), so it cannot be loaded as {mode}; pass quantize=None or {stored['mode']!r}, "
                f"or convert the float source with --quantize {mode}")
        params = read_orbax(path, config, shardings, dtype)
        if mode is not None and stored is None:
            flat = quant.quantize_flat(traverse_util.flatten_dict(params, sep="/"), mode, shardings)
            params = traverse_util.unflatten_dict(flat, sep="/")
    else:
        def put(p, a):
            sharding = shardings[p] if shardings is not None else None
            if mode is not None and quant.is_target(p):
                return quant.quantize_leaf(p, a, mode, sharding)
            return jax.device_put(a, sharding) if sharding is not None else jax.device_put(a)

        params = read_hf_params(path, config, dtype=dtype, put=put)
    if dtype is None:
        config = config.replace(dtype=_params_dtype(params))
    if scan_layers:
        from .model.scan import stack_params

        params = stack_params(params, config.num_hidden_layers, donate=True)
    return ChameleonModel(config, params, mesh=mesh)


def _params_dtype(params) -> str:
    """The compute dtype params imply: the floating dtype holding most of the decoder's elements
    (ties: the wider). The VQ-VAE, which computes in its own params' dtype, does not count."""
    counts: dict[str, int] = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if getattr(path[0], "key", None) == "vqmodel" or not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        counts[str(x.dtype)] = counts.get(str(x.dtype), 0) + int(np.prod(x.shape))
    if not counts:
        return "float32"
    return max(counts, key=lambda d: (counts[d], np.dtype(d).itemsize))
