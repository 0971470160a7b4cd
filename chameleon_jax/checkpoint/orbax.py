"""Our converted checkpoint format: one Orbax checkpoint per param group, a marker file, the
tokenizer files and extra tensors beside it (written by ``chameleon-jax convert``)."""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from ..config import ChameleonConfig
from ..errors import ChameleonError, read_json
from .hf import convert_tensor, expected_params, plan_params
from .safetensors_io import SafetensorsFile, write_safetensors

# Layout:
# DST/chameleon_jax.json        {"format": ORBAX_FORMAT, "groups": [...], ...}
# DST/config.json               HF config
# DST/params/<group>/           one Orbax checkpoint per top-level param group (embed_tokens,
#                               layers_0, ..., norm, lm_head, vqmodel). Written group by group so
#                               conversion holds one group in memory, never the whole model.
# DST/extra_tensors.safetensors tensors our model does not use yet (Meta's VQ-GAN decoder)

ORBAX_FORMAT = "chameleon-jax/orbax-v1"
MARKER = "chameleon_jax.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
    "preprocessor_config.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def write_orbax(directory: str, config: ChameleonConfig, source, dtype=None, extra_tensors=(),
                progress: Callable[[str, int, int], None] | None = None) -> None:
    """Convert a tensor source into the Orbax layout above, in ``directory`` (must be empty)."""
    plan = plan_params(source, config)
    groups: dict[str, list] = {}
    for item in plan:
        groups.setdefault(item[0].split("/")[0], []).append(item)
    ckpt = _checkpointer()
    dtypes = set()
    for i, (group, items) in enumerate(groups.items()):
        if progress:
            progress(group, i, len(groups))
        flat = {}
        for path, name, layout, shape in items:
            flat[path] = convert_tensor(source.get(name), layout, shape, dtype)
            dtypes.add(str(flat[path].dtype))
        tree = traverse_util.unflatten_dict(flat, sep="/")  # {group: subtree}
        ckpt.save(os.path.join(directory, "params", group), tree)
        ckpt.wait_until_finished()
        del flat, tree
    if progress:
        progress("done", len(groups), len(groups))
    extras = dict(extra_tensors)
    if extras:
        write_safetensors(os.path.join(directory, "extra_tensors.safetensors"), extras)
    config.to_json_file(os.path.join(directory, "config.json"))
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"format": ORBAX_FORMAT, "groups": list(groups), "dtypes": sorted(dtypes),
                   "extra_tensors": sorted(extras)}, f, indent=2)


def read_orbax(directory: str, config: ChameleonConfig, shardings: Mapping | None = None, dtype=None) -> dict:
    """Restore params from the Orbax layout, each array straight into its sharding.

    ``shardings``: flat {param path: jax.sharding.Sharding}; default: the first device. No host
    ever holds the full model: Orbax reads each device's slice.
    """
    marker = os.path.join(directory, MARKER)
    meta = read_json(marker, "converted-checkpoint marker")
    if meta.get("format") != ORBAX_FORMAT:
        raise ChameleonError(f"{marker}: format {meta.get('format')!r}, expected {ORBAX_FORMAT!r}")
    expected = expected_params(config)
    stored_dtype = np.dtype(meta["dtypes"][0]) if meta.get("dtypes") else np.dtype(np.float32)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    groups: dict[str, dict] = {}
    for path, sds in expected.items():
        sharding = shardings[path] if shardings is not None else default
        groups.setdefault(path.split("/")[0], {})[path] = jax.ShapeDtypeStruct(sds.shape, stored_dtype, sharding=sharding)
    missing = sorted(set(groups) - set(meta.get("groups", [])))
    if missing:
        raise ChameleonError(f"{directory}: converted checkpoint lacks param group(s) {missing}")
    ckpt = _checkpointer()
    flat = {}
    for group, abstract in groups.items():
        target = traverse_util.unflatten_dict(abstract, sep="/")
        gdir = os.path.join(directory, "params", group)
        try:
            restored = ckpt.restore(gdir, target)
        except Exception as e:  # Orbax raises many types; name the group dir
            raise ChameleonError(f"{gdir}: cannot restore ({type(e).__name__}: {e})") from None
        for path, x in traverse_util.flatten_dict(restored, sep="/").items():
            flat[path] = x.astype(dtype) if dtype is not None and x.dtype != np.dtype(dtype) else x
    return traverse_util.unflatten_dict(flat, sep="/")


def read_extra_tensors(directory: str) -> dict[str, np.ndarray]:
    path = os.path.join(directory, "extra_tensors.safetensors")
    if not os.path.isfile(path):
        return {}
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}
