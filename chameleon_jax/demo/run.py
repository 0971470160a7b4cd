"""``chameleon-jax demo`` (``make demo``): the shipped model describes, draws and completes text."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from ..vocab import SEP_TOKEN
from . import caption, checkpoint_dir, draw, load_demo, world

DRAW_PROMPTS = ("a red circle on a white background", "an orange triangle on a black background")


def half_blocks(images, width: int = 32) -> str:
    """Images side by side as terminal art: one '▀' per 2 pixel rows (24-bit ANSI colors)."""
    arrays = [np.asarray(im.convert("RGB").resize((width, width))) for im in images]
    rows = []
    for y in range(0, width, 2):
        line = []
        for a in arrays:
            for x in range(width):
                (r1, g1, b1), (r2, g2, b2) = a[y, x], a[y + 1, x]
                line.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m\u2580")
            line.append("\x1b[0m  ")
        rows.append("".join(line))
    return "\n".join(rows) + "\x1b[0m"


def run(out_dir: str = "chameleon-demo", seed: int = 0, preview: bool | None = None) -> int:
    import jax

    t_start = time.perf_counter()
    model, proc = load_demo()
    c = model.config
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
    print(f"loaded the shipped demo model in {time.perf_counter() - t_start:.1f}s: {checkpoint_dir()}")
    print(f"  {n_params:,} params ({c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}; "
          f"VQ-VAE {c.vq_config.resolution}x{c.vq_config.resolution} px -> {c.vq_config.tokens_per_image} tokens "
          f"of {c.vq_config.num_embeddings} codes), trained on the 'shapes' world (chameleon_jax/demo/world.py)")

    t = time.perf_counter()
    images, scenes = world.sample(3, seed=1000 + seed, split="eval")
    captions = caption(images)
    print(f"\n1. captions of three freshly drawn shapes ({time.perf_counter() - t:.1f}s, includes compiling):")
    for scene, text in zip(scenes, captions):
        mark = "ok " if world.parse_caption(text) == scene.attributes else "MISS"
        print(f"  [{mark}] truth: {scene.caption:<42s} model: {text}")

    t = time.perf_counter()
    drawn = draw(list(DRAW_PROMPTS), seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    print(f"\n2. drawn with classifier-free guidance (text 3.0), sampled at temperature 0.7, top-p 0.9 "
          f"({time.perf_counter() - t:.1f}s, includes compiling):")
    for i, (prompt, im) in enumerate(zip(DRAW_PROMPTS, drawn)):
        path = os.path.join(out_dir, f"draw-{i}.png")
        tmp = f"{path}.tmp-{os.getpid()}"
        im.resize((256, 256), resample=0).save(tmp, format="PNG")  # nearest x4: easier to look at
        os.replace(tmp, path)
        print(f"  {path}  prompt: {prompt!r}; the pixel classifier reads: {world.caption_of(*world.classify(im))!r}")
    if preview if preview is not None else sys.stdout.isatty():
        print(half_blocks(drawn))

    t = time.perf_counter()
    batch = proc(text=["a purple"], return_for_text_completion=True)
    # A caption ends where the model was taught to start an image (<sep>, the chat separator).
    new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8,
                         stop_token_ids=[c.vocabulary_map[SEP_TOKEN]])
    print(f"\n3. text completion ({time.perf_counter() - t:.1f}s): 'a purple' -> "
          f"'a purple {proc.batch_decode(new, skip_special_tokens=True)[0].strip()}'")

    print(f"\ndone in {time.perf_counter() - t_start:.1f}s. Next:")
    print("  chameleon-jax generate --mode image --prompt 'a blue square on a gray background' --out square.png")
    print(f"  chameleon-jax generate --prompt '<image>' --image {os.path.join(out_dir, 'draw-0.png')}   # caption it")
    print("  python -c 'import chameleon_jax as cj; print(cj.demo.caption([cj.demo.world.render("
          "cj.demo.world.Scene(\"green\", \"circle\", \"gray\", 10, 10, 40))]))'")
    print("  chameleon-jax train --config configs/train-tiny.json    # fine-tuning, on a tiny random model")
    print("  make test")
    return 0
