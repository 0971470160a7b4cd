"""The sharded train step: optimizer (AdamW, warmup + cosine, clipping), gradient accumulation,
FSDP gathers, LoRA, and the train state's shardings."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from ..errors import ChameleonError
from ..model.loss import IGNORE_INDEX, forward_loss_sums, resolve_labels, shifted_targets
from . import lora as lora_lib
from .config import MESH_KEYS, TrainConfig

# ------------------------------------------------------------------ optimizer
def lr_schedule(tc: TrainConfig) -> Callable:
    """Linear warmup from 0 to learning_rate, then cosine to learning_rate * end_lr_ratio at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        tc.learning_rate * tc.end_lr_ratio)


def _decay_mask(params):
    def decays(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        return x.ndim >= 2 and not any("norm" in n for n in names) and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    tx = optax.adamw(lr_schedule(tc), tc.adam_b1, tc.adam_b2, tc.adam_eps, weight_decay=tc.weight_decay,
                     mask=_decay_mask)
    if tc.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), tx)
    return tx


# ------------------------------------------------------------------ sharding helpers
def _tree(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _gather_spec(spec: P) -> P:
    """The spec with the fsdp axis removed (FSDP: weights are all-gathered for compute)."""
    out = []
    for s in spec:
        axes = (s,) if isinstance(s, str) else tuple(s or ())
        axes = tuple(a for a in axes if a != "fsdp")
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def build_mesh(spec: Mapping[str, int]):
    from ..sharding import make_mesh

    sizes = [int(spec.get(k, 1)) for k in MESH_KEYS]
    devices = jax.devices()
    if -1 not in sizes:
        n = math.prod(sizes)
        if n > len(devices):
            raise ChameleonError(
                f"train config: mesh {dict(spec)} needs {n} devices, {len(devices)} available")
        devices = devices[:n]
    return make_mesh(*sizes, devices=devices)


# ------------------------------------------------------------------ step
def make_train_step(module, tx, tc: TrainConfig, shardings: dict, frozen_shardings, mesh, lora_config=None):
    """The pure train step ``(state, frozen, batch) -> (state, metrics)``, jitted with the state's
    shardings (donated). ``batch``: input_ids (image tokens merged), labels, attention_mask, all
    [A, B, T]. With LoRA, ``state["params"]`` are the adapters and ``frozen`` the base.
    ``shardings``: the state's (:func:`state_shardings`)."""
    config = module.config
    loss_on, image_targets, zc = tc.effective_loss_on, tc.train_image_tokens, tc.z_loss
    schedule = lr_schedule(tc)
    full_shardings = frozen_shardings if lora_config is not None else shardings["params"]
    gather = mesh.shape["fsdp"] > 1
    replicated = NamedSharding(mesh, P())

    def combine(params, frozen):
        if lora_config is not None:
            full = lora_lib.apply(frozen, params, lora_config)
        else:
            full = {**frozen, **params}
        if gather:
            full = jax.tree.map(
                lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _gather_spec(s.spec))),
                full, full_shardings)
        return full

    def micro_loss(params, frozen, mb, denom):
        nll, z, count = forward_loss_sums(module, combine(params, frozen), mb["input_ids"], mb["labels"],
                                          mb["attention_mask"], image_targets=image_targets,
                                          loss_chunk=tc.loss_chunk)
        return (nll + zc * z) / denom, (nll, z)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state, frozen, batch):
        labels = resolve_labels(batch["labels"], batch["input_ids"], config, image_targets=image_targets,
                                loss_on=loss_on)
        count = (shifted_targets(labels) != IGNORE_INDEX).sum()
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        batch = {**batch, "labels": labels}
        params = state["params"]
        if batch["input_ids"].shape[0] == 1:
            grads, (nll, z) = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch), denom)
        else:
            def body(carry, mb):
                g_acc, nll_acc, z_acc = carry
                g, (nll, z) = grad_fn(params, frozen, mb, denom)
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, z_acc + z), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, nll, z), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # No op of the model draws randomness yet (no dropout); the key still advances every step and
        # is checkpointed, so stochastic additions resume exactly too.
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        metrics = {"loss": nll / denom, "z_loss": z / denom, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "targets": count, "tokens": batch["attention_mask"].sum()}
        return new_state, metrics

    return jax.jit(step, out_shardings=(shardings, replicated), donate_argnums=(0,))


def state_shardings(tx, abstract_params, param_shardings, mesh) -> dict:
    """Shardings of the train state; each optimizer moment takes its param's sharding."""
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_shardings,
                                transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": param_shardings, "opt_state": opt, "rng": replicated}

