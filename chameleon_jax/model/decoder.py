"""Chameleon decoder: GQA attention with a KV cache, SwiGLU MLP, the layers, embeddings and LM head
(its building blocks, RMSNorm, per-head qk-LayerNorm, RoPE and the 2-D projections, are in layers.py).

Shapes in docstrings: B batch, T query length, S key length (cache slots), D hidden, H heads,
K kv heads, G = H // K, Dh head dim, M mlp width, V vocab.

KV-cache contract (shared by the full forward, prefill and one-token decode):
  cache = {"layers_i": {"k": [B, K, S, Dh], "v": [B, K, S, Dh]}, ...} (heads-major: the decode
  step's attention reads it as stored, no per-step transpose); with scanned layers one stacked
  entry {"layers": {"k": [L, B, K, S, Dh], "v": ...}} (see :func:`init_cache`)
  ``cache_index`` (int32 scalar) is the slot where this call's T tokens are written, the same
  for every row (prompts are left-padded so all rows advance together). The caller passes the
  boolean ``mask [B, T, S]`` saying which slots each query may attend to; see
  :func:`causal_mask` and :func:`cache_mask`.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import ChameleonConfig
from ..quant import QArray, matmul as quant_matmul
from ..errors import ChameleonError
from .attention import CAUSAL_BLOCK, attention_fn, causal_attention, chunked_attention
from .layers import (  # noqa: F401  (RMSNorm, HeadLayerNorm, RoPE, matmul_2d re-exported)
    HeadLayerNorm, Linear, RMSNorm, _cast, _weight, apply_rope, matmul_2d, rope_inv_freq,
)
from .scan import scan_layers_apply, stack_layers, unstack_layers  # noqa: F401  (re-exported)
from .vqvae import VQVAE

Array = jax.Array


def causal_mask(attention_mask: Array) -> Array:
    """[B, T] 0/1 padding mask -> [B, T, T] bool: causal and no attention to padding."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & (attention_mask[:, None, :] > 0)


def cache_mask(kv_valid: Array, cache_index: Array, num_queries: int) -> Array:
    """Mask for T queries written at slots [cache_index, cache_index + T) of a cache.

    kv_valid: [B, S] bool, slots holding real (non-pad) tokens, this call's slots included.
    Returns [B, T, S] bool: a query sees valid slots at or before its own.
    """
    s = kv_valid.shape[1]
    q_slot = cache_index + jnp.arange(num_queries)
    visible = jnp.arange(s)[None, :] <= q_slot[:, None]
    return visible[None] & kv_valid[:, None, :]


def default_positions(attention_mask: Array) -> Array:
    """Positions counted from each row's first real token (left padding changes nothing)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Attention(nn.Module):
    config: ChameleonConfig
    query_chunk: int = 0  # > 0: attention over query blocks of this many rows (chunked_attention)
    causal_block: int = 0  # > 0: the mask is causal; attention per query block of this many rows (causal_attention)

    @nn.compact
    def __call__(self, x, positions, mask, inv_freq, cache=None, cache_index=None, layer=None, last_only=False):
        """x: [B, T, D]; mask: [B, T, S] bool. Returns ([B, T, D], new cache entry or None).

        ``layer`` (int32 scalar, scanned layers): ``cache`` is the stacked cache [L, B, K, S, Dh] and
        this layer owns slice ``layer`` of it; the whole stacked cache is returned, updated.
        ``last_only``: keys and values (and the cache) of all T tokens, the query and output of the last
        one only ([B, 1, D]): the last layer of a prefill, whose other outputs nothing reads."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        h, k, dh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        bias = 2 if c.attention_bias else 0

        def proj(name, heads, axis, inp):
            return Linear("btd,dnh->btnh", (d, heads, dh), ("embed", axis, "head_dim"), bias, c.dtype, name=name)(inp)

        q_pos = positions[:, -1:] if last_only else positions
        q = proj("q_proj", h, "heads", x[:, -1:] if last_only else x)
        key = proj("k_proj", k, "kv_heads", x)
        val = proj("v_proj", k, "kv_heads", x)
        q = HeadLayerNorm(h, dh, c.qk_norm_eps, ("heads", "head_dim"), name="q_norm")(q)
        key = HeadLayerNorm(k, dh, c.qk_norm_eps, ("kv_heads", "head_dim"), name="k_norm")(key)
        q = apply_rope(q, q_pos, inv_freq)
        key = apply_rope(key, positions, inv_freq)
        if last_only:
            mask = mask[:, -1:]

        key, val = key.swapaxes(1, 2), val.swapaxes(1, 2)  # heads-major [B, K, T, Dh], the cache's layout
        new_cache = None
        if cache is not None and layer is not None:  # stacked: write this layer's slice in place
            at = (layer, 0, 0, cache_index, 0)
            ck = jax.lax.dynamic_update_slice(cache["k"], _cast(key, cache["k"].dtype)[None], at)
            cv = jax.lax.dynamic_update_slice(cache["v"], _cast(val, cache["v"].dtype)[None], at)
            new_cache = {"k": ck, "v": cv}
            key = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
            val = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
        elif cache is not None:
            at = (0, 0, cache_index, 0)
            key = jax.lax.dynamic_update_slice(cache["k"], _cast(key, cache["k"].dtype), at)
            val = jax.lax.dynamic_update_slice(cache["v"], _cast(val, cache["v"].dtype), at)
            new_cache = {"k": key, "v": val}

        t = q.shape[1]
        key, val = _cast(key, dt), _cast(val, dt)
        chunk, impl = self.query_chunk, attention_fn(c.attention_impl)
        if last_only:  # one query row (not at slot 0): the whole attention
            out = impl(q, key, val, mask, dt)
        elif self.causal_block:
            block = min(self.causal_block, chunk) if chunk else self.causal_block
            out = causal_attention(q, key, val, mask, block, dt, impl, remat=bool(chunk) and t > chunk)
        elif chunk and t > chunk:
            out = chunked_attention(q, key, val, mask, chunk, dt, impl)
        else:
            out = impl(q, key, val, mask, dt)
        o_bias = 1 if c.attention_bias else 0
        y = Linear("btnh,nhd->btd", (h, dh, d), ("heads", "head_dim", "embed"), o_bias, c.dtype, name="o_proj")(out)
        return y, new_cache


class MLP(nn.Module):
    config: ChameleonConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        d, m = c.hidden_size, c.intermediate_size
        bias = 1 if c.mlp_bias else 0
        gate = Linear("...d,dm->...m", (d, m), ("embed", "mlp"), bias, c.dtype, name="gate_proj")(x)
        up = Linear("...d,dm->...m", (d, m), ("embed", "mlp"), bias, c.dtype, name="up_proj")(x)
        return Linear("...m,md->...d", (m, d), ("mlp", "embed"), bias, c.dtype, name="down_proj")(
            jax.nn.silu(gate) * up
        )


class DecoderLayer(nn.Module):
    """Pre-norm layer, or with ``swin_norm`` the norm applied to each branch's output."""

    config: ChameleonConfig
    query_chunk: int = 0
    causal_block: int = 0

    @nn.compact
    def __call__(self, x, positions, mask, inv_freq, cache=None, cache_index=None, layer=None, last_only=False):
        """``last_only``: the output of the last position only, [B, 1, D] (Attention's ``last_only``)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        attn = Attention(c, self.query_chunk, self.causal_block, name="self_attn")
        mlp = MLP(c, name="mlp")
        norm1 = RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")
        norm2 = RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")
        res = x[:, -1:] if last_only else x
        if c.swin_norm:
            a, new_cache = attn(x, positions, mask, inv_freq, cache, cache_index, layer, last_only)
            x = res + norm1(a)
            x = x + norm2(mlp(x))
        else:
            a, new_cache = attn(norm1(x), positions, mask, inv_freq, cache, cache_index, layer, last_only)
            x = res + a
            x = x + mlp(norm2(x))
        return x, new_cache


# Rematerialization policies for training (``Chameleon(config, remat_policy=...)``): what each
# decoder layer keeps for the backward pass; everything else is recomputed.
REMAT_POLICIES = {
    "none": None,  # no remat: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections only
}


def head_logits(config: ChameleonConfig, x: Array, w: Array, suppress_image_tokens: bool = True) -> Array:
    """Hidden states [..., D] @ head ``w`` [D, V] -> fp32 logits [..., V]; image tokens at the fp32 min
    when ``suppress_image_tokens`` (transformers' forward)."""
    if isinstance(w, QArray):
        logits = quant_matmul(x, w, jnp.dtype(config.dtype), jnp.float32)
    else:
        logits = matmul_2d(_cast(x, w.dtype), w, 1, jnp.float32)
    image_ids = config.image_vocab.image_token_ids
    if suppress_image_tokens and len(image_ids):
        is_image = np.zeros((config.vocab_size,), bool)
        is_image[image_ids[image_ids < config.vocab_size]] = True
        logits = jnp.where(is_image, jnp.finfo(jnp.float32).min, logits)
    return logits


class Chameleon(nn.Module):
    """Token embeddings, decoder layers, final norm, LM head, and the VQ-VAE image tokenizer.

    Param tree: embed_tokens, layers_{i}, norm, lm_head (absent when tied), vqmodel (absent
    without a vq_config; its ``decoder`` subtree, codes -> pixels, is optional: checkpoints made
    for understanding only lack it, and only :meth:`decode_pixels` needs it). ``remat_policy``
    (a key of :data:`REMAT_POLICIES`) wraps each decoder layer in ``nn.remat`` for training; the
    param tree is the same for every policy.
    """

    config: ChameleonConfig
    remat_policy: str = "none"
    scan_layers: bool = False  # one nn.scan over the layers: params "layers" and the KV cache stacked [L, ...]
    # Applied to each decoder layer's params (one layer's tree) right before that layer runs, inside its
    # remat region: the train step's per-layer FSDP all-gather and LoRA merge (training/step.py).
    layer_params: Callable | None = None
    attention_chunk: int = 0  # > 0: each layer's attention over query blocks of this many rows (training memory)
    # > 0: the caller promises causal masks (query t at slot t sees no later slot), so attention runs per
    # block of this many query rows against the keys up to the block's end (model/attention.py's
    # causal_attention). Set where the mask is built as causal_mask: the loss / train step, full-sequence logits.
    causal_block: int = 0

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="embed_tokens",
        )
        if self.remat_policy not in REMAT_POLICIES:
            raise ChameleonError(f"remat_policy {self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
        layer_cls = DecoderLayer
        if self.layer_params is not None:
            layer_cls = nn.map_variables(layer_cls, "params", trans_in_fn=self.layer_params)
        if self.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[self.remat_policy])
        if self.scan_layers:  # model/scan.py
            self.layers = layer_cls(c, self.attention_chunk, self.causal_block, name="layers")  # applied by scan_layers_apply
        else:
            self.layers = [layer_cls(c, self.attention_chunk, self.causal_block, name=f"layers_{i}")
                           for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, jnp.dtype(c.dtype), name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = _weight(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
        if c.vq_config is not None:
            self.vqmodel = VQVAE(c.vq_config, name="vqmodel")

    def __call__(
        self,
        input_ids,
        positions,
        mask,
        pixel_values=None,
        cache=None,
        cache_index=None,
        suppress_image_tokens=True,
    ):
        """input_ids, positions: [B, T]; mask: [B, T, S] bool; pixel_values: [N, 3, H, W].

        Each ``<image>`` placeholder takes the next image token of the images in order (row-major
        over the batch, like transformers' masked_scatter). Returns (logits [B, T, V] fp32, cache).
        """
        hidden, new_cache = self.hidden_states(input_ids, positions, mask, pixel_values, cache, cache_index)
        return self.logits(hidden, suppress_image_tokens), new_cache

    def hidden_states(self, input_ids, positions, mask, pixel_values=None, cache=None, cache_index=None,
                      last_only=False):
        """Like ``__call__`` without the LM head: (final-norm hidden states [B, T, D], cache).

        The decode loop calls this and applies its own head to the last position only; with
        ``last_only`` (a prefill) the last layer computes that position only and [B, 1, D] comes back
        (the cache still gets every position; scanned layers compute them all). Applied
        with ``mutable=["intermediates"]`` it also sows transformers' ``output_hidden_states``
        tuple as ``intermediates/hidden_states``: the embeddings, each layer's output but the last,
        and the final-norm output (num_hidden_layers + 1 arrays [B, T, D]); otherwise nothing.
        """
        if pixel_values is not None:
            input_ids = self.merge_image_tokens(input_ids, self.image_tokens(pixel_values))
        x = _cast(self.embed_tokens(input_ids), jnp.dtype(self.config.dtype))
        c = self.config
        inv_freq = rope_inv_freq(c, positions)
        new_cache = {} if cache is not None else None
        if self.scan_layers:  # no per-layer hidden states are sown (the layers are one scan)
            if cache is not None and set(cache) != {"layers"}:
                raise ChameleonError("scan_layers: the KV cache must be the stacked one "
                                     "(init_cache(config, batch, length, stacked=True))")
            x, stacked = scan_layers_apply(self.layers, c.num_hidden_layers, x, positions, mask, inv_freq,
                                           None if cache is None else cache["layers"], cache_index)
            return self.norm(x), None if cache is None else {"layers": stacked}
        for i, layer in enumerate(self.layers):
            self.sow("intermediates", "hidden_states", x)
            name = f"layers_{i}"
            # (last_only goes in only where set: under nn.remat a Python bool argument would be traced)
            last = (None, True) if last_only and i == len(self.layers) - 1 else ()
            x, layer_cache = layer(x, positions, mask, inv_freq, None if cache is None else cache[name], cache_index,
                                   *last)
            if cache is not None:
                new_cache[name] = layer_cache
        out = self.norm(x)
        self.sow("intermediates", "hidden_states", out)
        return out, new_cache

    def image_tokens(self, pixel_values: Array) -> Array:
        """[N, 3, H, W] -> BPE ids of the image tokens [N, tokens_per_image] int32."""
        codes = self.vqmodel.encode(pixel_values)
        return jnp.asarray(self.config.image_vocab.code_to_bpe)[codes]

    def decode_pixels(self, image_ids: Array) -> Array:
        """BPE ids of image tokens [N, tokens_per_image] -> pixels [N, C, H, W] float32, unclamped.

        Needs the ``vqmodel/decoder`` params. Ids are not checked here (jitted): an id that is not an
        image token decodes as code 0; ``ChameleonModel.decode_pixels`` checks them first.
        """
        table = jnp.asarray(np.maximum(self.config.image_vocab.bpe_to_code_table, 0))
        codes = table[jnp.clip(image_ids, 0, table.shape[0] - 1)]
        return self.vqmodel.decode(codes)

    def merge_image_tokens(self, input_ids: Array, image_ids: Array) -> Array:
        placeholder = self.config.image_vocab.image_token_id
        flat = input_ids.reshape(-1)
        is_slot = flat == placeholder
        order = jnp.clip(jnp.cumsum(is_slot) - 1, 0, image_ids.size - 1)
        return jnp.where(is_slot, image_ids.reshape(-1)[order], flat).reshape(input_ids.shape)

    def causal(self) -> "Chameleon":
        """This module for callers whose masks are causal (``causal_block`` set, CAUSAL_BLOCK by default)."""
        return self.clone(causal_block=self.causal_block or CAUSAL_BLOCK)

    def head_weight(self) -> Array:
        """The LM head [D, V] in the compute dtype (the embeddings transposed when tied)."""
        c = self.config
        dt = jnp.dtype(c.dtype)
        if c.tie_word_embeddings:
            return _cast(self.embed_tokens.embedding, dt).T
        return self.lm_head if isinstance(self.lm_head, QArray) else _cast(self.lm_head, dt)

    def logits(self, x: Array, suppress_image_tokens: bool = True) -> Array:
        """Final hidden states [B, T, D] -> logits [B, T, V] fp32; image tokens at the fp32 min."""
        return head_logits(self.config, x, self.head_weight(), suppress_image_tokens)

    def init_all(self, input_ids, pixel_values=None, vq_decoder: bool = True):
        """Touches every submodule so ``init`` creates the whole param tree (the VQ decoder too
        unless ``vq_decoder`` is False)."""
        mask = causal_mask(jnp.ones(input_ids.shape, jnp.int32))
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        vq = self.config.vq_config
        if vq is not None:
            self.vqmodel(pixel_values)
            if vq_decoder:
                # The decoder's params do not depend on the latent grid: a 1x1 grid creates them cheaply.
                self.vqmodel.decode_latents(jnp.zeros((1, 1, 1, vq.embed_dim), jnp.float32))
        return self(input_ids, positions, mask)


def init_params(config: ChameleonConfig, rng: Array, abstract: bool = False, vq_decoder: bool = True):
    """Random params (boxed with logical axis names). ``abstract``: shapes only, no memory.

    ``vq_decoder``: include the VQ-GAN decoder (``vqmodel/decoder``, codes -> pixels), which
    transformers' Chameleon has no place for; False gives transformers' param tree.
    """
    if abstract:
        return jax.eval_shape(_init_fn(config, vq_decoder), rng)
    return _jitted_init_fn(config, vq_decoder)(rng)


@functools.lru_cache(maxsize=4)
def _jitted_init_fn(config: ChameleonConfig, vq_decoder: bool):
    # Compiling the init takes tens of seconds on CPU (~0.15 s per param's random draw), so random
    # models of one config (the demo's, say) compile it once per process.
    return jax.jit(_init_fn(config, vq_decoder))


def _init_fn(config: ChameleonConfig, vq_decoder: bool):
    module = Chameleon(config)

    def fn(key):
        ids = jnp.zeros((1, 1), jnp.int32)
        pixels = None
        if config.vq_config is not None:
            r = config.vq_config.resolution
            pixels = jnp.zeros((1, config.vq_config.in_channels, r, r), jnp.float32)
        return module.init(key, ids, pixels, vq_decoder, method=Chameleon.init_all)["params"]

    return fn


def init_cache(config: ChameleonConfig, batch: int, length: int, dtype=None, stacked: bool = False) -> dict:
    """Zeroed KV cache of ``length`` slots: {"layers_i": {"k", "v": [B, K, S, Dh]}} (heads-major), or
    with ``stacked`` (scanned layers) {"layers": {"k", "v": [L, B, K, S, Dh]}}."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    if stacked:
        shape = (config.num_hidden_layers,) + shape
        return {"layers": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}}
    return {
        f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for i in range(config.num_hidden_layers)
    }
