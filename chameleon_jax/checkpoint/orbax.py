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
# DST/quantization.json         only in a quantized checkpoint (convert --quantize; the marker then has
#                               "quantization": MODE): {"format": QUANT_FORMAT, "mode", "group",
#                               "params": {path: {"shape", "n_in", "q_shape", "scale_shape", "scale_dtype",
#                                                 "from_dtype"}}}.
#                               Each quantized kernel is stored as <path>/q ([G, g, N] int8 / int4) and
#                               <path>/scale ([G, N], quant.scale_dtype) in its group's tree (quant.QArray's fields).
# DST/extra_tensors.safetensors tensors our model does not use (none today). Directories converted
#                               before the decoder became params hold Meta's decoder here as
#                               vqgan.decoder.* (PyTorch layout); read_orbax still loads it.

# Where converters before the decoder became params kept Meta's VQ-GAN decoder.
LEGACY_DECODER_PREFIX = "vqgan.decoder."

ORBAX_FORMAT = "chameleon-jax/orbax-v1"
MARKER = "chameleon_jax.json"
QUANT_FILE = "quantization.json"
QUANT_FORMAT = "chameleon-jax/quant-v1"
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
                progress: Callable[[str, int, int], None] | None = None, quantize: str | None = None) -> None:
    """Convert a tensor source into the Orbax layout above, in ``directory`` (must be empty).

    ``quantize`` ("int8" / "int4"): each target kernel (:func:`chameleon_jax.quant.is_target`) is
    quantized right after it is read and converted (after the ``dtype`` cast), its float copy dropped
    at once, and its q and scale are stored instead (see the layout above)."""
    from .. import quant

    mode = quant.check_mode(quantize)
    plan = plan_params(source, config)
    qparams: dict[str, dict] = {}
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
            w = convert_tensor(source.get(name), layout, shape, dtype)
            dtypes[path] = str(w.dtype)
            if mode is not None and quant.is_target(path):
                qa = quant.quantize_leaf(path, w, mode)
                del w
                flat[path + "/q"], flat[path + "/scale"] = qa.q, qa.scale
                qparams[path] = {"shape": list(qa.shape), "n_in": qa.n_in, "q_shape": list(qa.q.shape),
                                 "scale_shape": list(qa.scale.shape), "scale_dtype": str(qa.scale.dtype),
                                 "from_dtype": dtypes[path]}
                continue
            flat[path] = w
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
    marker = {"format": ORBAX_FORMAT, "groups": list(groups), "dtypes": sorted(set(dtypes.values())),
              "param_dtypes": dtypes,
              "vq_decoder": any(item[0].startswith(VQ_DECODER) for item in plan),
              "extra_tensors": sorted(extras)}
    if mode is not None:
        with open(os.path.join(directory, QUANT_FILE), "w") as f:
            json.dump({"format": QUANT_FORMAT, "mode": mode, "group": quant.GROUP[mode], "params": qparams},
                      f, indent=2)
        marker["quantization"] = mode
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(marker, f, indent=2)
    point("write_orbax: marker written")


def read_orbax(directory: str, config: ChameleonConfig, shardings: Mapping | None = None, dtype=None) -> dict:
    """Restore params from the Orbax layout, each array straight into its sharding.

    ``shardings``: flat {param path: jax.sharding.Sharding}; default: the first device. No host
    ever holds the full model: Orbax reads each device's slice. The VQ-GAN decoder is restored
    when the marker says the vqmodel group holds it; a directory converted before that (no
    ``vq_decoder`` in the marker) gets it from ``extra_tensors.safetensors`` if it is there.

    A quantized checkpoint (``convert --quantize``; :func:`stored_quantization`) gives its quantized
    kernels as :class:`chameleon_jax.quant.QArray`: q and scale are restored straight into the
    shardings :func:`chameleon_jax.quant.q_specs` derives from the kernel's (no float copy of
    them ever exists); ``dtype`` casts the float params only.
    """
    from .. import quant

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
    qinfo = stored_quantization(directory, meta)
    qlayout = _quantized_layout(directory, qinfo, expected) if qinfo is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    groups: dict[str, dict] = {}
    for path, sds in expected.items():
        sharding = shardings[path] if shardings is not None else default
        group = groups.setdefault(path.split("/")[0], {})
        if path in qlayout:
            n_in, q_shape, s_shape, s_dtype = qlayout[path]
            q_sh = s_sh = sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                q_sh, s_sh = quant.q_shardings(sharding, n_in, q_shape)
            group[path + "/q"] = jax.ShapeDtypeStruct(q_shape, quant.q_dtype(qinfo["mode"]), sharding=q_sh)
            group[path + "/scale"] = jax.ShapeDtypeStruct(s_shape, s_dtype, sharding=s_sh)
            continue
        group[path] = jax.ShapeDtypeStruct(sds.shape, stored[path], sharding=sharding)
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
            parent, _, leaf = path.rpartition("/")
            if leaf in ("q", "scale") and parent in qlayout:
                flat[path] = x  # q / scale of a quantized kernel: as stored
                continue
            flat[path] = x.astype(dtype) if dtype is not None and x.dtype != np.dtype(dtype) else x
    for path, (n_in, _, _, _) in qlayout.items():
        flat[path] = quant.from_stored(flat.pop(path + "/q"), flat.pop(path + "/scale"), qinfo["mode"],
                                       expected[path].shape, n_in)
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


def stored_quantization(directory: str, meta: Mapping | None = None) -> dict | None:
    """How a converted checkpoint stores its weights: None for float (a plain ``convert``), else
    ``{"mode": "int8" | "int4", "group": int, "params": {path: {...}}}`` from ``quantization.json``
    (``convert --quantize``). A marker saying "quantization" without that file (or the file without
    the marker saying so), or a malformed file, raises ChameleonError naming the file."""
    from .. import quant

    marker = os.path.join(directory, MARKER)
    if meta is None:
        meta = read_json(marker, "converted-checkpoint marker")
    qpath = os.path.join(directory, QUANT_FILE)
    mode = meta.get("quantization")
    if mode is None:
        if os.path.exists(qpath):
            raise ChameleonError(f"{qpath}: quantization metadata present, but the marker {marker} records no "
                                 "\"quantization\"; the directory is inconsistent (convert the source again)")
        return None
    if mode not in quant.MODES:
        raise ChameleonError(f"{marker}: \"quantization\" is {mode!r}, expected one of {list(quant.MODES)}")
    info = read_json(qpath, f"quantization metadata (the marker {MARKER} says the weights are stored as {mode})")
    if info.get("format") != QUANT_FORMAT:
        raise ChameleonError(f"{qpath}: format {info.get('format')!r}, expected {QUANT_FORMAT!r}")
    if info.get("mode") != mode:
        raise ChameleonError(f"{qpath}: mode {info.get('mode')!r}, but the marker {MARKER} says {mode!r}")
    group = info.get("group")
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise ChameleonError(f"{qpath}: \"group\" is {group!r}, expected an integer >= 0")
    params = info.get("params")
    if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
        raise ChameleonError(f"{qpath}: \"params\" must map each quantized param path to its shapes")
    return {"mode": mode, "group": group, "params": dict(params)}


def _quantized_layout(directory: str, qinfo: Mapping, expected: Mapping) -> dict[str, tuple]:
    """{path: (n_in, q shape, scale shape, scale dtype)} of the quantized kernels, checked against the
    config's params (the entries of quantization.json must be exactly the quantization targets, with the
    shapes the config and the stored group size imply; no scale_dtype means float32)."""
    from .. import quant

    qpath = os.path.join(directory, QUANT_FILE)
    params = qinfo["params"]
    targets = [p for p in expected if quant.is_target(p)]
    extra = sorted(set(params) - set(targets))
    if extra:
        raise ChameleonError(f"{qpath}: lists {extra[:3]} which the config's model does not quantize (or hold)")
    out = {}
    for path in targets:
        entry = params.get(path)
        if entry is None:
            raise ChameleonError(f"{qpath}: no entry for quantized param {path!r}")
        n_in, q_shape, s_shape = quant.stored_layout(path, expected[path].shape, qinfo["mode"], qinfo["group"])
        want = {"shape": list(expected[path].shape), "n_in": n_in, "q_shape": list(q_shape),
                "scale_shape": list(s_shape)}
        for key, value in want.items():
            if entry.get(key) != value:
                raise ChameleonError(f"{qpath}: {path} {key} {entry.get(key)!r}, but the config and group size "
                                     f"{qinfo['group']} imply {value!r}")
        # checkpoints from before int4's 16-bit scales name no scale_dtype: theirs are float32
        s_dtype = entry.get("scale_dtype", "float32")
        if s_dtype not in ("float32", "bfloat16", "float16"):
            raise ChameleonError(f"{qpath}: {path} scale_dtype {s_dtype!r}, expected float32, bfloat16 or "
                                 "float16")
        out[path] = (n_in, q_shape, s_shape, np.dtype(s_dtype))
    return out


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
