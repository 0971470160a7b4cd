"""Stage 2 of the demo model: train a tiny Chameleon on the shapes world with this project's Trainer.

    python -m chameleon_jax.demo.train_lm [--steps N] [--work runs/demo-lm] [--out chameleon_jax/demo/checkpoint]

Needs stage 1's VQ-VAE (``chameleon_jax/demo/stages/vq.safetensors``, committed; ``train_vq``
makes it). The images are tokenized once up front with that VQ-VAE; the examples are written as
pre-tokenized JSONL records and trained by :class:`chameleon_jax.Trainer` on every token, image
tokens included (``train_image_tokens``). Two directions, half each:

- image -> caption: ``<s> boi {64 image tokens} eoi <sep> {caption} </s>``: what
  :func:`chameleon_jax.demo.caption` prompts with (``"<image>"``, the processor adds the separator).
  Its image part starts ``<s> boi``, exactly the unconditional stream of image mode, so these
  examples are the caption-dropped share that classifier-free guidance needs.
- caption -> image: ``<s> {caption} <sep> boi {64 image tokens} eoi </s>``: what
  :func:`chameleon_jax.demo.draw` prompts with (``generate_image`` appends boi).

The result is written in HF layout (decoder params bfloat16, VQ-VAE float32, tokenizer and
processor files) to ``--out``. Fixed seed; the same command gives the same weights on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np
from flax import linen as nn

from ..config import ChameleonConfig
from ..vocab import BOI_TOKEN, EOI_TOKEN, SEP_TOKEN
from . import CHECKPOINT_DIR, world
from .text import word_tokenizer, word_vocabulary
from .train_vq import VQ_PATH, demo_vq_config, encode_images, load_vq

WORDS = ("a", "an", "on", "background", *world.COLORS, *world.SHAPES, *world.BACKGROUNDS)


def demo_config() -> ChameleonConfig:
    vq = demo_vq_config()
    used = 4 + vq.num_embeddings + 4 + len(WORDS)  # specials, codes, image markers, words
    vocab_size = -(-used // 64) * 64
    return ChameleonConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, vq_config=vq,
        vocabulary_map=word_vocabulary(vq.num_embeddings, WORDS, vocab_size),
    )


def demo_processor(config: ChameleonConfig | None = None):
    from ..processing import ChameleonProcessor, ImageConfig

    config = config or demo_config()
    r = config.vq_config.resolution
    return ChameleonProcessor(word_tokenizer(config.vocabulary_map),
                              image_config=ImageConfig(shortest_edge=r, crop_height=r, crop_width=r),
                              image_seq_length=config.vq_config.tokens_per_image,
                              max_length=config.max_position_embeddings)


def build_records(config: ChameleonConfig, codes: np.ndarray, scenes, seed: int) -> list[dict]:
    """Pre-tokenized training records, half image -> caption, half caption -> image."""
    tok = word_tokenizer(config.vocabulary_map)
    vm = config.vocabulary_map
    vocab = config.image_vocab
    bos, eos = config.bos_token_id, config.eos_token_id
    boi, eoi, sep = vm[BOI_TOKEN], vm[EOI_TOKEN], vm[SEP_TOKEN]
    rng = np.random.default_rng(seed)
    records = []
    for c, scene in zip(codes, scenes):
        image = [boi, *vocab.code_to_bpe[c].tolist(), eoi]
        words = tok.encode(scene.caption, add_special_tokens=False).ids
        if rng.random() < 0.5:
            ids = [bos, *image, sep, *words, eos]
        else:
            ids = [bos, *words, sep, *image, eos]
        records.append({"input_ids": [int(i) for i in ids]})
    return records


def initial_checkpoint(directory: str, config: ChameleonConfig, vq_params, seed: int) -> str:
    """Random decoder params + the trained VQ-VAE, HF layout, with the tokenizer files."""
    from ..checkpoint.hf import save_hf
    from ..model import init_params

    params = nn.unbox(init_params(config, jax.random.key(seed)))
    params = {**params, "vqmodel": jax.tree.map(np.asarray, vq_params)}
    save_hf(params, config, directory, overwrite=True)
    demo_processor(config).save_pretrained(directory)
    return directory


def write_shipped(model_params, config: ChameleonConfig, out: str) -> str:
    """The shipped checkpoint: decoder params in bfloat16 (half the bytes), the VQ-VAE in float32."""
    import jax.numpy as jnp

    from ..checkpoint.hf import save_hf

    params = {k: (jax.tree.map(lambda x: np.asarray(x, np.float32), v) if k == "vqmodel"
                  else jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), v))
              for k, v in model_params.items()}
    tmp = out.rstrip("/") + ".staging"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    demo_processor(config).save_pretrained(os.path.join(tmp, "tok"))
    extra = [os.path.join(tmp, "tok", f) for f in sorted(os.listdir(os.path.join(tmp, "tok")))]
    save_hf(params, config.replace(dtype="bfloat16"), out, overwrite=True, extra_files=extra)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def train(steps: int = 3000, work: str = "runs/demo-lm", out: str | None = CHECKPOINT_DIR, num_examples: int = 60000,
          seed: int = 0, batch_size: int = 32, learning_rate: float = 1e-3, vq_path: str = VQ_PATH, log=print):
    """Run stage 2; returns the trained :class:`chameleon_jax.ChameleonModel` (float32)."""
    from ..training import TrainConfig, Trainer

    t0 = time.time()
    config = demo_config()
    vq_params = load_vq(vq_path)
    images, scenes = world.sample(num_examples, seed=seed + 7)
    codes = encode_images(vq_params, images)
    log(f"tokenized {num_examples} images in {time.time() - t0:.0f} s")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data.jsonl")
    with open(data + ".tmp", "w", encoding="utf-8") as f:
        for rec in build_records(config, codes, scenes, seed):
            f.write(json.dumps(rec) + "\n")
    os.replace(data + ".tmp", data)
    init_dir = initial_checkpoint(os.path.join(work, "init"), config, vq_params, seed)
    tc = TrainConfig(model=init_dir, data=data, output_dir=os.path.join(work, "run"), max_length=80, remat="none",
                     buckets=(80,), batch_size=batch_size, steps=steps, seed=seed, learning_rate=learning_rate,
                     warmup_steps=min(200, steps // 10 + 1), end_lr_ratio=0.05, weight_decay=0.01,
                     train_image_tokens=True, loss_on="all", checkpoint_every=500, keep_checkpoints=1,
                     log_every=50)
    trainer = Trainer(tc, log=log)
    trainer.run()
    model = trainer.model()
    trainer.close()
    if out:
        write_shipped(model.params, config, out)
        log(f"wrote {out} ({time.time() - t0:.0f} s in all)")
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--examples", type=int, default=60000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="runs/demo-lm")
    ap.add_argument("--out", default=CHECKPOINT_DIR)
    ap.add_argument("--vq", default=VQ_PATH)
    a = ap.parse_args(argv)
    train(a.steps, a.work, a.out, a.examples, a.seed, a.batch_size, a.lr, a.vq)


if __name__ == "__main__":
    main()
