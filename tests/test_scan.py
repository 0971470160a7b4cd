"""Scanned decoder layers (nn.scan, params stacked [L, ...]) equal the unrolled model; tree conversion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from chameleon_jax.config import ChameleonConfig
from chameleon_jax.model import init_params
from chameleon_jax.model.decoder import Chameleon, causal_mask, default_positions, stack_layers, unstack_layers
from chameleon_jax.model.loss import model_loss
from conftest import make_vocabulary_map


def test_scanned_logits_and_grads_equal_unrolled():
    config = ChameleonConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, vq_config=None,
                             vocabulary_map=make_vocabulary_map(256))
    params = nn.unbox(init_params(config, jax.random.key(0)))
    stacked = stack_layers(params, 3)
    assert "layers_0" not in stacked and stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 32, 64)
    # the scanned module's own init makes the same tree as the conversion
    ids = jnp.asarray(np.random.default_rng(0).integers(72, 256, (2, 9)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :2].set(0)
    scanned = Chameleon(config, remat_policy="full", scan_layers=True)
    own = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.key(0), ids, default_positions(mask),
                                                      causal_mask(mask))["params"]))
    assert jax.tree.structure(own) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda a, b: a.shape == b.shape, own, stacked)
    back = unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, params))

    def logits(m, p):
        return m.apply({"params": p}, ids, default_positions(mask), causal_mask(mask))[0]

    ref = jax.jit(lambda p: logits(Chameleon(config), p))(params)
    out = jax.jit(lambda p: logits(scanned, p))(stacked)
    finite = ref > -1e30
    assert float(jnp.abs(out - ref)[finite].max()) <= 1e-6 * float(jnp.abs(ref)[finite].max())

    labels = jnp.where(mask > 0, ids, -100)
    g_ref = jax.jit(jax.grad(lambda p: model_loss(Chameleon(config), p, ids, labels, mask)[0]))(params)
    g = jax.jit(jax.grad(lambda p: model_loss(scanned, p, ids, labels, mask)[0]))(stacked)
    for a, b in zip(jax.tree.leaves(unstack_layers(g)), jax.tree.leaves(g_ref)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(b).max()), 1e-30) + 1e-12


def test_stack_and_unstack_name_what_is_wrong():
    import pytest

    from chameleon_jax.errors import ChameleonError

    layer = {"mlp": {"up_proj": {"kernel": np.zeros((2, 3), np.float32)}}}
    tree = {"layers_0": layer, "layers_1": layer, "norm": {"scale": np.ones(2, np.float32)}}
    assert unstack_layers(stack_layers(tree, 2))["layers_1"]["mlp"]["up_proj"]["kernel"].shape == (2, 3)
    with pytest.raises(ChameleonError, match=r"missing \['layers_2'\]"):
        stack_layers(tree, 3)
    with pytest.raises(ChameleonError, match="unexpected"):
        stack_layers(tree, 1)
    with pytest.raises(ChameleonError, match="layers_1 holds other params"):
        stack_layers({**tree, "layers_1": {"mlp": {}}}, 2)
    with pytest.raises(ChameleonError, match="layers_1's param shapes"):
        stack_layers({**tree, "layers_1": {"mlp": {"up_proj": {"kernel": np.zeros((3, 3))}}}}, 2)
    with pytest.raises(ChameleonError, match="no 'layers' entry"):
        unstack_layers(tree)
    with pytest.raises(ChameleonError, match="disagree"):
        unstack_layers({"layers": {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))}})
