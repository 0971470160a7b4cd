"""Full-size presets through jax.eval_shape: shapes and param counts, no memory."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

import chameleon_jax as cj
from chameleon_jax.model import init_params

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "chameleon_jax", "presets")


def _hf_count(name: str) -> int:
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        d = json.load(f)
    d.pop("model_type")
    d.pop("architectures")
    d["vocabulary_map"] = {}  # transformers needs one; it holds no parameters
    with torch.device("meta"):  # no memory
        model = transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(**d))
    return sum(p.numel() for p in model.parameters())


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,billions", [("chameleon-7b", 7.0), ("chameleon-30b", 34.3)])
def test_preset_param_count_matches_transformers(name, billions):
    """transformers has no VQ-GAN decoder: the decoder-less tree matches it; Meta's decoder adds
    exactly its 39,294,851 params (the same decoder for 7B and 30B)."""
    config = cj.load_preset(name)
    tree = nn.unbox(init_params(config, jax.random.key(0), abstract=True, vq_decoder=False))
    leaves = jax.tree.leaves(tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # abstract: nothing allocated
    ours = _count(tree)
    assert ours == _hf_count(name)
    assert round(ours / 1e9, 1) == billions
    full = nn.unbox(init_params(config, jax.random.key(0), abstract=True))
    assert "decoder" not in tree["vqmodel"] and "decoder" in full["vqmodel"]
    assert _count(full) - ours == _count(full["vqmodel"]["decoder"]) == 39_294_851


def test_7b_shapes():
    config = cj.load_preset("chameleon-7b")
    tree = nn.unbox(init_params(config, jax.random.key(0), abstract=True))
    attn = tree["layers_31"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (4096, 32, 128)
    assert attn["k_norm"]["scale"].shape == (32, 128)
    assert tree["lm_head"].shape == (4096, 65536)
    assert tree["vqmodel"]["quantize"].shape == (8192, 256)
    assert config.vq_config.tokens_per_image == 1024
    c30 = cj.load_preset("chameleon-30b")
    assert c30.head_dim == 128 and c30.num_key_value_heads == 8 and c30.swin_norm
