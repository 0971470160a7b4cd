"""Peak memory of `chameleon-jax convert` on a generated multi-GB checkpoint shaped like 7B.

Writes an HF-layout checkpoint with the 7B preset's shapes but fewer layers (default 4: ~5.6 GB
fp32, largest tensor 1 GiB: the embeddings and the LM head), converts it in a child process and
reports that child's peak RSS beyond a child that only imports the same modules (interpreter +
jax + orbax). Goal: below 3 x largest tensor + 1 GiB.

    python benchmarks/convert_memory.py [--layers 4] [--workdir /tmp/x] [--keep]
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

CHILD_IMPORTS = "import jax, orbax.checkpoint, chameleon_jax, chameleon_jax.convert"


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
    from chameleon_jax.checkpoint import _hf_shape, atomic_dir, expected_params, hf_name, write_hf_tensors

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="convert-mem-")
    src, dst = os.path.join(work, "hf"), os.path.join(work, "orbax")
    try:
        t = time.perf_counter()
        total, largest = build_checkpoint(src, args.layers)
        print(f"source: 7B shapes, {args.layers} layers, {total / 2**30:.2f} GiB fp32, largest tensor "
              f"{largest / 2**30:.2f} GiB (built in {time.perf_counter() - t:.0f}s)")
        base, _ = _peak_rss_of(CHILD_IMPORTS)
        peak, secs = _peak_rss_of(
            CHILD_IMPORTS + f"\nchameleon_jax.convert.convert({src!r}, {dst!r}, progress=False)"
        )
        beyond = peak - base
        limit = 3 * largest + 2**30
        print(f"interpreter + imports: {base / 2**30:.2f} GiB peak RSS")
        print(f"convert: {secs:.1f}s, peak RSS {peak / 2**30:.2f} GiB, {beyond / 2**30:.2f} GiB beyond the interpreter")
        print(f"goal: < 3 x largest + 1 GiB = {limit / 2**30:.2f} GiB -> {'met' if beyond < limit else 'NOT met'} "
              f"(ratio to the checkpoint size: {beyond / total:.2f})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
