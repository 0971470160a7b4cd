"""Attention math shared by the decoder: grouped-query attention over a boolean mask, whole or over
query blocks (training memory: one block's [B, H, chunk, S] scores at a time), through a selectable
implementation (``ChameleonConfig.attention_impl``):

- ``"einsum"`` (default): :func:`attend`, 4-D batched matmuls with a masked softmax.
- ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention`` with that implementation (cudnn: GPU only).
- any name given to :func:`register_attention` (the seam for Pallas TPU kernels such as splash attention).

Layouts (the seam's contract): queries ``[B, T, H, Dh]`` as projected; keys and values heads-major
``[B, K, S, Dh]``, the KV cache's own layout, so a decode step reads the cache as stored; output
``[B, T, H, Dh]``. Query head ``h`` belongs to KV head ``h // G`` (G = H // K), as in transformers'
``repeat_kv``.

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
# Query rows per block of causal_attention where the loss and full-sequence forwards use it: on a 2-core
# CPU 128 and 32 rows ran within noise at T=256, and 128 was best at T=1024.
CAUSAL_BLOCK = 128


def _zero_unseen(out: Array, mask: Array) -> Array:
    """Zero the output rows [B, T, ...] of queries that see no key at all (mask [B, T, S])."""
    seen = jnp.any(mask, axis=-1).reshape(mask.shape[:2] + (1,) * (out.ndim - 2))
    return jnp.where(seen, out, jnp.zeros((), out.dtype))


def attend(q: Array, key: Array, val: Array, mask: Array, dt) -> Array:
    """Grouped attention: q [B, T, H, Dh], key/val [B, K, S, Dh], mask [B, T, S] -> [B, T, H, Dh].

    The G query heads of a KV head are folded into its query rows, [B, K, G*T, Dh] against
    [B, K, S, Dh]: two batched matmuls over (B, K), no repeated keys and no 5-D dot (whose backward
    XLA runs about 2x slower on CPU).
    """
    b, t, h, dh = q.shape
    k = key.shape[1]
    g = h // k
    rows = q.reshape(b, t, k, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, dh)
    scores = jnp.einsum("bkqh,bksh->bkqs", rows, key, preferred_element_type=jnp.float32) * (dh**-0.5)
    scores = scores.reshape(b, k, g, t, -1)
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    # softmax with the normalization deferred to the output: exp(s - max) @ V / sum, so the division
    # runs over [.., Dh] instead of [.., S] (and its backward too): ~10% of a CPU train step. The max
    # only keeps exp in range (softmax does not depend on it), hence no gradient through it.
    unnorm = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    total = jnp.sum(unnorm, axis=-1, keepdims=True).reshape(b, k, g * t, 1)
    out = jnp.einsum("bkqs,bksh->bkqh", unnorm.astype(dt).reshape(b, k, g * t, -1), val,
                     preferred_element_type=jnp.float32)
    out = (out / total).astype(dt)
    out = out.reshape(b, k, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)
    # A query that sees no key at all (a left-pad position) gets a zero output, as transformers'
    # default (sdpa) attention gives it; softmax alone would average every key, later ones
    # included, and leak them into the next layer and the loss. Zeroing the output instead of the
    # probabilities gives the same numbers and the same (zero) gradient for those rows. Any
    # attention added later must keep this (tests/test_train_loss.py).
    return _zero_unseen(out, mask)


def chunked_attention(q: Array, key: Array, val: Array, mask: Array, chunk: int, dt, impl: Callable = None) -> Array:
    """:func:`attend` over query blocks of ``chunk`` rows (a scan; each block recomputed in the backward
    pass), so the [B, H, chunk, S] fp32 scores of one block exist at a time instead of [B, H, T, S]. Each
    query's softmax is its own row: the same numbers. T need not divide by ``chunk`` (padded)."""
    b, t = q.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * (q.ndim - 2))
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    qs = q.reshape((b, n, chunk) + q.shape[2:]).swapaxes(0, 1)
    ms = mask.reshape(b, n, chunk, mask.shape[-1]).swapaxes(0, 1)

    impl = impl or attend

    @jax.checkpoint
    def one(qb, m):
        return impl(qb, key, val, m, dt)

    _, outs = jax.lax.scan(lambda carry, xs: (carry, one(*xs)), None, (qs, ms))
    return outs.swapaxes(0, 1).reshape((b, n * chunk) + q.shape[2:])[:, :t]


def causal_attention(q: Array, key: Array, val: Array, mask: Array, block: int, dt, impl: Callable = None,
                     remat: bool = False) -> Array:
    """Attention for causal masks: each block of ``block`` query rows against only the keys up to the
    block's end, ``key[:, :, :end]`` (about half the [B, H, T, S] score work and memory of a whole
    attention at T = S = 1024; on a 2-core CPU fwd+bwd at T=256 ran 38 -> 25 ms, at T=1024 623 ->
    268 ms). Valid only when the caller knows the mask is causal: query ``t`` (slot ``t`` from 0) sees
    no key past slot ``t``; then every query's softmax is over the same keys and the numbers equal
    :func:`attend`'s. ``remat``: recompute each block in the backward pass (training memory, as
    :func:`chunked_attention`)."""
    impl = impl or attend
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        end = min(t, start + block)

        def one(qb, kb, vb, mb):
            return impl(qb, kb, vb, mb, dt)

        fn = jax.checkpoint(one) if remat else one
        outs.append(fn(q[:, start:end], key[:, :, :end], val[:, :, :end], mask[:, start:end, :end]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _dot_product_attention(implementation: str):
    def fn(q: Array, key: Array, val: Array, mask: Array, dt) -> Array:
        out = jax.nn.dot_product_attention(q, key.swapaxes(1, 2), val.swapaxes(1, 2), mask=mask[:, None],
                                           implementation=implementation)
        return out.astype(dt)

    return fn


# name -> fn(q [B, T, H, Dh], key [B, K, S, Dh], val [B, K, S, Dh], mask [B, T, S] bool, dt) -> [B, T, H, Dh]
_IMPLS: dict[str, Callable] = {"einsum": attend, "xla": _dot_product_attention("xla"),
                               "cudnn": _dot_product_attention("cudnn")}


def register_attention(name: str, fn: Callable) -> None:
    """Make ``fn`` selectable as ``ChameleonConfig.attention_impl = name`` (same signature and layouts
    as :func:`attend`; rows with no visible key are zeroed after it, whatever it returns there)."""
    if not isinstance(name, str) or not name:
        raise ChameleonError(f"register_attention: name must be a non-empty string, got {name!r}")
    _IMPLS[name] = fn


def attention_fn(name: str) -> Callable:
    """The implementation called ``name``, with the no-visible-key rule applied to its output."""
    if name not in _IMPLS:
        raise ChameleonError(f"attention_impl {name!r}: expected one of {sorted(_IMPLS)} "
                             "(or a name given to chameleon_jax.model.attention.register_attention)")
    fn = _IMPLS[name]
    if fn is attend:  # already zeroes those rows
        return fn

    def guarded(q, key, val, mask, dt):
        return _zero_unseen(fn(q, key, val, mask, dt), mask)

    return guarded
