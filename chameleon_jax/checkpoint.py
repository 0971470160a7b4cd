"""Checkpoint I/O: the HF name table, safetensors read/write (streamed, mmap), ``load``.

One table (:data:`_RULES`) maps every param path of :class:`chameleon_jax.model.Chameleon` to
its Hugging Face tensor name and layout transform; import and export both use it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from .config import ChameleonConfig
from .errors import ChameleonError

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


# ------------------------------------------------------------------ safetensors
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Read-only, memory-mapped safetensors file; tensors are numpy views (no copy, any dtype).

    Validates the header and that every tensor's byte range lies inside the file, so truncated
    or corrupt files fail here with the file named, not later with a bus error.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise ChameleonError(f"{path}: file not found")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 * 2**20:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            self.metadata = header.pop("__metadata__", None) or {}
            data_size = size - 8 - n
            self._entries = {}
            for name, e in header.items():
                dtype = _ST_DTYPES.get(e.get("dtype"))
                if dtype is None:
                    raise ValueError(f"tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
                start, end = (int(v) for v in e["data_offsets"])
                shape = tuple(int(s) for s in e["shape"])
                if not 0 <= start <= end <= data_size:
                    raise ValueError(f"tensor {name!r} lies outside the file (truncated?)")
                if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                    raise ValueError(f"tensor {name!r}: byte size does not match shape {shape}")
                self._entries[name] = (np.dtype(dtype), shape, 8 + n + start)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
            raise ChameleonError(f"{path}: not a valid safetensors file ({e})") from None
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, offset = self._entries[name]
        count = int(np.prod(shape))
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=offset).reshape(shape)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write tensors to ``path`` (numpy arrays, bf16 via ml_dtypes). Not atomic by itself."""
    header: dict[str, Any] = {}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _ST_NAMES:
            raise ChameleonError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays[name] = a
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(arrays):
            f.write(arrays[name].tobytes())


class HFSource:
    """The tensors of an HF directory: model.safetensors or model.safetensors.index.json.

    A *tensor source* is anything with ``keys()``, ``shape(name)``, ``get(name) -> np.ndarray``
    and ``where(name) -> str`` (for messages), holding tensors under HF names and in HF layout;
    :func:`read_params` turns one into our param tree. meta_format.py provides another.
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
def expected_params(config: ChameleonConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the param tree (abstract: no memory)."""
    from .model import init_params  # local: model imports config only

    import flax.linen as nn

    tree = nn.unbox(init_params(config, jax.random.key(0), abstract=True))
    return traverse_util.flatten_dict(tree, sep="/")


def read_params(source, config: ChameleonConfig, dtype=None, put: Callable | None = None) -> dict:
    """Turn a tensor source (HF names and layout, see :class:`HFSource`) into our param tree.

    Checks first (missing, unexpected, wrong-shape tensors, each named with its file), then
    converts tensor by tensor: each is read, transposed, cast and handed to ``put(path, array)``
    (default ``jax.device_put``), so host memory holds about one tensor beyond the result.
    ``dtype``: cast every param to it; None keeps the checkpoint's dtype.
    """
    expected = expected_params(config)
    wanted = {}
    for path, sds in expected.items():
        name, layout = hf_name(path)
        wanted[name] = (path, layout, tuple(sds.shape))
    have = set(source.keys())
    missing = sorted(set(wanted) - have)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        where = getattr(source, "directory", "checkpoint")
        raise ChameleonError(f"{where}: checkpoint is missing tensor(s) {missing[:5]}{more}")
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(n for n in have if n not in wanted and n not in tolerated and not _IGNORED.fullmatch(n))
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ChameleonError(
            f"{source.where(extra[0])}: unexpected tensor(s) {extra[:5]}{more} not used by this config"
        )
    for name, (path, layout, shape) in wanted.items():
        want_hf = _hf_shape(shape, layout)
        if tuple(source.shape(name)) != want_hf:
            raise ChameleonError(
                f"{source.where(name)}: tensor {name!r} has shape {list(source.shape(name))}, "
                f"expected {list(want_hf)} for this config"
            )
    put = put or (lambda _path, a: jax.device_put(a))
    flat = {}
    for name, (path, layout, shape) in wanted.items():
        a = _to_ours(source.get(name), layout, shape)
        target = np.dtype(dtype) if dtype is not None else a.dtype
        flat[path] = put(path, np.ascontiguousarray(a, dtype=target))
    return traverse_util.unflatten_dict(flat, sep="/")


def read_hf_params(directory: str, config: ChameleonConfig, dtype=None, put: Callable | None = None) -> dict:
    """Read an HF safetensors checkpoint directory into our param tree (see :func:`read_params`)."""
    return read_params(HFSource(directory), config, dtype, put)


def hf_tensors(params: Mapping) -> Iterable[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) for every param, one at a time."""
    for path, value in traverse_util.flatten_dict(dict(params), sep="/").items():
        name, layout = hf_name(path)
        yield name, _to_hf(np.asarray(jax.device_get(value)), layout)


def save_hf(params: Mapping, config: ChameleonConfig, directory: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write an HF directory (config.json + safetensors, sharded with an index when large).

    Atomic: written into a temp dir beside ``directory``, renamed at the end. ``directory`` must
    not exist.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise ChameleonError(f"{directory}: already exists; refusing to overwrite")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp", dir=parent)
    try:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, a in hf_tensors(params):
            if size and size + a.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = a
            size += a.nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0], meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, fname), shard, meta)
                weight_map.update({n: fname for n in shard})
            total = sum(a.nbytes for s in shards for a in s.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        config.to_json_file(os.path.join(tmp, "config.json"))
        os.replace(tmp, directory)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
