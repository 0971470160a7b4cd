"""LoRA, functionally: rank-r adapters added to chosen projection kernels before ``apply``.

The Linen modules stay untouched. An adapter pair for a kernel ``W`` (our einsum layout, e.g.
q_proj ``[D, H, Dh]``) is ``a: in_shape + (r,)`` and ``b: (r,) + out_shape``; the effective kernel
is ``W + (alpha / r) * tensordot(a, b, 1)``, computed in float32 inside the loss function, so the
base params never change and only the adapters get gradients and optimizer state.

``a`` starts Gaussian (std ``1/sqrt(fan_in)``), ``b`` at zero, so step 0 is the base model.
:func:`merge` folds trained adapters into the base kernels for inference (same function as the
training forward, so merged logits equal base+adapter logits).

Adapter tree: ``{"layers_0": {"self_attn": {"q_proj": {"a": ..., "b": ...}}, "mlp": {...}}, ...}``,
mirroring the param paths with ``kernel`` replaced by the pair.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..errors import ChameleonError, read_json

# projection name -> number of leading kernel dims that are input dims
PROJECTIONS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
               "gate_proj": 1, "up_proj": 1, "down_proj": 1}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTERS_FILE = "lora.json"


@dataclass(frozen=True)
class LoraConfig:
    """``rank`` r, ``alpha`` (scale alpha / r), ``targets``: projection names (or "attention",
    "mlp", "all"), ``layers``: which decoder layers (None: all)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION
    layers: tuple[int, ...] | None = None
    seed: int = field(default=0)

    def __post_init__(self):
        expanded: list[str] = []
        for t in (self.targets,) if isinstance(self.targets, str) else self.targets:
            if t == "attention":
                expanded += ATTENTION
            elif t == "mlp":
                expanded += ["gate_proj", "up_proj", "down_proj"]
            elif t == "all":
                expanded += list(PROJECTIONS)
            elif t in PROJECTIONS:
                expanded.append(t)
            else:
                raise ChameleonError(
                    f"lora.targets: unknown projection {t!r}; expected some of {list(PROJECTIONS)} "
                    "or 'attention', 'mlp', 'all'"
                )
        object.__setattr__(self, "targets", tuple(dict.fromkeys(expanded)))
        if not self.targets:
            raise ChameleonError("lora.targets: empty; name at least one projection")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ChameleonError(f"lora.rank: expected an integer >= 1, got {self.rank!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "lora") -> "LoraConfig":
        if not isinstance(d, Mapping):
            raise ChameleonError(f"{source}: expected an object like {{\"rank\": 8}}, got {d!r}")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ChameleonError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(names)}")
        kw = dict(d)
        if "targets" in kw:
            kw["targets"] = (kw["targets"],) if isinstance(kw["targets"], str) else tuple(kw["targets"])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


def _target_paths(lcfg: LoraConfig, flat_params: Mapping[str, Any]) -> list[str]:
    """Flat param paths (``layers_3/self_attn/q_proj/kernel``) that get an adapter."""
    out = []
    for path in flat_params:
        parts = path.split("/")
        if len(parts) != 4 or parts[-1] != "kernel" or parts[2] not in lcfg.targets:
            continue
        layer = int(parts[0].split("_")[1])
        if lcfg.layers is None or layer in lcfg.layers:
            out.append(path)
    if not out:
        raise ChameleonError(f"lora: no kernel matches targets {list(lcfg.targets)} and layers {lcfg.layers}")
    return sorted(out)


def adapter_shapes(lcfg: LoraConfig, params) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{kernel path: (a shape, b shape)} for ``params`` (arrays or ShapeDtypeStructs)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    shapes = {}
    for path in _target_paths(lcfg, flat):
        shape = tuple(flat[path].shape)
        n_in = PROJECTIONS[path.split("/")[2]]
        shapes[path] = (shape[:n_in] + (lcfg.rank,), (lcfg.rank,) + shape[n_in:])
    return shapes


def init_adapters(lcfg: LoraConfig, params, rng: jax.Array | None = None) -> dict:
    """Fresh adapters (float32) for the targeted kernels of ``params``."""
    rng = jax.random.key(lcfg.seed) if rng is None else rng
    flat = {}
    for i, (path, (a_shape, b_shape)) in enumerate(sorted(adapter_shapes(lcfg, params).items())):
        fan_in = math.prod(a_shape[:-1])
        base = path[: -len("/kernel")]
        key = jax.random.fold_in(rng, i)
        flat[f"{base}/a"] = jax.random.normal(key, a_shape, jnp.float32) / math.sqrt(fan_in)
        flat[f"{base}/b"] = jnp.zeros(b_shape, jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def apply(params, adapters, lcfg: LoraConfig):
    """``params`` with each targeted kernel replaced by ``W + scale * a @ b`` (float32). Traceable."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    flat_ad = traverse_util.flatten_dict(dict(adapters), sep="/")
    out = dict(flat)
    for path in {p.rsplit("/", 1)[0] for p in flat_ad}:
        kernel = f"{path}/kernel"
        if kernel not in flat:
            raise ChameleonError(f"lora: adapter {path!r} has no base kernel {kernel!r}")
        a, b = flat_ad[f"{path}/a"], flat_ad[f"{path}/b"]
        delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
        if delta.shape != flat[kernel].shape:
            raise ChameleonError(
                f"lora: adapter {path!r} gives {delta.shape}, kernel is {flat[kernel].shape}")
        out[kernel] = flat[kernel].astype(jnp.float32) + lcfg.scale * delta
    return traverse_util.unflatten_dict(out, sep="/")


def merge(params, adapters, lcfg: LoraConfig, dtype=None):
    """Fold adapters into the base kernels for inference; merged kernels get ``dtype`` (default:
    the base kernel's dtype). Returns a new param tree; ``params`` is not modified."""
    merged = jax.jit(lambda p, a: apply(p, a, lcfg))(params, adapters)
    flat_base = traverse_util.flatten_dict(dict(params), sep="/")
    flat = traverse_util.flatten_dict(merged, sep="/")
    return traverse_util.unflatten_dict(
        {k: v.astype(dtype or flat_base[k].dtype) for k, v in flat.items()}, sep="/"
    )


def num_params(adapters) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


# ------------------------------------------------------------------ adapter files
def save_adapters(directory: str, adapters, lcfg: LoraConfig, overwrite: bool = False) -> str:
    """Write adapters (Orbax) + ``lora.json`` to ``directory``, atomically."""
    import orbax.checkpoint as ocp

    from ..checkpoint.hf import atomic_dir
    from ..sharding import to_host

    with atomic_dir(directory, overwrite) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, "adapters"), jax.tree.map(to_host, adapters))
        ckpt.wait_until_finished()
        with open(os.path.join(tmp, ADAPTERS_FILE), "w") as f:
            json.dump({"format": "chameleon-jax/lora-v1", **lcfg.to_dict()}, f, indent=2)
    return directory


def load_adapters(directory: str) -> tuple[dict, LoraConfig]:
    """Read what :func:`save_adapters` wrote: (adapters, LoraConfig)."""
    import orbax.checkpoint as ocp

    meta_path = os.path.join(directory, ADAPTERS_FILE)
    meta = read_json(meta_path, "LoRA adapter metadata")
    meta.pop("format", None)
    lcfg = LoraConfig.from_dict(meta, meta_path)
    adapters = ocp.StandardCheckpointer().restore(os.path.join(directory, "adapters"))
    return jax.tree.map(jnp.asarray, adapters), lcfg
