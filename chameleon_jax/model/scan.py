"""Scanned decoder layers: one ``nn.scan`` over the layers, params stacked on a leading layer axis.

``Chameleon(config, scan_layers=True)`` traces one layer instead of L, so compile time stops
growing with depth. Its param tree holds ``layers`` (each leaf ``[L, ...]``, logical axis
``"layers"``, replicated) where the per-layer tree (the one checkpoints hold) has ``layers_0`` ..
``layers_{L-1}``; :func:`stack_layers` / :func:`unstack_layers` convert between the two.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import ChameleonError

LAYERS_AXIS = "layers"  # logical name of the stacked axis (sharding.RULES: replicated)


def scanned_layers(layer_cls, config, *args, name: str = "layers"):
    """``layer_cls`` (a decoder layer, possibly wrapped in remat / map_variables) applied
    ``config.num_hidden_layers`` times by ``nn.scan`` (``args``: the layer's other fields): call as ``(x, positions, mask, inv_freq)``
    -> ``(x, None)``; positions, mask and inv_freq are broadcast to every layer."""
    return nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=config.num_hidden_layers,
                   metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})(config, *args, name=name)


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
