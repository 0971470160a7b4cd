"""Attention math shared by the decoder: grouped-query attention over a boolean mask, whole or over
query blocks (training memory: one block's [B, H, chunk, S] scores at a time), through a selectable
implementation (``ChameleonConfig.attention_impl``):

- ``"einsum"`` (default): :func:`attend`, our einsum + masked softmax.
- ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention`` with that implementation (cudnn: GPU only).
- any name given to :func:`register_attention` (the seam for Pallas TPU kernels such as splash attention).

Every implementation keeps the rule that a query row with no visible key outputs zero (a left-pad
position; transformers' sdpa gives zeros there): :func:`attention_fn` applies it after any of them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ChameleonError

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


def chunked_attention(qg: Array, key: Array, val: Array, mask: Array, chunk: int, dt, impl: Callable = None) -> Array:
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

    impl = impl or attend

    @jax.checkpoint
    def one(q, m):
        return impl(q, key, val, m, dt)

    _, outs = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (qs, ms))
    return outs.swapaxes(0, 1).reshape((b, n * chunk) + qg.shape[2:])[:, :t]


def _dot_product_attention(implementation: str):
    def fn(qg: Array, key: Array, val: Array, mask: Array, dt) -> Array:
        b, t, k, g, dh = qg.shape
        out = jax.nn.dot_product_attention(qg.reshape(b, t, k * g, dh), key, val, mask=mask[:, None],
                                           implementation=implementation)
        return out.reshape(b, t, k, g, dh).astype(dt)

    return fn


# name -> fn(qg [B, T, K, G, Dh], key [B, S, K, Dh], val [B, S, K, Dh], mask [B, T, S] bool, dt) -> [B, T, K, G, Dh]
_IMPLS: dict[str, Callable] = {"einsum": attend, "xla": _dot_product_attention("xla"),
                               "cudnn": _dot_product_attention("cudnn")}


def register_attention(name: str, fn: Callable) -> None:
    """Make ``fn`` selectable as ``ChameleonConfig.attention_impl = name`` (same signature as
    :func:`attend`; rows with no visible key are zeroed after it, whatever it returns there)."""
    if not isinstance(name, str) or not name:
        raise ChameleonError(f"register_attention: name must be a non-empty string, got {name!r}")
    _IMPLS[name] = fn


def attention_fn(name: str) -> Callable:
    """The implementation called ``name``, with the no-visible-key rule applied to its output."""
    if name not in _IMPLS:
        raise ChameleonError(f"attention_impl {name!r}: expected one of {sorted(_IMPLS)} "
                             "(or a name given to chameleon_jax.model.attention.register_attention)")
    fn = _IMPLS[name]
    if fn is attend:  # already zeroes those rows (in its probabilities)
        return fn

    def guarded(qg, key, val, mask, dt):
        out = fn(qg, key, val, mask, dt)
        seen = jnp.any(mask, axis=-1)[:, :, None, None, None]
        return jnp.where(seen, out, jnp.zeros((), out.dtype))

    return guarded
