"""Shared setup of the fine-tuning tests: a tiny model, its tokenizer, images and JSONL data."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import linen as nn
from PIL import Image

import chameleon_jax as cj
from chameleon_jax.config import ChameleonConfig, VQConfig
from chameleon_jax.model import init_params
from chameleon_jax.training.config import TrainConfig
from tokenizer_utils import build_test_tokenizer

IMAGE_TOKENS = 16  # 8x8 px images, 2x downsampling -> 4x4 codes


def tiny_model_config(vm: dict) -> ChameleonConfig:
    return ChameleonConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=vm["<s>"], eos_token_id=vm["</s>"],
        pad_token_id=vm["<pad>"],
        vq_config=VQConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=8, base_channels=32,
                           channel_multiplier=(1, 2), num_res_blocks=1),
        vocabulary_map=vm,
    )


def tiny_model(vm: dict, seed: int = 0) -> cj.ChameleonModel:
    config = tiny_model_config(vm)
    params = nn.unbox(init_params(config, jax.random.key(seed)))
    rng = np.random.default_rng(seed)  # norms init to 1/0: perturb them so their gradients matter
    def perturb(path, x):
        return x + rng.normal(0, 0.1, x.shape).astype(x.dtype) if "norm" in jax.tree_util.keystr(path) else x

    params = jax.tree_util.tree_map_with_path(perturb, params)
    return cj.ChameleonModel(config, params)


def write_images(directory, n: int, seed: int = 0) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(os.path.join(directory, name))
        names.append(f"images/{name}")
    return names


RECORDS = [
    lambda img: {"text": "hello world <image> the cat is in the image .", "images": [img]},
    lambda img: {"messages": [{"role": "system", "content": "describe"},
                              {"role": "user", "content": "what is this ?", "images": [img]},
                              {"role": "assistant", "content": "a dog and a cat"}]},
    lambda img: {"text": "compare two images <image> and this one", "images": [img]},
    lambda img: {"messages": [{"role": "user", "content": "<image> tell me about the color"},
                              {"role": "assistant", "content": "the color of the picture is one"},
                              {"role": "user", "content": "and the dog ?"},
                              {"role": "assistant", "content": "hello dog"}], "id": "extra keys are ignored"},
]


def write_records(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_data(root, n_examples: int, seed: int = 0, name: str = "data.jsonl") -> str:
    """``n_examples`` records (cycling through RECORDS' four forms), each with its own image."""
    root = str(root)
    imgs = write_images(os.path.join(root, "images"), n_examples, seed)
    records = []
    for i in range(n_examples):
        rec = RECORDS[i % len(RECORDS)](imgs[i])
        if i % len(RECORDS) == 3:  # the chat record places its image inline
            rec["messages"][0]["images"] = [imgs[i]]
        records.append(rec)
    return write_records(os.path.join(root, name), records)


def setup(root, n_examples: int = 4, seed: int = 0):
    """-> (model, processor, data path) under ``root``."""
    tok_dir = os.path.join(str(root), "tok")
    vm = build_test_tokenizer(tok_dir, num_image_codes=64, vocab_size=512, image_seq_length=IMAGE_TOKENS,
                              image_size=8)
    data = write_data(root, n_examples, seed)
    return tiny_model(vm, seed), cj.ChameleonProcessor.from_pretrained(tok_dir), data


def train_config(root, data, **kw) -> TrainConfig:
    d = dict(model="unused", data=data, output_dir=os.path.join(str(root), "out"), max_length=128,
             buckets=[128], batch_size=2, grad_accum=1, steps=6, learning_rate=3e-3, warmup_steps=1,
             mesh={"data": 1, "fsdp": 1, "tensor": 1}, checkpoint_every=100, log_every=1,
             remat="none")
    d.update(kw)
    return TrainConfig.from_dict(d)
