"""Reading the files of Meta's original release: torch files (weights only, memory-mapped),
params.json, text_tokenizer.json, vqgan.yaml, and finding them in a release directory.
Used by :mod:`.meta` (the tensor source). torch is imported only inside functions."""

from __future__ import annotations

import glob
import math
import os
import pickle
import re
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from ..config import VQConfig
from ..errors import ChameleonError, read_json
from ..vocab import IMAGE_TOKEN, META_IMAGE_TOKEN

INSTALL_HINT = "pip install 'chameleon-jax[convert]'"
_SINGLE = "consolidated.pth"
_NUMBERED = re.compile(r"consolidated\.(\d{2})\.pth")
# HF converter's rule: the long-context variant (theta > 1e4) was trained with 16k positions.
_LONG_ROPE_POSITIONS, _POSITIONS = 16384, 4096


def _torch():
    try:
        import torch
    except ImportError:
        raise ChameleonError(f"reading Meta's .pth/.ckpt files needs PyTorch: {INSTALL_HINT}") from None
    return torch


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def load_torch_file(path: str) -> Any:
    """``torch.load`` restricted to tensors and plain containers, memory-mapped.

    Every failure is a ChameleonError naming ``path``: missing, truncated or corrupt files, the
    legacy (pre-zip) format, which cannot be memory-mapped, and pickles that hold code, which
    ``weights_only=True`` refuses without running anything.
    """
    torch = _torch()
    if not os.path.isfile(path):
        raise ChameleonError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise ChameleonError(
            f"{path}: not a PyTorch zip checkpoint (truncated or corrupt, or saved in the legacy "
            "pre-1.6 format, which cannot be memory-mapped: re-save it with a current torch)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ChameleonError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain "
            f"containers (torch.load weights_only=True rejected it: {_first_line(e)}). It may be "
            "malicious, or it is not a Chameleon checkpoint."
        ) from None
    except Exception as e:  # torch raises RuntimeError/EOFError/OSError/... for damaged archives
        raise ChameleonError(f"{path}: cannot read this PyTorch file (truncated or corrupt?): {_first_line(e)}") from None


def _state_dict(obj: Any, path: str, what: str) -> dict:
    """Check that ``obj`` is {str: Tensor}; return it."""
    torch = _torch()
    if not isinstance(obj, dict):
        raise ChameleonError(f"{path}: expected {what} (a dict of tensors), got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ChameleonError(f"{path}: entry {k!r} of {what} is a {type(v).__name__}, expected a tensor")
    return obj


def to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, sharing memory where possible; bf16 becomes ml_dtypes.bfloat16."""
    torch = _torch()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float32, torch.float16, torch.float64):
        return t.numpy()
    raise ChameleonError(f"tensor dtype {t.dtype} is not a floating-point weight dtype")


def _np_dtype(t) -> np.dtype:
    """numpy dtype :func:`to_numpy` gives ``t``, without reading its data."""
    return to_numpy(t.detach().reshape(-1)[:0]).dtype


def _interleaved_to_half(w: np.ndarray, head_dim: int) -> np.ndarray:
    """Rows [h*Dh, ...] (or a [Dh] vector) from interleaved-pair to rotate_half order, per head."""
    n = w.shape[0] // head_dim
    return w.reshape(n, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------ locating the files
def _shard_files(model_dir: str) -> list[str]:
    if os.path.isfile(os.path.join(model_dir, _SINGLE)):
        return [os.path.join(model_dir, _SINGLE)]
    found = {}
    for p in glob.glob(os.path.join(model_dir, "consolidated.*.pth")):
        m = _NUMBERED.fullmatch(os.path.basename(p))
        if m:
            found[int(m.group(1))] = p
    if not found:
        return []
    for i in range(max(found) + 1):
        if i not in found:
            raise ChameleonError(f"{os.path.join(model_dir, f'consolidated.{i:02d}.pth')}: shard file missing "
                                 f"(found {sorted(os.path.basename(p) for p in found.values())})")
    return [found[i] for i in sorted(found)]


def _is_model_dir(d: str) -> bool:
    if glob.glob(os.path.join(d, "consolidated*.pth")):
        return True
    # params.json without config.json: an HF directory holds config.json instead.
    return os.path.isfile(os.path.join(d, "params.json")) and not os.path.isfile(os.path.join(d, "config.json"))


def is_meta_release(path) -> bool:
    """True for a release root (``models/`` and ``tokenizer/`` dirs) or a model dir
    (``consolidated*.pth``, or ``params.json`` without an HF ``config.json``)."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        return False
    if _is_model_dir(p):
        return True
    return os.path.isdir(os.path.join(p, "models")) and os.path.isdir(os.path.join(p, "tokenizer"))


def resolve_release(path, model: str | None = None, tokenizer_dir=None) -> tuple[str, str]:
    """(model dir, tokenizer dir) for a release root or model dir; see the module docstring."""
    p = os.path.abspath(os.fspath(path))
    if not os.path.isdir(p):
        raise ChameleonError(f"{p}: no such directory (expected Meta's Chameleon release)")
    if _is_model_dir(p):
        model_dir = p
        candidates = [os.path.join(p, "tokenizer"), os.path.join(os.path.dirname(p), "tokenizer"),
                      os.path.join(os.path.dirname(os.path.dirname(p)), "tokenizer")]
        tok = next((c for c in candidates if os.path.isfile(os.path.join(c, "text_tokenizer.json"))), candidates[-1])
    elif os.path.isdir(os.path.join(p, "models")):
        models = os.path.join(p, "models")
        sizes = sorted(n for n in os.listdir(models) if _is_model_dir(os.path.join(models, n)))
        if model is not None:
            match = [n for n in sizes if n.lower() == str(model).lower()]
            if not match:
                raise ChameleonError(f"{models}: no model {model!r} here (found {sizes})")
            model_dir = os.path.join(models, match[0])
        elif len(sizes) == 1:
            model_dir = os.path.join(models, sizes[0])
        elif not sizes:
            raise ChameleonError(f"{models}: no model directory (params.json + consolidated*.pth) inside")
        else:
            raise ChameleonError(f"{models}: holds several models {sizes}; choose one (model=...)")
        tok = os.path.join(p, "tokenizer")
    else:
        raise ChameleonError(
            f"{p}: not a Meta Chameleon release: expected models/ and tokenizer/, or a model directory "
            "with params.json and consolidated*.pth"
        )
    return model_dir, os.path.abspath(os.fspath(tokenizer_dir)) if tokenizer_dir is not None else tok


# ------------------------------------------------------------------ config pieces
def intermediate_size(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """Meta's FeedForward width: int(8*dim/3), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def read_text_tokenizer(path: str) -> tuple[dict[str, int], dict[str, int | None]]:
    """(vocabulary map with ``<reserved08707>`` renamed ``<image>``, {bos,eos,pad}_token_id)."""
    d = read_json(path, "text tokenizer (text_tokenizer.json)")
    vocab = (d.get("model") or {}).get("vocab") if isinstance(d.get("model"), dict) else None
    if not isinstance(vocab, dict) or not vocab:
        raise ChameleonError(f"{path}: no model.vocab object (expected a Hugging Face tokenizers JSON)")
    vm = {str(k): int(v) for k, v in vocab.items()}
    if META_IMAGE_TOKEN in vm and IMAGE_TOKEN not in vm:
        vm[IMAGE_TOKEN] = vm.pop(META_IMAGE_TOKEN)
    added = {t.get("content"): t.get("id") for t in d.get("added_tokens") or [] if isinstance(t, dict)}
    ids = {}
    for field_name, token in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
        v = added.get(token, vm.get(token))
        ids[field_name] = int(v) if v is not None else None
    return vm, ids


def read_vqgan_yaml(path: str) -> VQConfig:
    """VQConfig from taming's ``model.params.{ddconfig, n_embed, embed_dim}``."""
    import yaml

    if not os.path.isfile(path):
        raise ChameleonError(f"{path}: VQ-GAN config (vqgan.yaml) not found")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        params = doc["model"]["params"]
        dd = params["ddconfig"]
        if dd.get("use_linear_attn"):
            raise ChameleonError(f"{path}: ddconfig.use_linear_attn is not supported")
        kw = dict(
            embed_dim=int(params["embed_dim"]),
            num_embeddings=int(params["n_embed"]),
            double_latent=bool(dd.get("double_z", True)),  # taming's Encoder default
            latent_channels=int(dd["z_channels"]),
            resolution=int(dd["resolution"]),
            in_channels=int(dd["in_channels"]),
            base_channels=int(dd["ch"]),
            channel_multiplier=[int(c) for c in dd.get("ch_mult", (1, 2, 4, 8))],
            num_res_blocks=int(dd["num_res_blocks"]),
            attn_resolutions=[int(r) for r in dd.get("attn_resolutions") or ()],
            dropout=float(dd.get("dropout", 0.0)),
            attn_type=str(dd.get("attn_type", "vanilla")),
        )
    except ChameleonError:
        raise
    except yaml.YAMLError as e:
        raise ChameleonError(f"{path}: not valid YAML ({_first_line(e)})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ChameleonError(
            f"{path}: expected model.params.{{embed_dim, n_embed, ddconfig.{{z_channels, resolution, "
            f"in_channels, ch, ch_mult, num_res_blocks, attn_resolutions}}}} ({type(e).__name__}: {e})"
        ) from None
    return VQConfig.from_dict(kw, source=path)
