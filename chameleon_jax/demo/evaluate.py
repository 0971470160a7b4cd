"""Measure the shipped demo model: ``python -m chameleon_jax.demo.evaluate`` prints every figure.

Captioning (exact color, shape and background on held-out images), drawing (the pixel classifier
of :mod:`.world` on one image per caption, with and without guidance) and VQ reconstruction (PSNR,
and whether the classifier still reads the true caption off ``decode_images(image_tokens(x))``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import caption, draw, load_demo, world

FIELDS = ("color", "shape", "background")


def caption_accuracy(n: int = 200, seed: int = 2024, quantize: str | None = None) -> dict:
    imgs, scenes = world.sample(n, seed=seed, split="eval")
    caps = caption(list(imgs), quantize=quantize)
    parsed = [world.parse_caption(c) for c in caps]
    out = {"exact": float(np.mean([p == s.attributes for p, s in zip(parsed, scenes)]))}
    for i, name in enumerate(FIELDS):
        out[name] = float(np.mean([p is not None and p[i] == s.attributes[i] for p, s in zip(parsed, scenes)]))
    out["examples"] = list(zip([s.caption for s in scenes[:3]], caps[:3]))
    return out


def drawing_accuracy(seed: int = 0, quantize: str | None = None, **guidance) -> dict:
    """Per field, the share of the 54 captions whose drawing the classifier reads back."""
    caps = world.all_captions()
    got = [world.classify(im) for im in draw(caps, seed=seed, quantize=quantize, **guidance)]
    want = [world.parse_caption(c) for c in caps]
    out = {name: float(np.mean([g[i] == w[i] for g, w in zip(got, want)])) for i, name in enumerate(FIELDS)}
    out["all"] = float(np.mean([g == w for g, w in zip(got, want)]))
    return out


def vq_reconstruction(n: int = 200, seed: int = 11) -> dict:
    from .train_vq import meta_pixels, processor_pixels, psnr

    model, _ = load_demo()
    imgs, scenes = world.sample(n, seed=seed, split="eval")
    codes = model.image_tokens(processor_pixels(imgs))
    images = model.decode_images(codes)
    kept = np.mean([world.classify(im) == s.attributes for im, s in zip(images, scenes)])
    return {"psnr_db": psnr(model.decode_pixels(codes), meta_pixels(imgs)), "caption_kept": float(kept),
            "image_size": images[0].size}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="drawing seeds to average over (default 1)")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    print("vq reconstruction (200 held-out):", vq_reconstruction())
    print("captions (200 held-out):", caption_accuracy())
    for label, kw in (("guided (text 3.0, image 1.2)", {}),
                      ("no guidance (1.0, 1.0)", {"guidance_scale_text": 1.0, "guidance_scale_image": 1.0})):
        runs = [drawing_accuracy(seed=s, **kw) for s in range(a.seeds)]
        print(f"drawing, {label}:", {k: round(float(np.mean([r[k] for r in runs])), 3) for k in runs[0]})
    print(f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
