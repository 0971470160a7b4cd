"""Scanned decoder layers: one ``nn.scan`` over the layers, params stacked on a leading layer axis.

``Chameleon(config, scan_layers=True)`` traces one layer instead of L, so compile time stops
growing with depth, for training and generation alike (the KV cache is then stacked too:
``init_cache(..., stacked=True)``). Its param tree holds ``layers`` (each leaf ``[L, ...]``, logical axis
``"layers"``, replicated) where the per-layer tree (the one checkpoints hold) has ``layers_0`` ..
``layers_{L-1}``; :func:`stack_layers` / :func:`unstack_layers` convert between the two.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import ChameleonError

LAYERS_AXIS = "layers"  # logical name of the stacked axis (sharding.RULES: replicated)


def scan_layers_apply(layer, num_layers: int, x, positions, mask, inv_freq, cache=None, cache_index=None):
    """Apply ``layer`` (one decoder-layer instance, possibly wrapped in remat / map_variables, whose
    params become the stacked ``[L, ...]`` tree) ``num_layers`` times by ``nn.scan``.

    The carry is ``(x, cache)``: ``cache`` is the stacked KV cache ``{"k", "v": [L, B, K, S, Dh]}``
    (or None) and layer ``i`` writes its new keys/values into slice ``i`` in place, so a decode step
    writes only its new token, as the per-layer cache does. positions, mask, inv_freq and
    cache_index are the same for every layer. Returns ``(x, cache)``.
    """

    def body(mdl, carry, index, positions, mask, inv_freq, cache_index):
        h, c = carry
        h, c = mdl(h, positions, mask, inv_freq, c, cache_index, index)
        return (h, c), None

    scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), length=num_layers,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
    (x, cache), _ = scan(layer, (x, cache), jnp.arange(num_layers, dtype=jnp.int32), positions, mask, inv_freq,
                         cache_index)
    return x, cache


def is_stacked(params) -> bool:
    """Whether a param tree holds the scanned layout (a ``layers`` entry stacked [L, ...])."""
    return hasattr(params, "keys") and "layers" in params


def stacked_sharding(sharding):
    """A layer leaf's NamedSharding -> its stack's: a replicated leading layer axis (others as they are)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(sharding.mesh, P(None, *sharding.spec)) if isinstance(sharding, NamedSharding) else sharding


def stack_params(params, num_layers: int, donate: bool = False) -> dict:
    """A placed per-layer param tree -> the scanned tree, each stacked leaf on the devices of its
    layers' leaves (a ``NamedSharding``'s spec gains a leading replicated layer axis). Quantized
    kernels (:class:`~chameleon_jax.quant.QArray`) stack their integers and scales. ``donate``:
    delete each per-layer leaf once its stack exists (peak memory: one leaf kind more than the model)."""
    def stack(xs):
        y = jax.jit(lambda *a: jnp.stack(a), out_shardings=stacked_sharding(getattr(xs[0], "sharding", None)))(*xs)
        if donate:
            for a in xs:
                if isinstance(a, jax.Array):
                    a.delete()
        return y

    return stack_layers(params, num_layers, stack)


def layer_names(num_layers: int) -> list[str]:
    return [f"layers_{i}" for i in range(num_layers)]


def stack_layers(params, num_layers: int, stack=None) -> dict:
    """Per-layer tree (``layers_0`` .. ``layers_{L-1}``) -> the scanned tree (``layers``: each leaf
    stacked on a new leading axis). ``stack`` maps a list of L leaves to one (default ``jnp.stack``).
    Works on any tree keyed like the params (grads, optimizer moments, shardings, LoRA adapters)."""
    stack = stack or (lambda xs: jnp.stack(xs))
    if not hasattr(params, "keys"):
        raise ChameleonError(f"stack_layers: expected a param dict, got {type(params).__name__}")
    names = layer_names(num_layers)
    missing = [n for n in names if n not in params]
    extra = sorted(k for k in params if k.startswith("layers_") and k not in names)
    if missing or extra or "layers" in params:
        unexpected = extra[:3] + (["layers"] if "layers" in params else [])
        raise ChameleonError(f"stack_layers: expected layers_0..layers_{num_layers - 1} and no 'layers' entry; "
                             f"missing {missing[:3]}, unexpected {unexpected}")
    first = jax.tree.structure(params[names[0]])
    for n in names[1:]:
        if jax.tree.structure(params[n]) != first:
            raise ChameleonError(f"stack_layers: {n} holds other params than layers_0 (every layer must match)")
    shapes = [jax.tree.map(lambda x: getattr(x, "shape", None), params[n]) for n in names]
    for n, s in zip(names[1:], shapes[1:]):
        if s != shapes[0]:
            raise ChameleonError(f"stack_layers: {n}'s param shapes differ from layers_0's")
    out = {k: v for k, v in params.items() if k not in names}
    out["layers"] = jax.tree.map(lambda *xs: stack(list(xs)), *[params[n] for n in names])
    return out


def unstack_layers(params, num_layers: int | None = None, take=None) -> dict:
    """The scanned tree (``layers`` [L, ...]) -> the per-layer tree checkpoints hold (``layers_i``).
    ``take(x, i)`` picks layer i of a leaf (default ``x[i]``); ``num_layers`` defaults to the
    leaves' leading dim (give it for trees of non-arrays, e.g. shardings)."""
    take = take or (lambda x, i: x[i])
    if not hasattr(params, "keys") or "layers" not in params:
        raise ChameleonError("unstack_layers: no 'layers' entry (already the per-layer tree?)")
    if any(k.startswith("layers_") for k in params):
        raise ChameleonError("unstack_layers: the tree holds both 'layers' and per-layer 'layers_i' entries")
    stacked = params["layers"]
    if num_layers is None:
        lengths = {tuple(getattr(x, "shape", ()))[:1] for x in jax.tree.leaves(stacked)}
        if len(lengths) != 1 or not next(iter(lengths)):
            raise ChameleonError("unstack_layers: the leaves of 'layers' disagree on (or lack) the leading layer "
                                 f"axis: {sorted(lengths)}")
        num_layers = next(iter(lengths))[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: take(x, i), stacked)
    return out
