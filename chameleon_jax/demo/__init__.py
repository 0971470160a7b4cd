"""The embedded default: a tiny random Chameleon checkpoint built on the spot (no downloads)."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import linen as nn

from ..checkpoint.hf import save_hf
from ..config import ChameleonConfig, VQConfig
from ..vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, SEP_TOKEN, image_code_name

TINY_NUM_CODES = 256


def tiny_vocabulary_map(vocab_size: int = 1024, num_codes: int = TINY_NUM_CODES,
                        shuffle_seed: int | None = None) -> dict[str, int]:
    """Chameleon's layout in miniature: specials, image codes from id 4, boi/eoi/sep/<image>, text.

    ``shuffle_seed``: place the image codes at ids 4.. in a shuffled order (tests use it to catch
    code-order assumptions; the real vocabulary is in order).
    """
    vm = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    codes = np.arange(num_codes)
    if shuffle_seed is not None:
        codes = np.random.default_rng(shuffle_seed).permutation(num_codes)
    for i, code in enumerate(codes):
        vm[image_code_name(int(code))] = 4 + i
    nxt = 4 + num_codes
    for name in (BOI_TOKEN, EOI_TOKEN, SEP_TOKEN, IMAGE_TOKEN):
        vm[name] = nxt
        nxt += 1
    for i in range(nxt, vocab_size):
        vm[f"tok{i}"] = i
    return vm


def tiny_config() -> ChameleonConfig:
    return ChameleonConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        vq_config=VQConfig(
            embed_dim=16,
            num_embeddings=TINY_NUM_CODES,
            latent_channels=16,
            resolution=32,
            base_channels=32,
            channel_multiplier=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(16,),
        ),
        vocabulary_map=tiny_vocabulary_map(),
    )


def build_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, config: ChameleonConfig | None = None) -> str:
    """Write a random HF-layout checkpoint (config.json + model.safetensors) to ``directory``."""
    from ..model import init_params

    config = config or tiny_config()
    params = nn.unbox(init_params(config, jax.random.key(seed)))
    # Norm params init to 1/0; perturb them so the demo exercises every tensor.
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype)
        if any("norm" in str(getattr(k, "key", "")) for k in path)
        else x,
        params,
    )
    save_hf(params, config, os.fspath(directory))
    return os.fspath(directory)
