"""Preprocessing speed: chameleon_jax.ChameleonProcessor vs transformers' ChameleonProcessor.

Generates a batch of JPEG photos-like images (default 16 at 1024x768) in a temp dir, then times, in
one run and on the same inputs:
  * full call from file paths: 16 x "<image>" prompt -> input_ids + pixel_values (decode included)
  * pixels only, from already-decoded PIL images (resize / crop / normalize only)
Prints the median of several runs for each side and the ratio (transformers / ours; > 1 = ours faster),
after checking that both produce the same numbers.

    python benchmarks/preprocess.py [--num-images 16] [--width 1024] [--height 768] [--repeats 5]
                                    [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tokenizer_utils import build_test_tokenizer  # noqa: E402

from chameleon_jax.processing import ChameleonProcessor  # noqa: E402


def make_jpegs(directory: Path, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """Smooth gradients plus noise: decodes like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.2, 2.0, 3)
        base = np.stack([np.sin(xx / (97 * a)), np.cos(yy / (61 * b)), np.sin((xx + yy) / (131 * c))], -1)
        img = ((base + 1) * 110 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        path = directory / f"img{i:02d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    ap.add_argument("--height", type=int, default=768, help="image height in pixels (default 768)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side; the median is reported")
    ap.add_argument("--threads", type=int, default=None,
                    help="worker threads for our image preprocessing (default: min(8, CPU cores))")
    args = ap.parse_args(argv)

    import transformers
    from transformers import ChameleonProcessor as HFChameleonProcessor

    transformers.logging.set_verbosity_error()  # its "sequence longer than model_max_length" notice

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_test_tokenizer(tmp / "proc")  # default Chameleon settings: 512x512 crop, 1024 tokens per image
        paths = make_jpegs(tmp, args.num_images, args.width, args.height)
        ours = ChameleonProcessor.from_pretrained(tmp / "proc", num_threads=args.threads)
        theirs = HFChameleonProcessor.from_pretrained(tmp / "proc")
        prompt = "Compare these images: " + "<image>" * args.num_images

        def run_ours():
            return ours(prompt, paths)

        def run_theirs():
            return theirs(text=prompt, images=paths, padding=True, padding_side="left", return_tensors="np")

        a, b = run_ours(), run_theirs()
        assert np.array_equal(a["input_ids"], b["input_ids"]), "input_ids differ"
        err = float(np.abs(a["pixel_values"] - b["pixel_values"]).max())
        assert err <= 1e-6, f"pixel_values differ by {err}"

        decoded = [Image.open(p).convert("RGB") for p in paths]

        def pix_ours():
            return ours.preprocess_images(decoded)

        def pix_theirs():
            return theirs.image_processor(decoded, return_tensors="np")["pixel_values"]

        assert float(np.abs(pix_ours() - pix_theirs()).max()) <= 1e-6

        print(f"{args.num_images} JPEG images {args.width}x{args.height} -> {a['pixel_values'].shape}, "
              f"{os.cpu_count()} CPU cores, ours uses {ours.num_threads} threads; "
              f"median of {args.repeats} runs")
        for label, f_ours, f_theirs in (("full call from paths", run_ours, run_theirs),
                                        ("pixels from PIL images", pix_ours, pix_theirs)):
            t_ours, t_theirs = median_time(f_ours, args.repeats), median_time(f_theirs, args.repeats)
            print(f"{label:24s} chameleon_jax {t_ours * 1e3:8.1f} ms   "
                  f"transformers {t_theirs * 1e3:8.1f} ms   "
                  f"ratio (transformers/ours) {t_theirs / t_ours:5.2f}x")


if __name__ == "__main__":
    main()
