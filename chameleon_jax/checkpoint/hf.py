"""The HF name table and the HF safetensors directory as a tensor source and as an output.

One table (:data:`_RULES`) maps every param path of :class:`chameleon_jax.model.Chameleon` to
its Hugging Face tensor name and layout transform; import and export both use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import traverse_util

from ..config import ChameleonConfig
from ..errors import ChameleonError
from .killpoint import point
from .outdir import atomic_dir
from .safetensors_io import SafetensorsFile, write_safetensors

# ------------------------------------------------------------------ name table
# (param path regex, HF name template, layout). Layouts: how the HF tensor is stored relative
# to ours; see _to_ours / _to_hf.
_RULES: list[tuple[str, str, str]] = [
    (r"embed_tokens/embedding", "model.embed_tokens.weight", "copy"),
    (r"lm_head", "lm_head.weight", "transpose"),
    (r"norm/scale", "model.norm.weight", "copy"),
    (r"layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale", r"model.layers.\1.\2.weight", "copy"),
    (r"layers_(\d+)/self_attn/([qkv]_proj)/kernel", r"model.layers.\1.self_attn.\2.weight", "in_heads"),
    (r"layers_(\d+)/self_attn/([qkv]_proj)/bias", r"model.layers.\1.self_attn.\2.bias", "flatten"),
    (r"layers_(\d+)/self_attn/o_proj/kernel", r"model.layers.\1.self_attn.o_proj.weight", "out_heads"),
    (r"layers_(\d+)/self_attn/o_proj/bias", r"model.layers.\1.self_attn.o_proj.bias", "copy"),
    (r"layers_(\d+)/self_attn/([qk]_norm)/scale", r"model.layers.\1.self_attn.\2.weight", "copy"),
    (r"layers_(\d+)/self_attn/([qk]_norm)/bias", r"model.layers.\1.self_attn.\2.bias", "copy"),
    (r"layers_(\d+)/mlp/(gate_proj|up_proj|down_proj)/kernel", r"model.layers.\1.mlp.\2.weight", "transpose"),
    (r"layers_(\d+)/mlp/(gate_proj|up_proj|down_proj)/bias", r"model.layers.\1.mlp.\2.bias", "copy"),
    (r"vqmodel/quantize", "model.vqmodel.quantize.embedding.weight", "copy"),
    (r"vqmodel/(.+)/kernel", r"model.vqmodel.\1.weight", "conv"),
    (r"vqmodel/(.+)/scale", r"model.vqmodel.\1.weight", "copy"),
    (r"vqmodel/(.+)/bias", r"model.vqmodel.\1.bias", "copy"),
]
_COMPILED = [(re.compile(p), t, k) for p, t, k in _RULES]
# HF names that may appear in a file but are not parameters of ours.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _vq_dotted(path: str) -> str:
    """``encoder/down_0/block_1/conv1`` -> ``encoder.down.0.block.1.conv1`` (HF module tree)."""
    path = re.sub(r"(down|up)_(\d+)/(block|attn)_(\d+)", r"\1.\2.\3.\4", path)
    path = re.sub(r"(down|up)_(\d+)/", r"\1.\2.", path)
    return path.replace("/", ".")


def hf_name(path: str) -> tuple[str, str]:
    """Param path (``layers_0/self_attn/q_proj/kernel``) -> (HF tensor name, layout)."""
    for pattern, template, layout in _COMPILED:
        m = pattern.fullmatch(path)
        if m:
            name = m.expand(template)
            if path.startswith("vqmodel/"):
                name = "model.vqmodel." + _vq_dotted(name[len("model.vqmodel.") :])
            return name, layout
    raise KeyError(f"no HF name for param {path!r}")


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "transpose":
        return shape[::-1]
    if layout == "in_heads":  # ours [D, N, Dh]; HF [N*Dh, D]
        return (shape[1] * shape[2], shape[0])
    if layout == "out_heads":  # ours [H, Dh, D]; HF [D, H*Dh]
        return (shape[2], shape[0] * shape[1])
    if layout == "flatten":
        return (int(np.prod(shape)),)
    if layout == "conv":  # ours HWIO; HF OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _to_ours(x: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    if layout == "transpose":
        return x.T
    if layout in ("in_heads", "out_heads"):
        return x.T.reshape(shape)
    if layout == "flatten":
        return x.reshape(shape)
    if layout == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transpose":
        return x.T
    if layout == "in_heads":
        return x.reshape(x.shape[0], -1).T
    if layout == "out_heads":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "flatten":
        return x.reshape(-1)
    if layout == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


class HFSource:
    """The tensors of an HF directory: model.safetensors or model.safetensors.index.json.

    A *tensor source* is anything with ``keys()``, ``shape(name)``, ``get(name) -> np.ndarray``
    and ``where(name) -> str`` (for messages), holding tensors under HF names and in HF layout;
    :func:`read_params` turns one into our param tree. meta.MetaRelease is another.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self._files: dict[str, SafetensorsFile] = {}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                weight_map = dict(weight_map)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ChameleonError(f"{index}: not a valid safetensors index ({e!r})") from None
            opened: dict[str, SafetensorsFile] = {}
            for name, fname in weight_map.items():
                if fname not in opened:
                    opened[fname] = SafetensorsFile(os.path.join(directory, fname))
                if name not in opened[fname].keys():
                    raise ChameleonError(f"{index}: tensor {name!r} is mapped to {fname}, which does not hold it")
                self._files[name] = opened[fname]
        elif os.path.isfile(single):
            f = SafetensorsFile(single)
            self._files = {name: f for name in f.keys()}
        else:
            raise ChameleonError(
                f"{directory}: no model.safetensors or model.safetensors.index.json "
                "(expected an HF Chameleon directory)"
            )

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._files[name].get(name)

    def where(self, name: str) -> str:
        return self._files[name].path


# ------------------------------------------------------------------ params <-> HF tensors
# The VQ-GAN decoder (codes -> pixels) is optional: transformers' Chameleon checkpoints do not
# have it, conversions made for image generation (and Meta's vqgan.ckpt) do. A checkpoint holds
# all of its tensors or none.
VQ_DECODER = "vqmodel/decoder/"
VQ_DECODER_HF = "model.vqmodel.decoder."


def has_vq_decoder(params: Mapping) -> bool:
    """Whether a param tree holds the VQ-GAN decoder (``vqmodel/decoder``)."""
    vq = params.get("vqmodel") if isinstance(params, Mapping) else None
    return isinstance(vq, Mapping) and "decoder" in vq


def expected_params(config: ChameleonConfig, vq_decoder: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the param tree (abstract: no memory); ``vq_decoder``:
    include the optional VQ-GAN decoder's params."""
    from ..model import init_params  # local: model imports config only

    import flax.linen as nn

    tree = nn.unbox(init_params(config, jax.random.key(0), abstract=True, vq_decoder=vq_decoder))
    return traverse_util.flatten_dict(tree, sep="/")


def plan_params(source, config: ChameleonConfig, prefix: str = "") -> list[tuple[str, str, str, tuple]]:
    """Check a tensor source against ``config``; returns [(param path, HF name, layout, shape)].

    The VQ-GAN decoder's tensors (``model.vqmodel.decoder.*``) are planned when the source holds
    all of them and left out when it holds none. ``prefix``: plan only the params whose path
    starts with it (e.g. :data:`VQ_DECODER`). Raises ChameleonError for missing (a partial
    decoder included), unexpected and wrong-shape tensors, naming the file.
    """
    where = getattr(source, "directory", "checkpoint")
    layers = {int(n.split(".")[2]) for n in source.keys()
              if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
    if layers and max(layers) + 1 < config.num_hidden_layers:  # before tracing that many layers
        raise ChameleonError(f"{where}: the config has num_hidden_layers={config.num_hidden_layers} but the "
                             f"checkpoint holds layers 0..{max(layers)}")
    expected = expected_params(config)
    plan = []
    for path, sds in expected.items():
        if path.startswith(prefix):
            name, layout = hf_name(path)
            plan.append((path, name, layout, tuple(sds.shape)))
    have = set(source.keys())
    decoder = [item for item in plan if item[0].startswith(VQ_DECODER)]
    held = [name for _, name, _, _ in decoder if name in have]
    if decoder and not held:
        plan = [item for item in plan if not item[0].startswith(VQ_DECODER)]
    elif len(held) < len(decoder):
        absent = sorted(name for _, name, _, _ in decoder if name not in have)
        more = f" (+{len(absent) - 5} more)" if len(absent) > 5 else ""
        raise ChameleonError(
            f"{where}: checkpoint holds {len(held)} of the {len(decoder)} VQ-GAN decoder tensors "
            f"({VQ_DECODER_HF}*) this config needs; missing {absent[:5]}{more}. The decoder must be "
            "complete, or absent (then the model reads images but cannot draw them)"
        )
    wanted = {name for _, name, _, _ in plan}
    missing = sorted(wanted - have)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ChameleonError(f"{where}: checkpoint is missing tensor(s) {missing[:5]}{more}")
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(n for n in have if n not in wanted and n not in tolerated and not _IGNORED.fullmatch(n))
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ChameleonError(
            f"{source.where(extra[0])}: unexpected tensor(s) {extra[:5]}{more} not used by this config"
        )
    for path, name, layout, shape in plan:
        want_hf = _hf_shape(shape, layout)
        if tuple(source.shape(name)) != want_hf:
            raise ChameleonError(
                f"{source.where(name)}: tensor {name!r} has shape {list(source.shape(name))}, "
                f"expected {list(want_hf)} for this config"
            )
    return plan


def read_params(source, config: ChameleonConfig, dtype=None, put: Callable | None = None) -> dict:
    """Turn a tensor source (HF names and layout, see :class:`HFSource`) into our param tree.

    Checks first (:func:`plan_params`), then converts tensor by tensor: each is read,
    transposed, cast and handed to ``put(path, array)`` (default ``jax.device_put``), so host
    memory holds about one tensor beyond the result. ``dtype``: cast every param to it; None
    keeps the checkpoint's dtype.
    """
    put = put or (lambda _path, a: jax.device_put(a))
    flat = {}
    for path, name, layout, shape in plan_params(source, config):
        flat[path] = put(path, convert_tensor(source.get(name), layout, shape, dtype))
    return traverse_util.unflatten_dict(flat, sep="/")


def convert_tensor(x: np.ndarray, layout: str, shape: tuple[int, ...], dtype=None) -> np.ndarray:
    """One HF tensor -> our layout (a contiguous copy), cast to ``dtype`` when given."""
    a = _to_ours(x, layout, shape)
    return np.ascontiguousarray(a, dtype=np.dtype(dtype) if dtype is not None else a.dtype)


def read_hf_params(directory: str, config: ChameleonConfig, dtype=None, put: Callable | None = None) -> dict:
    """Read an HF safetensors checkpoint directory into our param tree (see :func:`read_params`)."""
    return read_params(HFSource(directory), config, dtype, put)


def hf_tensors(params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) for every param, one at a time (sharded arrays gathered)."""
    for path, value in traverse_util.flatten_dict(dict(params), sep="/").items():
        name, layout = hf_name(path)
        yield name, np.ascontiguousarray(_to_hf(np.asarray(jax.device_get(value)), layout))


def write_hf_tensors(directory: str, tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int) -> None:
    """Stream (name, array) pairs into safetensors shards (+ index when more than one)."""
    meta = {"format": "pt"}
    shard: dict[str, np.ndarray] = {}
    size = 0
    files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, size
        fname = f"part-{len(files):05d}.safetensors"
        write_safetensors(os.path.join(directory, fname), shard, meta)
        files.append((fname, list(shard)))
        shard, size = {}, 0

    total = 0
    for name, a in tensors:
        if shard and size + a.nbytes > max_shard_bytes:
            flush()
        shard[name] = a
        size += a.nbytes
        total += a.nbytes
    if shard or not files:
        flush()
    if len(files) == 1:
        os.replace(os.path.join(directory, files[0][0]), os.path.join(directory, "model.safetensors"))
        point("renamed model.safetensors")
        return
    weight_map = {}
    for i, (fname, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(directory, fname), os.path.join(directory, final))
        point(f"renamed shard {final}")
        weight_map.update({n: final for n in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf(params: Mapping, config: ChameleonConfig, directory: str, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False, extra_files: Iterable[str] = ()) -> None:
    """Write an HF directory (config.json + safetensors, sharded with an index when large) that
    transformers loads. Atomic (temp dir + rename). ``extra_files`` are copied in (tokenizer).
    """
    with atomic_dir(directory, overwrite) as tmp:
        write_hf_tensors(tmp, hf_tensors(params), max_shard_bytes)
        config.to_json_file(os.path.join(tmp, "config.json"))
        point("save_hf: config.json written")
        for f in extra_files:
            shutil.copy2(f, os.path.join(tmp, os.path.basename(f)))
            point(f"save_hf: copied {os.path.basename(f)}")
