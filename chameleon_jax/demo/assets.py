"""Demo training assets: a tiny random model with a word-level tokenizer, small PNGs and a JSONL
(used by ``chameleon-jax train --config configs/train-tiny.json`` and the tests)."""

from __future__ import annotations

import json
import os

import numpy as np

from . import build_tiny_checkpoint, tiny_config

_DEMO_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
                "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (250, 250, 250),
                "black": (15, 15, 15)}
_DEMO_WORDS = ("a an the image picture photo of on with background square what color is this it shows "
               "describe ? . , : USER ASSISTANT small big in center").split()


def build_demo_assets(directory: str, num_examples: int = 16, seed: int = 0) -> dict[str, str]:
    """A tiny random model (demo.tiny_config) with a matching word-level tokenizer, small PNGs and a
    JSONL of text and chat records, in ``directory``: ``model/`` (checkpoint + tokenizer),
    ``images/``, ``data.jsonl``. Returns their paths. Idempotent: an existing complete set is kept."""
    from PIL import Image

    from ..processing import ChameleonProcessor, ImageConfig
    from .text import word_tokenizer, word_vocabulary

    directory = os.path.abspath(directory)
    paths = {"model": os.path.join(directory, "model"), "data": os.path.join(directory, "data.jsonl"),
             "images": os.path.join(directory, "images")}
    done = os.path.join(directory, ".complete")
    if os.path.isfile(done):
        return paths
    config = tiny_config()
    vq = config.vq_config
    vm = word_vocabulary(vq.num_embeddings, list(_DEMO_COLORS) + list(_DEMO_WORDS), config.vocab_size)
    config = config.replace(vocabulary_map=vm)
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(paths["model"]):
        import shutil

        shutil.rmtree(paths["model"])
    build_tiny_checkpoint(paths["model"], seed=seed, config=config)
    tok = word_tokenizer(vm)
    r = vq.resolution
    proc = ChameleonProcessor(tok, image_config=ImageConfig(shortest_edge=r, crop_height=r, crop_width=r),
                              image_seq_length=vq.tokens_per_image)
    proc.save_pretrained(paths["model"])
    os.makedirs(paths["images"], exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_DEMO_COLORS)
    records = []
    for i in range(num_examples):
        fg, bg = rng.choice(len(names), 2, replace=False)
        arr = np.zeros((r, r, 3), np.uint8)
        arr[:] = _DEMO_COLORS[names[bg]]
        lo, hi = r // 4, 3 * r // 4
        arr[lo:hi, lo:hi] = _DEMO_COLORS[names[fg]]
        fname = f"img{i:03d}.png"
        Image.fromarray(arr).save(os.path.join(paths["images"], fname))
        rel = f"images/{fname}"
        if i % 2:
            records.append({"messages": [
                {"role": "user", "content": "what color is the square ?", "images": [rel]},
                {"role": "assistant",
                 "content": f"the square is {names[fg]} on a {names[bg]} background ."}]})
        else:
            records.append({"text": f"<image> a {names[fg]} square on a {names[bg]} background .",
                            "images": [rel]})
    with open(paths["data"], "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    open(done, "w").close()
    return paths
