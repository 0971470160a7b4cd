"""Attention math shared by the decoder: grouped-query attention over a boolean mask, whole or over
query blocks (training memory: one block's [B, H, chunk, S] scores at a time)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)


def attend(qg: Array, key: Array, val: Array, mask: Array, dt) -> Array:
    """Grouped attention: qg [B, T, K, G, Dh], key/val [B, S, K, Dh], mask [B, T, S] -> [B, T, K, G, Dh]."""
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, key, preferred_element_type=jnp.float32) * (qg.shape[-1] ** -0.5)
    visible = mask[:, None, None, :, :]
    scores = jnp.where(visible, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    # A query that sees no key at all (a left-pad position) gets a zero output, as transformers'
    # default (sdpa) attention gives it; softmax alone would average every key, later ones
    # included, and leak them into the next layer and the loss. Any attention added later must
    # keep this (tests/test_train_loss.py).
    probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0).astype(dt)
    return jnp.einsum("bkgts,bskh->btkgh", probs, val)


def chunked_attention(qg: Array, key: Array, val: Array, mask: Array, chunk: int, dt) -> Array:
    """:func:`attend` over query blocks of ``chunk`` rows (a scan; each block recomputed in the backward
    pass), so the [B, H, chunk, S] fp32 scores of one block exist at a time instead of [B, H, T, S]. Each
    query's softmax is its own row: the same numbers. T need not divide by ``chunk`` (padded)."""
    b, t = qg.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, pad)) + ((0, 0),) * 3)
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qs = qg.reshape((b, n, chunk) + qg.shape[2:]).swapaxes(0, 1)
    ms = mask.reshape(b, n, chunk, mask.shape[-1]).swapaxes(0, 1)

    @jax.checkpoint
    def one(q, m):
        return attend(q, key, val, m, dt)

    _, outs = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (qs, ms))
    return outs.swapaxes(0, 1).reshape((b, n * chunk) + qg.shape[2:])[:, :t]
