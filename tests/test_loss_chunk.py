"""Chunked cross-entropy (LM head + loss over sequence chunks) equals the one-pass loss and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from chameleon_jax.config import ChameleonConfig
from chameleon_jax.errors import ChameleonError
from chameleon_jax.model import init_params
from chameleon_jax.model.decoder import Chameleon
from chameleon_jax.model.loss import model_loss
from chameleon_jax.training.config import TrainConfig
from conftest import make_vocabulary_map


@pytest.fixture(scope="module")
def tiny():
    vm = make_vocabulary_map(256)
    config = ChameleonConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, vocabulary_map=vm)
    params = nn.unbox(init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    ids = rng.integers(4 + 64 + 4, 256, (2, 13))  # text tokens only
    ids = ids.astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = np.where(mask > 0, ids, -100)
    labels[0, 5] = -100  # an ignored target inside a row
    return Chameleon(config), params, ids, mask, labels


@pytest.mark.parametrize("chunk,image_targets", [(4, False), (5, True)])
def test_chunked_loss_and_grads_equal_unchunked(tiny, chunk, image_targets):
    module, params, ids, mask, labels = tiny

    def loss(p, c):
        return model_loss(module, p, ids, labels, mask, image_targets=image_targets, z_loss=1e-3,
                          loss_chunk=c)[0]

    fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref, g_ref = fn(params, 0)
    out, g = fn(params, chunk)
    assert np.isfinite(float(ref))
    assert abs(float(out) - float(ref)) <= 1e-6 * abs(float(ref))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert float(jnp.abs(a - b).max()) <= 1e-6 * max(float(jnp.abs(b).max()), 1e-30) + 1e-12


def test_bad_loss_chunk():
    with pytest.raises(ChameleonError, match="loss_chunk"):
        TrainConfig(demo=True, loss_chunk=-1)
