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
from .killpoint import point
from .hf import VQ_DECODER, VQ_DECODER_HF, convert_tensor, expected_params, plan_params
from .safetensors_io import SafetensorsFile, write_safetensors

# Layout:
# DST/chameleon_jax.json        {"format": ORBAX_FORMAT, "groups": [...], ...}
# DST/config.json               HF config
# DST/params/<group>/           one Orbax checkpoint per top-level param group (embed_tokens,
#                               layers_0, ..., norm, lm_head, vqmodel). Written group by group so
#                               conversion holds one group in memory, never the whole model.
#                               The vqmodel group holds the VQ-GAN decoder when the source had one
#                               (marker "vq_decoder": true).
# DST/extra_tensors.safetensors tensors our model does not use (none today). Directories converted
#                               before the decoder became params hold Meta's decoder here as
#                               vqgan.decoder.* (PyTorch layout); read_orbax still loads it.

# Where converters before the decoder became params kept Meta's VQ-GAN decoder.
LEGACY_DECODER_PREFIX = "vqgan.decoder."

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
    dtypes: dict[str, str] = {}  # per param: a bf16 decoder beside an fp32 VQ-VAE keeps both
    for i, (group, items) in enumerate(groups.items()):
        if progress:
            progress(group, i, len(groups))
        flat = {}
        for path, name, layout, shape in items:
            flat[path] = convert_tensor(source.get(name), layout, shape, dtype)
            dtypes[path] = str(flat[path].dtype)
        tree = traverse_util.unflatten_dict(flat, sep="/")  # {group: subtree}
        point(f"write_orbax: before saving group {group}")
        ckpt.save(os.path.abspath(os.path.join(directory, "params", group)), tree)  # Orbax wants absolute
        ckpt.wait_until_finished()
        point(f"write_orbax: saved group {group}")
        del flat, tree
    if progress:
        progress("done", len(groups), len(groups))
    extras = dict(extra_tensors)
    if extras:
        write_safetensors(os.path.join(directory, "extra_tensors.safetensors"), extras)
    config.to_json_file(os.path.join(directory, "config.json"))
    point("write_orbax: config.json written")
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump({"format": ORBAX_FORMAT, "groups": list(groups), "dtypes": sorted(set(dtypes.values())),
                   "param_dtypes": dtypes,
                   "vq_decoder": any(item[0].startswith(VQ_DECODER) for item in plan),
                   "extra_tensors": sorted(extras)}, f, indent=2)
    point("write_orbax: marker written")


def read_orbax(directory: str, config: ChameleonConfig, shardings: Mapping | None = None, dtype=None) -> dict:
    """Restore params from the Orbax layout, each array straight into its sharding.

    ``shardings``: flat {param path: jax.sharding.Sharding}; default: the first device. No host
    ever holds the full model: Orbax reads each device's slice. The VQ-GAN decoder is restored
    when the marker says the vqmodel group holds it; a directory converted before that (no
    ``vq_decoder`` in the marker) gets it from ``extra_tensors.safetensors`` if it is there.
    """
    marker = os.path.join(directory, MARKER)
    meta = read_json(marker, "converted-checkpoint marker")
    if meta.get("format") != ORBAX_FORMAT:
        raise ChameleonError(f"{marker}: format {meta.get('format')!r}, expected {ORBAX_FORMAT!r}")
    expected = expected_params(config)
    if not meta.get("vq_decoder", False):
        expected = {k: v for k, v in expected.items() if not k.startswith(VQ_DECODER)}
    stored_dtype = np.dtype(meta["dtypes"][0]) if meta.get("dtypes") else np.dtype(np.float32)
    missing = sorted({path.split("/")[0] for path in expected} - set(meta.get("groups", [])))
    if missing:
        raise ChameleonError(f"{directory}: converted checkpoint lacks param group(s) {missing}")
    stored = _stored_dtypes(directory, meta, expected, stored_dtype)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    groups: dict[str, dict] = {}
    for path, sds in expected.items():
        sharding = shardings[path] if shardings is not None else default
        groups.setdefault(path.split("/")[0], {})[path] = jax.ShapeDtypeStruct(sds.shape, stored[path], sharding=sharding)
    ckpt = _checkpointer()
    flat = {}
    for group, abstract in groups.items():
        target = traverse_util.unflatten_dict(abstract, sep="/")
        gdir = os.path.join(directory, "params", group)
        try:
            restored = ckpt.restore(os.path.abspath(gdir), target)
        except Exception as e:  # Orbax raises many types; name the group dir
            raise ChameleonError(f"{gdir}: cannot restore ({type(e).__name__}: {e})") from None
        for path, x in traverse_util.flatten_dict(restored, sep="/").items():
            flat[path] = x.astype(dtype) if dtype is not None and x.dtype != np.dtype(dtype) else x
    if "vq_decoder" not in meta and config.vq_config is not None:
        legacy = _LegacyDecoder(directory)
        try:
            plan = plan_params(legacy, config, prefix=VQ_DECODER)
        except ChameleonError as e:
            raise ChameleonError(f"{e}; this directory was converted by an older chameleon-jax: convert the "
                                 "source again (`chameleon-jax convert SRC DST --overwrite`)") from None
        for path, name, layout, shape in plan:
            x = convert_tensor(legacy.get(name), layout, shape, dtype)  # None: as stored (Meta's: fp32)
            flat[path] = jax.device_put(x, shardings[path] if shardings is not None else default)
    return traverse_util.unflatten_dict(flat, sep="/")


def _stored_dtypes(directory: str, meta: Mapping, paths, fallback: np.dtype) -> dict[str, np.dtype]:
    """Each param's dtype on disk. The marker lists them per param (``param_dtypes``); markers
    written before that list only the set of dtypes (``dtypes``), which says it when it has one
    member; otherwise each group's Orbax metadata says."""
    per_param = meta.get("param_dtypes")
    if isinstance(per_param, Mapping):
        return {p: np.dtype(per_param.get(p, fallback)) for p in paths}
    if len(meta.get("dtypes") or ()) <= 1:
        return {p: fallback for p in paths}
    out = {}
    ckpt = _checkpointer()
    for group in sorted({p.split("/")[0] for p in paths}):
        gdir = os.path.join(directory, "params", group)
        try:
            info = ckpt.metadata(os.path.abspath(gdir))
            info = getattr(info, "item_metadata", info)
            tree = getattr(info, "tree", info)
            out.update({p: np.dtype(m.dtype) for p, m in traverse_util.flatten_dict(dict(tree), sep="/").items()})
        except Exception as e:  # Orbax raises many types; name the group dir
            raise ChameleonError(f"{gdir}: cannot read the stored dtypes ({type(e).__name__}: {e})") from None
    return {p: out.get(p, fallback) for p in paths}


class _LegacyDecoder:
    """Meta's VQ-GAN decoder as older converts kept it (``extra_tensors.safetensors``,
    ``vqgan.decoder.*``, PyTorch layout), served as a tensor source under its HF names."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, "extra_tensors.safetensors")
        self.directory = self.path
        self._file = SafetensorsFile(self.path) if os.path.isfile(self.path) else None
        self._names = {}
        for key in self._file.keys() if self._file is not None else ():
            if key.startswith(LEGACY_DECODER_PREFIX):
                self._names[VQ_DECODER_HF + key[len(LEGACY_DECODER_PREFIX):]] = key

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.shape(self._names[name]))

    def get(self, name: str) -> np.ndarray:
        return self._file.get(self._names[name])

    def where(self, name: str) -> str:
        return f"{self.path} ({self._names[name]})"


def read_extra_tensors(directory: str) -> dict[str, np.ndarray]:
    path = os.path.join(directory, "extra_tensors.safetensors")
    if not os.path.isfile(path):
        return {}
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}
