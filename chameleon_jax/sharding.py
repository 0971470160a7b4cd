"""Meshes, the logical-axis rules table, and param / batch shardings.

Params carry logical axis names (set where each param is declared in model/); :data:`RULES`
maps them to the mesh axes ``data``, ``fsdp`` and ``tensor``:

- FSDP: the ``embed`` dim of every matrix is split over ``fsdp``.
- Tensor parallel (Megatron style): ``heads``/``kv_heads``/``mlp``/``vocab`` split over ``tensor``
  (q/k/v and gate/up column-parallel, o/down row-parallel, LM head over the vocabulary).
- Batch: split over ``data`` and ``fsdp`` together.
- The VQ-VAE (a small conv net, ~70M params in 7B) is replicated.

Fallback (documented, not an error): a dim that its mesh axes do not divide evenly (e.g. 8 kv
heads on tensor=16, or a batch of 3 on data=2) is replicated along those axes instead; the
choices are listed by :func:`describe`, and :func:`param_shardings` warns once, naming each param
so replicated and the extra bytes per device.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import ChameleonConfig
from .errors import ChameleonError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes (None: replicated). One table for params and activations.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "layers": None,  # the leading layer axis of scanned params (model/scan.py): every chip holds all layers' shards
    "conv_h": None,
    "conv_w": None,
    "conv_in": None,
    "conv_out": None,
    "codes": None,
    "code_dim": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all, every host).

    One axis may be -1 to take the devices left over. Device order comes from
    ``jax.make_mesh`` (topology-aware on TPU, process-major on multi-host).
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ChameleonError("make_mesh: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ChameleonError(f"make_mesh: axis sizes must be positive (or one -1), got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ChameleonError(f"make_mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ChameleonError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices "
            f"({dict(zip(MESH_AXES, sizes))})"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    replicated: list | None = None) -> P:
    """Logical axis names of an array -> PartitionSpec, replicating dims that don't divide.

    ``replicated``: if given, (dim index, mesh axes) of each dim replicated for that reason is
    appended to it.
    """
    spec = []
    used: set[str] = set()
    for name, dim in zip(names, shape):
        axes = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise ChameleonError(f"sharding: logical axis {name!r} has no rule in sharding.RULES")
        axes = tuple(a for a in (axes or ()) if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            if axes and replicated is not None:
                replicated.append((len(spec), axes))
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_logical_axes(config: ChameleonConfig) -> dict[str, tuple[str, ...]]:
    """Flat {param path: logical axis names}, from the abstract (shape-only) init."""
    from .model import init_params

    boxed = init_params(config, jax.random.key(0), abstract=True)
    specs = nn.get_partition_spec(boxed)
    return traverse_util.flatten_dict(specs, sep="/", is_leaf=lambda _, x: isinstance(x, P))


def param_shardings(config: ChameleonConfig, mesh: Mesh, shapes: Mapping[str, tuple] | None = None) -> dict:
    """Flat {param path: NamedSharding} for every param of ``config``."""
    from .checkpoint.hf import expected_params

    shapes = shapes or {k: v.shape for k, v in expected_params(config).items()}
    axes = param_logical_axes(config)
    out, fallbacks = {}, []
    for path in shapes:
        replicated: list = []
        out[path] = NamedSharding(mesh, logical_to_spec(tuple(axes[path]), shapes[path], mesh, replicated))
        if replicated:
            fallbacks.append((path, shapes[path], replicated, out[path].spec))
    if fallbacks:
        _warn_replicated(fallbacks, mesh, jnp.dtype(config.dtype).itemsize, config.dtype)
    return out


def _warn_replicated(fallbacks, mesh: Mesh, itemsize: int, dtype: str) -> None:
    """One warning for the params with a dim replicated because its mesh axes do not divide it:
    each param's name and the bytes per device this costs over an even split."""
    lines, total = [], 0
    for path, shape, replicated, spec in fallbacks:
        nbytes = math.prod(shape) * itemsize
        split = math.prod(mesh.shape[a] for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s))
        # Even split: also over the axes this param's replicated dims would have used.
        ideal = split * math.prod(mesh.shape[a] for _, axes in replicated for a in axes)
        extra = nbytes // split - nbytes // ideal
        total += extra
        dims = ", ".join(f"dim {i} ({shape[i]}) over {'x'.join(axes)}={math.prod(mesh.shape[a] for a in axes)}"
                         for i, axes in replicated)
        lines.append((extra, f"{path}: {dims}: +{_size(extra)} per device"))
    lines = [line for _, line in sorted(lines, key=lambda e: -e[0])]  # the costly ones first
    shown = lines[:8] + ([f"... and {len(lines) - 8} more"] if len(lines) > 8 else [])
    warnings.warn(f"sharding: {len(lines)} param(s) have a dim their mesh axes do not divide, so it is replicated "
                  f"along those axes instead (+{_size(total)} per device in all, at {dtype}): " + "; ".join(shown),
                  stacklevel=3)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a batch-major array (batch over data+fsdp, the rest replicated)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def describe(params, mesh: Mesh | None = None) -> list[str]:
    """One line per param: path, shape, spec; shows which dims fell back to replication."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    lines = []
    for path, x in sorted(flat.items()):
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        lines.append(f"{path} {tuple(x.shape)} {spec}")
    return lines


def bytes_per_device(params) -> dict:
    """{device: bytes of param shards it holds}."""
    out: dict = {}
    for x in jax.tree.leaves(params):
        for s in x.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out




def to_host(x) -> np.ndarray:
    """A jax array as numpy on every process (gathers across hosts when it spans several)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
