"""LM heads over a vocabulary subset (text tokens, image tokens) for the decode loop, and guidance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ChameleonConfig
from .. import quant
from ..errors import ChameleonError
from ..quant import QArray

Array = jax.Array


class VocabHead:
    """The LM head restricted to a subset of the vocabulary, laid out for fast decoding.

    Token choice works on "compact" ids 0..size-1; ``token_ids`` maps them back to vocabulary
    ids and ``to_compact`` the other way (ids outside the subset map to ``size``).

    Text mode (:meth:`text`): the model sets every image-token logit to the float32 minimum, so
    those tokens have probability exactly 0 and are never chosen, greedy or sampled, under any
    processor here. Leaving their columns out of the matmul is therefore exact and reads 1/8
    fewer bytes (8192 of 65536 ids in Chameleon's vocabulary). Image mode (:meth:`image`): only
    image tokens are allowed after guidance, and guidance is linear in the logits, so computing
    the image columns alone is exact too; the compact id of an image token is its VQ code.

    The rows are gathered once per params into ``chunks`` blocks of [size/chunks, D] (the
    transposed layout of HF's [D, V] lm_head). On the 2-core CPU benchmark (benchmarks/decode.py)
    this was as fast as [D, V] at batch 1 and faster at batch 8, where XLA:CPU's library path
    for a [8, D] x [D, 65536] product was erratic. The copy costs the memory of those rows of
    the LM head (text: about 3% of a 7B model) for as long as the generator lives; a new params
    tree replaces it.
    """

    def __init__(self, config: ChameleonConfig, token_ids: np.ndarray, chunks: int = 2):
        v = config.vocab_size
        self.config = config
        self.chunks = max(1, int(chunks))
        self.token_ids = np.asarray(token_ids, np.int32)  # compact id -> token id
        self.size = int(self.token_ids.size)
        self.to_compact = np.full(v, self.size, np.int32)  # token id -> compact id (others -> size)
        self.to_compact[self.token_ids] = np.arange(self.size, dtype=np.int32)
        self._weights = None  # (the lm_head leaf it was built from, the blocks)
        self._build = jax.jit(self._blocks)

    @classmethod
    def text(cls, config: ChameleonConfig, chunks: int = 2) -> "VocabHead":
        is_text = np.ones(config.vocab_size, bool)
        image = np.asarray(config.image_vocab.image_token_ids)
        is_text[image[image < config.vocab_size]] = False
        return cls(config, np.flatnonzero(is_text), chunks)

    @classmethod
    def image(cls, config: ChameleonConfig, chunks: int = 1) -> "VocabHead":
        """Compact id = VQ code (codes the VQ-VAE has, whose BPE id is in the vocabulary)."""
        vq = config.vq_config
        table = np.asarray(config.image_vocab.code_to_bpe)[: vq.num_embeddings if vq else None]
        if table.size == 0 or table.max() >= config.vocab_size:
            raise ChameleonError(
                f"vocabulary_map: image generation needs a BPE id below vocab_size {config.vocab_size} for each "
                f"of the {table.size} image codes (IMGIMG* names); this config has "
                f"{int((table < config.vocab_size).sum())}")
        return cls(config, table, chunks)

    def _blocks(self, params):
        c = self.config
        ids = jnp.asarray(self.token_ids)
        rows = -(-self.size // self.chunks)
        if not c.tie_word_embeddings and isinstance(params["lm_head"], QArray):
            # quantized head: kept in its [D, V] layout (the quantized matmul's), columns gathered
            w = quant.pad_columns(quant.take_columns(params["lm_head"], ids), rows * self.chunks - self.size)
            return quant.split_columns(w, self.chunks)
        if c.tie_word_embeddings:
            w = jnp.take(params["embed_tokens"]["embedding"], ids, axis=0)  # [Vh, D]
        else:
            w = jnp.take(params["lm_head"], ids, axis=1).T  # [Vh, D]
        w = w.astype(jnp.dtype(c.dtype))
        w = jnp.pad(w, ((0, rows * self.chunks - self.size), (0, 0)))
        return tuple(w[i * rows : (i + 1) * rows] for i in range(self.chunks))

    def weights(self, params) -> tuple:
        """The row blocks for ``params``, built on first use and kept while ``params`` is used."""
        leaf = params["embed_tokens"]["embedding"] if self.config.tie_word_embeddings else params["lm_head"]
        if self._weights is None or self._weights[0] is not leaf:
            self._weights = None  # free the old copy before making the new one
            self._weights = (leaf, self._build(params))
        return self._weights[1]

    def __call__(self, x: Array, blocks) -> Array:
        """Hidden states [R, D] -> logits over the subset [R, size] fp32."""
        dt = jnp.dtype(self.config.dtype)
        x = x.astype(dt)
        # More than one row: the block gets a unit batch dim, with which XLA:CPU runs the product as
        # [Vh/c, D] x [D, R] (the rows on the narrow side) and transposes the small result: batch-3 / 8 / 16
        # decode 17% / 14% / 18% faster on a 2-core AMD EPYC host; one row is a matvec either way.
        def product(w):
            if isinstance(w, QArray):
                return quant.matmul(x, w, dt, jnp.float32)
            if x.shape[0] > 1:
                return jnp.einsum("bd,gvd->gbv", x, w[None], preferred_element_type=jnp.float32)[0]
            return jnp.einsum("bd,vd->bv", x, w, preferred_element_type=jnp.float32)

        parts = [product(w) for w in blocks]
        return jnp.concatenate(parts, axis=-1)[:, : self.size]


def TextHead(config: ChameleonConfig, chunks: int = 2) -> VocabHead:  # noqa: N802 (kept name)
    """The text-token head (see :class:`VocabHead`)."""
    return VocabHead.text(config, chunks)


def guide(logits: Array, streams: int, scale_text, scale_image) -> Array:
    """Meta's instruct-style classifier-free guidance over each prompt's streams.

    logits [B * streams, V] in [B, streams] order -> [B, V]. streams 3 = (full prompt,
    image-conditioned, unconditioned): ``u + s_img * (i - u) + s_txt * (f - i)``; streams 1: the
    logits unchanged."""
    if streams == 1:
        return logits
    f, i, u = (logits.reshape(-1, streams, logits.shape[-1])[:, k] for k in range(3))
    return u + scale_image * (i - u) + scale_text * (f - i)


