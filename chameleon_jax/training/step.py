"""The sharded train step: optimizer (AdamW, warmup + cosine, clipping), gradient accumulation,
FSDP gathers, LoRA, and the train state's shardings."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from ..errors import ChameleonError
from ..model.loss import IGNORE_INDEX, forward_loss_sums, resolve_labels, shifted_targets, text_columns_ok
from . import lora as lora_lib
from .config import MESH_KEYS, TrainConfig

# ------------------------------------------------------------------ optimizer
def lr_schedule(tc: TrainConfig) -> Callable:
    """Linear warmup from 0 to learning_rate, then cosine to learning_rate * end_lr_ratio at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        tc.learning_rate * tc.end_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only (leaves under the scanned tree's ``layers`` carry a leading layer
    axis, which is not a matrix dim)."""
    def decays(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        ndim = x.ndim - (names[:1] == ["layers"])
        return ndim >= 2 and not any("norm" in n for n in names) and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decoupled decay on matrices), warmup + cosine, global-norm clipping, moments in
    ``tc.optimizer_dtype``."""
    tx = optax.adamw(lr_schedule(tc), tc.adam_b1, tc.adam_b2, tc.adam_eps, weight_decay=tc.weight_decay,
                     mask=_decay_mask)
    if tc.optimizer_dtype != "float32":
        tx = with_state_dtype(tx, jnp.dtype(tc.optimizer_dtype))
    if tc.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), tx)
    return tx


def with_state_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``tx`` with its floating-point state (Adam's m and v) stored in ``dtype``: each update computes in
    float32 from the stored values and rounds the new state to ``dtype``."""
    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(tx.init(params), dtype)

    def update(updates, state, params=None):
        new_updates, new_state = tx.update(updates, cast(state, jnp.float32), params)
        return new_updates, cast(new_state, dtype)

    return optax.GradientTransformation(init, update)


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


# ------------------------------------------------------------------ FSDP gathers
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def fsdp_gather(x, gathered: NamedSharding, sharded: NamedSharding, dtype):
    """``x`` cast to ``dtype`` and all-gathered to ``gathered``; backward: the cotangent cast back to
    x's dtype, then reduce-scattered to ``sharded`` (so the gradient is summed in x's dtype, as
    when the cast follows the gather)."""
    return jax.lax.with_sharding_constraint(x.astype(dtype), gathered)


def _gather_fwd(x, gathered, sharded, dtype):
    return fsdp_gather(x, gathered, sharded, dtype), jnp.zeros((0,), x.dtype)


def _gather_bwd(gathered, sharded, dtype, res, g):
    return (jax.lax.with_sharding_constraint(g.astype(res.dtype), sharded),)


fsdp_gather.defvjp(_gather_fwd, _gather_bwd)

# Params the model casts to its compute dtype right away (Linear kernels, the LM head): gathered in that
# dtype (half the bytes in bf16). Norm scales and the embeddings are gathered as they are.
_CAST_BEFORE_GATHER = ("kernel", "lm_head")


def _gather_leaf(mesh, sharding, name: str, dtype):
    gathered = NamedSharding(mesh, _gather_spec(sharding.spec))
    cast = name in _CAST_BEFORE_GATHER

    def fn(x):
        if gathered.spec == sharding.spec:  # nothing sharded over fsdp
            return x
        return fsdp_gather(x, gathered, sharding, jnp.dtype(dtype) if cast else x.dtype)

    return fn


def _layer_shardings(full_shardings, mesh) -> dict:
    """One decoder layer's param shardings: ``layers_0``'s, or the scanned ``layers`` ones without the
    leading layer axis."""
    if "layers" in full_shardings:
        return jax.tree.map(lambda s: NamedSharding(mesh, P(*s.spec[1:])), full_shardings["layers"])
    return full_shardings["layers_0"]


def with_adapters(frozen, adapters) -> dict:
    """The base tree with each LoRA pair stored beside its kernel (``lora_a``, ``lora_b``), so each layer
    merges its own kernels when it runs (:func:`layer_params_fn`)."""
    flat = traverse_util.flatten_dict(dict(frozen), sep="/")
    for path, x in traverse_util.flatten_dict(dict(adapters), sep="/").items():
        base, leaf = path.rsplit("/", 1)
        if f"{base}/kernel" not in flat or leaf not in ("a", "b"):
            raise ChameleonError(f"lora: adapter {path!r} has no base kernel {base + '/kernel'!r}")
        flat[f"{base}/lora_{leaf}"] = x
    return _tree(flat)


def layer_params_fn(module, full_shardings, mesh, lora_config=None):
    """The per-layer params transform of the train step (``Chameleon.layer_params``), or None: merge the
    layer's LoRA pairs into its kernels, then all-gather its fsdp-sharded params. It runs inside the
    layer's remat region (and the scan body), so one layer's gathered weights exist at a time and the
    backward pass re-gathers them and reduce-scatters that layer's gradient."""
    gather = mesh.shape["fsdp"] > 1
    if not gather and lora_config is None:
        return None
    dtype = module.config.dtype
    fns = {}
    if gather:
        flat_sh = traverse_util.flatten_dict(_layer_shardings(full_shardings, mesh), sep="/")
        fns = {k: _gather_leaf(mesh, s, k.rsplit("/", 1)[-1], dtype) for k, s in flat_sh.items()}

    def transform(layer):
        flat = traverse_util.flatten_dict(dict(layer), sep="/")
        out = {}
        for path, x in flat.items():
            base, leaf = path.rsplit("/", 1) if "/" in path else ("", path)
            if leaf in ("lora_a", "lora_b"):
                continue
            if leaf == "kernel" and f"{base}/lora_a" in flat:
                pair = {"m": {"a": flat[f"{base}/lora_a"], "b": flat[f"{base}/lora_b"]}}
                x = lora_lib.apply({"m": {"kernel": x}}, pair, lora_config)["m"]["kernel"]
            out[path] = fns[path](x) if path in fns else x
        return _tree(out)

    return transform


def outer_params_fn(module, full_shardings, mesh):
    """Gathers the params outside the decoder layers (embeddings, final norm, LM head) over fsdp."""
    if mesh.shape["fsdp"] == 1:
        return lambda full: full
    dtype = module.config.dtype
    flat_sh = {k: s for k, s in traverse_util.flatten_dict(dict(full_shardings), sep="/").items()
               if not k.startswith("layers")}
    fns = {k: _gather_leaf(mesh, s, k.rsplit("/", 1)[-1], dtype) for k, s in flat_sh.items()}

    def outer(full):
        flat = traverse_util.flatten_dict(dict(full), sep="/")
        return _tree({k: fns[k](x) if k in fns else x for k, x in flat.items()})

    return outer


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
    module = module.clone(layer_params=layer_params_fn(module, full_shardings, mesh, lora_config))
    replicated = NamedSharding(mesh, P())
    outer = outer_params_fn(module, full_shardings, mesh)
    offload = any(getattr(s, "memory_kind", None) == "pinned_host" for s in jax.tree.leaves(shardings["opt_state"]))
    device_opt = jax.tree.map(lambda s: s.with_memory_kind("device"), shardings["opt_state"])
    text_columns = text_columns_ok(config, full_shardings)

    def combine(params, frozen):
        """The full param tree the module applies: the layers' own gather / LoRA merge happen per layer
        (``module.layer_params``); the params outside the layers (embeddings, final norm, head) are
        gathered here."""
        full = with_adapters(frozen, params) if lora_config is not None else {**frozen, **params}
        return outer(full)

    def micro_loss(params, frozen, mb, denom):
        nll, z, count = forward_loss_sums(module, combine(params, frozen), mb["input_ids"], mb["labels"],
                                          mb["attention_mask"], image_targets=image_targets,
                                          loss_chunk=tc.loss_chunk, text_columns=text_columns)
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
        opt_state = state["opt_state"]
        if offload:  # host -> device for the update, and back
            opt_state = jax.device_put(opt_state, device_opt)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if offload:
            opt_state = jax.device_put(opt_state, shardings["opt_state"])
        # No op of the model draws randomness yet (no dropout); the key still advances every step and
        # is checkpointed, so stochastic additions resume exactly too.
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        metrics = {"loss": nll / denom, "z_loss": z / denom, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "targets": count, "tokens": batch["attention_mask"].sum()}
        return new_state, metrics

    return jax.jit(step, out_shardings=(shardings, replicated), donate_argnums=(0,))


def state_shardings(tx, abstract_params, param_shardings, mesh, offload: bool = False) -> dict:
    """Shardings of the train state; each optimizer moment takes its param's sharding (in host memory,
    ``pinned_host``, with ``offload``)."""
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_shardings,
                                transform_non_params=lambda _: replicated)
    if offload:
        opt = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt)
    return {"step": replicated, "params": param_shardings, "opt_state": opt, "rng": replicated}



# ------------------------------------------------------------------ state layout (scanned layers)
def stacked_shardings(tree_shardings, mesh, num_layers: int) -> dict:
    """Shardings of the scanned tree: each layer leaf's spec with a leading replicated layer axis."""
    return convert_layout(tree_shardings, num_layers, True, mesh)


def _is_layer_dict(x) -> bool:
    return isinstance(x, dict) and ("layers" in x or "layers_0" in x)


def convert_layout(tree, num_layers: int, stacked: bool, mesh=None):
    """Every param-keyed dict inside ``tree`` (params, adapters, optimizer moments) to the scanned layout
    (``stacked``) or the per-layer one; dicts already in that layout stay. Traceable. With ``mesh``,
    ``tree`` holds NamedShardings (the layer axis is replicated)."""
    from ..model.scan import stack_layers, stacked_sharding, unstack_layers

    stack = take = None
    if mesh is not None:
        stack = lambda xs: stacked_sharding(xs[0])  # noqa: E731
        take = lambda s, i: NamedSharding(mesh, P(*s.spec[1:]))  # noqa: E731

    def fn(x):
        if not _is_layer_dict(x):
            return x
        if stacked:
            return x if "layers" in x else stack_layers(x, num_layers, stack)
        return x if "layers" not in x else unstack_layers(x, num_layers, take)

    return jax.tree.map(fn, tree, is_leaf=_is_layer_dict)


def layout_of(tree) -> str:
    """"scanned" when a param-keyed dict in ``tree`` holds ``layers``, else "per-layer"."""
    found = []
    jax.tree.map(lambda x: found.append("layers" in x) if _is_layer_dict(x) else None, tree, is_leaf=_is_layer_dict)
    return "scanned" if any(found) else "per-layer"


def init_train_state(tc: TrainConfig, base, base_shardings, mesh, num_layers: int):
    """The train state of a per-layer ``base`` tree (already placed in ``base_shardings``; donated when
    ``tc.scan_layers`` restacks it): (state, frozen, state shardings, frozen shardings, tx). LoRA: the
    adapters are trainable, ``base`` frozen; ``tc.scan_layers``: params (and adapters) stacked
    [L, ...] for the scanned layers."""
    replicated = NamedSharding(mesh, P())
    adapters = None
    if tc.lora is not None:
        adapters = lora_lib.init_adapters(tc.lora, base, jax.random.key(tc.lora.seed))
        if tc.scan_layers and tc.lora.layers is not None:
            raise ChameleonError("train config: scan_layers with lora.layers: the scanned layers need an adapter "
                                 "in every layer (drop lora.layers or set scan_layers=false)")
    if tc.scan_layers:
        from ..model.scan import stack_layers

        base_shardings = stacked_shardings(base_shardings, mesh, num_layers)
        base = jax.jit(lambda t: stack_layers(t, num_layers), out_shardings=base_shardings,
                       donate_argnums=0)(base)
        if adapters is not None:
            adapters = stack_layers(adapters, num_layers)
    if adapters is not None:
        frozen, frozen_sh = base, base_shardings
        param_sh = jax.tree.map(lambda _: replicated, adapters)
        trainable = jax.device_put(adapters, param_sh)
    else:
        frozen, frozen_sh, trainable, param_sh = {}, {}, base, base_shardings
    tx = make_optimizer(tc)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    shardings = state_shardings(tx, abstract, param_sh, mesh, offload=tc.offload_optimizer)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(trainable)
    state = {"step": jax.device_put(jnp.int32(0), replicated), "params": trainable, "opt_state": opt_state,
             "rng": jax.device_put(jax.random.key_data(jax.random.key(tc.seed)), replicated)}
    return state, frozen, shardings, frozen_sh, tx
