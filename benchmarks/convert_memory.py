"""Peak memory of `chameleon-jax convert` on a generated multi-GB checkpoint shaped like 7B.

Writes an HF-layout checkpoint with the 7B preset's shapes but fewer layers (default 4: ~5.6 GB
fp32, largest tensor 1 GiB: the embeddings and the LM head), converts it in a child process and
reports that child's peak RSS beyond a child that only imports the same modules (interpreter +
jax + orbax). Goal: below 3 x largest tensor + 1 GiB.

    python benchmarks/convert_memory.py [--source hf|meta] [--layers 4] [--workdir /tmp/x] [--keep]

``--source meta`` writes Meta's original layout instead (models/7b/consolidated.pth with Meta names
and interleaved RoPE order, params.json, tokenizer/text_tokenizer.json; no vqgan.ckpt, so the text
model is converted), read through torch.load(mmap=True).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD_IMPORTS = "import jax, orbax.checkpoint, chameleon_jax, chameleon_jax.checkpoint.convert"


def _peak_rss_of(code: str) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a fresh python running ``code``."""
    t = time.perf_counter()
    out = subprocess.run(
        # VmHWM (this process image's peak RSS): ru_maxrss would carry the parent's peak across exec.
        [sys.executable, "-c", code + "\nprint('MAXRSS', [l.split()[1] for l in open('/proc/self/status')"
         " if l.startswith('VmHWM')][0])"],
        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    kb = int(out.stdout.rsplit("MAXRSS", 1)[1])
    return kb * 1024.0, time.perf_counter() - t


def build_checkpoint(directory: str, layers: int) -> tuple[int, int]:
    """An HF dir with 7B shapes and ``layers`` layers; returns (total bytes, largest tensor bytes)."""
    from chameleon_jax import load_preset
    from chameleon_jax.checkpoint.hf import _hf_shape, atomic_dir, expected_params, hf_name, write_hf_tensors

    config = load_preset("chameleon-7b").replace(num_hidden_layers=layers)
    shapes = expected_params(config)

    def tensors():
        for path, sds in shapes.items():
            name, layout = hf_name(path)
            shape = _hf_shape(tuple(sds.shape), layout)
            a = np.empty(shape, np.float32)
            a.reshape(-1)[:] = np.float32(0.01)  # touch every page: real data on disk
            yield name, a

    with atomic_dir(directory) as tmp:
        write_hf_tensors(tmp, tensors(), max_shard_bytes=2 * 2**30)
        config.to_json_file(os.path.join(tmp, "config.json"))
    sizes = [int(np.prod(s.shape)) * 4 for s in shapes.values()]
    return sum(sizes), max(sizes)


def build_meta_release(root: str, layers: int) -> tuple[int, int]:
    """Meta's layout with 7B shapes and ``layers`` layers; returns (total bytes, largest tensor bytes)."""
    import json

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from meta_fake import write_text_tokenizer

    from chameleon_jax.demo import tiny_vocabulary_map

    dim, heads, vocab, ffn = 4096, 32, 65536, 11008
    hd = dim // heads
    shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + f"attention.{w}.weight": (dim, dim) for w in ("wq", "wk", "wv", "wo")})
        shapes.update({p + f"attention.{q}_normalization.{w}": (hd,) for q in "qk" for w in ("weight", "bias")})
        shapes.update({p + "feed_forward.w1.weight": (ffn, dim), p + "feed_forward.w3.weight": (ffn, dim),
                       p + "feed_forward.w2.weight": (dim, ffn), p + "attention_norm.weight": (dim,),
                       p + "ffn_norm.weight": (dim,)})
    model_dir = os.path.join(root, "models", "7b")
    os.makedirs(model_dir)
    os.makedirs(os.path.join(root, "tokenizer"))
    torch.save({k: torch.full(v, 0.01) for k, v in shapes.items()}, os.path.join(model_dir, "consolidated.pth"))
    with open(os.path.join(model_dir, "params.json"), "w") as f:
        json.dump({"dim": dim, "n_layers": layers, "n_heads": heads, "vocab_size": vocab, "multiple_of": 256,
                   "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 10000.0,
                   "qk_normalization": True, "swin_norm": False}, f)
    write_text_tokenizer(os.path.join(root, "tokenizer", "text_tokenizer.json"), tiny_vocabulary_map(vocab, 8192))
    sizes = [4 * int(np.prod(v)) for v in shapes.values()]
    return sum(sizes), max(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["hf", "meta"], default="hf")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="convert-mem-")
    src, dst = os.path.join(work, "hf"), os.path.join(work, "orbax")
    try:
        t = time.perf_counter()
        build = build_checkpoint if args.source == "hf" else build_meta_release
        total, largest = build(src, args.layers)
        print(f"source ({args.source}): 7B shapes, {args.layers} layers, {total / 2**30:.2f} GiB fp32, largest tensor "
              f"{largest / 2**30:.2f} GiB (built in {time.perf_counter() - t:.0f}s)")
        imports = CHILD_IMPORTS + (", torch" if args.source == "meta" else "")
        base, _ = _peak_rss_of(imports)
        peak, secs = _peak_rss_of(
            imports + f"\nchameleon_jax.checkpoint.convert.convert({src!r}, {dst!r}, progress=False)"
        )
        beyond = peak - base
        limit = 3 * largest + 2**30
        print(f"interpreter + imports ({imports[7:]}): {base / 2**30:.2f} GiB peak RSS")
        print(f"convert: {secs:.1f}s, peak RSS {peak / 2**30:.2f} GiB, {beyond / 2**30:.2f} GiB beyond the interpreter")
        print(f"goal: < 3 x largest + 1 GiB = {limit / 2**30:.2f} GiB -> {'met' if beyond < limit else 'NOT met'} "
              f"(ratio to the checkpoint size: {beyond / total:.2f})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
