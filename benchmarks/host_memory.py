"""CPU speed with and without ``chameleon_jax.reuse_freed_memory()`` (glibc heap settings), both sides.

The setting is process-wide and must precede JAX's start, so each measurement is a child process:
train_step.py (our train step and transformers', same process) and decode.py's image-prompt case
(prefill of a 256x256 image + 32 text tokens, and the VQ-VAE encode alone, both sides), each run
alternately without and with ``--reuse-freed-memory``. Medians over the rounds of each child's own
medians are printed, with the speed-up the setting gives each side and our ratio to transformers in
each mode. The setting applies to the whole process, so transformers runs under it too.

    python benchmarks/host_memory.py              # 3 rounds
    python benchmarks/host_memory.py --rounds 5 --reps 6
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# (case, script args, {name: regex of one ms figure in its output})
CASES = (
    ("train step", ["train_step.py"],
     {"ours": r"^ours: .*?\((\d+) ms/step", "transformers": r"^transformers: .*?\((\d+) ms/step"}),
    ("image prompt prefill", ["decode.py", "--batches"],
     {"ours": r"chameleon-jax:\s+([\d.]+) ms", "transformers": r"transformers:\s+([\d.]+) ms \(range"}),
    ("VQ-VAE encode 256x256", ["decode.py", "--batches"],
     {"ours": r"VQ-VAE encoding: .*chameleon-jax ([\d.]+) ms",
      "transformers": r"VQ-VAE encoding: transformers ([\d.]+) ms"}),
)


def child(script_args: list[str], reps: int, reuse: bool) -> str:
    cmd = [sys.executable, os.path.join(HERE, script_args[0]), *script_args[1:], "--reps", str(reps)]
    out = subprocess.run(cmd + (["--reuse-freed-memory"] if reuse else []), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternating child runs per mode")
    p.add_argument("--reps", type=int, default=5, help="timed runs per side inside each child")
    args = p.parse_args(argv)
    runs = {}  # (script, reuse) -> list of outputs
    for _ in range(args.rounds):
        for reuse in (False, True):
            for script in {tuple(c[1]) for c in CASES}:
                runs.setdefault((script, reuse), []).append(child(list(script), args.reps, reuse))
                print(".", end="", flush=True)
    print()
    for case, script, patterns in CASES:
        ms = {}
        for reuse in (False, True):
            for side, pattern in patterns.items():
                vals = [float(re.search(pattern, out, re.M).group(1)) for out in runs[tuple(script), reuse]]
                ms[side, reuse] = statistics.median(vals)
        print(f"\n{case} (ms, median of {args.rounds} child runs):")
        for side in patterns:
            print(f"  {side:13s} default {ms[side, False]:8.1f}   reuse_freed_memory {ms[side, True]:8.1f}   "
                  f"speed-up {ms[side, False] / ms[side, True]:.2f}x")
        print(f"  ours / transformers: {ms['transformers', False] / ms['ours', False]:.2f}x default, "
              f"{ms['transformers', True] / ms['ours', True]:.2f}x with the setting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
