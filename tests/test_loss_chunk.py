"""The loss's fast paths equal the plain ones, values and gradients: chunked cross-entropy (LM head + loss over
sequence chunks), the head over text columns only (suppressed image columns left out), and causal attention
blocks (each query block against the keys up to its end)."""

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
from chameleon_jax.model.decoder import causal_mask, default_positions, head_logits
from chameleon_jax.model.loss import _target_sums, head_sums, loss_sums, model_loss
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


def test_text_column_head_equals_masked_logits(tiny):
    """head_sums leaves the image columns out of the matmul: the same sums and gradients as the full logits
    with those columns at the fp32 min, an image-token target included (it scores the fp32 min both ways)."""
    module, _, _, _, _ = tiny
    config = module.config
    image_ids = config.image_vocab.image_token_ids
    assert image_ids.min() > 0 and image_ids.max() < config.vocab_size - 1  # text columns on both sides
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 9, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 256)), jnp.float32)
    targets = rng.integers(72, 256, (2, 9))
    targets[0, 2], targets[1, 4] = -100, 1  # ignored; a text id below the image block
    with_image = targets.copy()
    with_image[1, 6] = int(image_ids[10])
    for t in (jnp.asarray(targets), jnp.asarray(with_image)):
        fast, ref = head_sums(config, h, w, t), _target_sums(head_logits(config, h, w), t)
        for a, b in zip(fast, ref):
            assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b)), (fast, ref)
    assert float(head_sums(config, h, w, jnp.asarray(with_image))[0]) > 1e38  # the image target's fp32-min score

    def total(fn):
        return lambda h, w: fn(h, w)[0] + 1e-3 * fn(h, w)[1]

    t = jnp.asarray(targets)
    g_fast = jax.grad(total(lambda h, w: head_sums(config, h, w, t)), argnums=(0, 1))(h, w)
    g_ref = jax.grad(total(lambda h, w: _target_sums(head_logits(config, h, w), t)), argnums=(0, 1))(h, w)
    for a, b in zip(g_fast, g_ref):
        assert float(jnp.abs(a - b).max()) <= 1e-6 * float(jnp.abs(b).max())
    assert float(jnp.abs(g_fast[1][:, image_ids]).max()) == 0.0  # no gradient reaches a suppressed column


@pytest.mark.parametrize("block,attention_chunk", [(4, 0), (5, 3)])
def test_causal_blocks_equal_whole_attention(tiny, block, attention_chunk):
    """causal_block (13 queries in blocks of 4, or of 3 with attention_chunk's remat; GQA; a left-padded row
    whose first queries see no key): logits and gradients equal the whole attention's."""
    module, params, ids, mask, labels = tiny
    blocked = module.clone(causal_block=block, attention_chunk=attention_chunk,
                           remat_policy="full" if attention_chunk else "none")

    def loss_and_logits(m, p):
        logits = m.apply({"params": p}, ids, default_positions(mask), causal_mask(mask))[0]
        nll, z, count = loss_sums(logits, labels)
        return (nll + 1e-3 * z) / count, logits

    fn = jax.jit(jax.value_and_grad(loss_and_logits, argnums=1, has_aux=True), static_argnums=0)
    (ref, ref_logits), g_ref = fn(module, params)
    (out, logits), g = fn(blocked, params)
    assert np.isfinite(float(ref)) and abs(float(out) - float(ref)) <= 1e-6 * abs(float(ref))
    finite = ref_logits > -1e30
    assert float(jnp.abs(logits - ref_logits)[finite].max()) <= 1e-6 * float(jnp.abs(ref_logits)[finite].max())
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(b).max()), 1e-30) + 1e-12


def test_text_columns_only_where_the_head_is_whole_along_the_vocabulary(tiny):
    """A tensor-parallel head (vocabulary split over devices) keeps the full matmul + select: the unaligned
    column slice would reshard it every step; fsdp rows or one device allow the slice."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from chameleon_jax.model.loss import text_columns_ok
    from chameleon_jax.sharding import make_mesh

    config = tiny[0].config
    mesh = make_mesh(1, 2, 2, devices=jax.devices()[:4])
    assert text_columns_ok(config, {})
    assert text_columns_ok(config, {"lm_head": NamedSharding(mesh, P("fsdp", None))})
    assert not text_columns_ok(config, {"lm_head": NamedSharding(mesh, P(None, "tensor"))})
    tied = config.replace(tie_word_embeddings=True)  # the head is the embeddings [V, D]
    assert not text_columns_ok(tied, {"embed_tokens": {"embedding": NamedSharding(mesh, P("tensor", None))}})
    assert text_columns_ok(tied, {"embed_tokens": {"embedding": NamedSharding(mesh, P(None, "fsdp"))}})
    sharded = jax.device_put(np.zeros((32, 256), np.float32), NamedSharding(mesh, P(None, "tensor")))
    assert not text_columns_ok(config, {"lm_head": sharded})  # params (arrays) work as well as shardings
