"""``chameleon-jax convert`` / ``export``: HF or Meta release -> Orbax directory, and back to HF.

Streaming: tensors are read one at a time, converted, and written one param group (a
layer, the embeddings, ...) at a time, so peak memory is about one group, never the model.
Atomic: everything is written into a temp dir beside DST and renamed at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable

import numpy as np

from . import hf, orbax
from .killpoint import point
from .outdir import check_output
from ..config import ChameleonConfig
from ..errors import ChameleonError

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", None: None}


def _progress_printer(stream=sys.stderr) -> Callable[[str, int, int], None]:
    start = time.perf_counter()

    def show(label: str, done: int, total: int):
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else ""
        stream.write(f"\r[{bar}] {done}/{total} groups  {time.perf_counter() - start:6.1f}s  {label:<14s}{end}")
        stream.flush()

    return show


def open_source(src: str, model_size: str | None = None):
    """(kind, config, tensor source, tokenizer writer) for an HF directory or a Meta release."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise ChameleonError(f"{src}: no such file or directory")
    if orbax.is_orbax_dir(src):
        raise ChameleonError(f"{src}: already a converted (Orbax) checkpoint; use `chameleon-jax export` to go to HF")
    if os.path.isfile(os.path.join(src, "config.json")):
        config = ChameleonConfig.from_json_file(os.path.join(src, "config.json"))
        source = hf.HFSource(src)

        def write_tokenizer(dst: str):
            for name in orbax.TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy2(os.path.join(src, name), os.path.join(dst, name))

        return "hf", config, source, write_tokenizer
    from .meta import MetaRelease
    from .meta_files import is_meta_release

    if is_meta_release(src):
        release = MetaRelease(src, model=model_size)

        def write_tokenizer(dst: str):
            from ..processing import ChameleonProcessor

            ChameleonProcessor.from_pretrained(release.tokenizer_path).save_pretrained(dst)

        return "meta", release.config, release, write_tokenizer
    raise ChameleonError(
        f"{src}: neither an HF Chameleon directory (config.json + *.safetensors) nor Meta's original "
        "release (models/<size>/params.json + consolidated*.pth, tokenizer/)"
    )


def convert(src: str, dst: str, dtype: str | None = None, overwrite: bool = False, progress: bool = True,
            model_size: str | None = None, quantize: str | None = None) -> tuple[str, list[str]]:
    """Convert ``src`` (HF dir or Meta release) into an Orbax directory ``dst``.

    ``dtype``: cast params ("bfloat16", "float32"); None keeps the source's dtype.
    ``model_size``: which of ``models/*`` of a Meta release root holding several ("7b", "30b").
    ``quantize``: "int8" / "int4" stores the decoder's projections and the LM head weight-only
    quantized (:mod:`chameleon_jax.quant`): each is quantized as it is read (after the ``dtype``
    cast) and only its integers and scales are written. ``chameleon_jax.load(dst)`` then gives the
    quantized params directly, equal to ``load(src, quantize=...)``; ``export`` of such a directory
    is refused (the float weights are gone).
    Returns (source kind, notes), the notes saying what the conversion decided (e.g. Meta's
    per-shard norm copies averaged, no vqgan.ckpt so no image tokenizer).
    """
    from .. import quant

    if dtype not in _DTYPES:
        raise ChameleonError(f"dtype: {dtype!r} is not supported; expected bfloat16, float32 or float16")
    mode = quant.check_mode(quantize)
    check_output(dst, [("source", src)])
    kind, config, source, write_tokenizer = open_source(src, model_size)
    # A Meta model directory finds its tokenizer dir outside itself: neither may be touched either.
    check_output(dst, [("source's model directory", getattr(source, "model_dir", None)),
                       ("source's tokenizer directory", getattr(source, "tokenizer_dir", None))])
    if dtype is not None:
        config = config.replace(dtype=dtype)
    hf.plan_params(source, config)  # fail on bad input before creating anything
    extra = source.extra_tensors() if hasattr(source, "extra_tensors") else ()
    with hf.atomic_dir(dst, overwrite) as tmp:
        orbax.write_orbax(tmp, config, source, dtype, extra, _progress_printer() if progress else None, quantize=mode)
        write_tokenizer(tmp)
        point("convert: tokenizer files written")
    notes = list(getattr(source, "notes", []))
    if kind == "hf" and not os.path.isfile(os.path.join(src, "tokenizer.json")):
        notes.append(f"warning: {src} holds no tokenizer (tokenizer.json), so neither does {dst}: "
                     f"`chameleon-jax generate --model {dst}` and ChameleonProcessor.from_pretrained({dst!r}) "
                     "need the tokenizer files (tokenizer.json, tokenizer_config.json, ...) copied into it")
    if config.vq_config is None:
        notes.append("the result has no VQ-VAE: it cannot take images")
    if mode is not None:
        notes.append(f"weights stored {mode}-quantized (decoder projections and LM head; embeddings, norms and "
                     f"the VQ-VAE in float): load({dst!r}) gives the quantized model; it cannot be exported to HF")
    return kind, notes


def export(src: str, dst: str, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Orbax directory (from ``convert``) -> HF safetensors directory transformers loads.

    Params keep their stored dtype. The VQ-GAN decoder, when the checkpoint has one, is written
    as ``model.vqmodel.decoder.*`` (transformers loads the result and reports those tensors as
    unused). Other ``extra_tensors`` have no place in the HF layout and are not exported.
    A quantized directory (``convert --quantize``) is refused: dequantizing would write
    approximate weights under the original names, which is not what an HF export promises.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise ChameleonError(f"{src}: no such directory (expected a directory written by `chameleon-jax convert`)")
    check_output(dst, [("source", src)])
    if not orbax.is_orbax_dir(src):
        raise ChameleonError(f"{src}: not a converted checkpoint (no {orbax.MARKER}); expected `chameleon-jax convert` output")
    qinfo = orbax.stored_quantization(src)
    if qinfo is not None:
        raise ChameleonError(
            f"{src}: holds {qinfo['mode']}-quantized weights (converted with --quantize {qinfo['mode']}; see "
            f"{orbax.QUANT_FILE}); their float values are gone, so it cannot be exported to HF. Export a "
            "float conversion instead (`chameleon-jax convert SRC DST` without --quantize)")
    config = ChameleonConfig.from_json_file(os.path.join(src, "config.json"))
    params = orbax.read_orbax(src, config)
    extra = [os.path.join(src, n) for n in orbax.TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    config = config.replace(dtype=str(np.dtype(next(iter(_leaves(params))).dtype)))
    hf.save_hf(params, config, dst, max_shard_bytes=max_shard_bytes, overwrite=overwrite, extra_files=extra)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
