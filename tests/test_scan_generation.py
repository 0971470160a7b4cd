"""Generation with scanned layers (``load(..., scan_layers=True)``: params and KV cache stacked [L, ...],
one ``nn.scan`` per forward): the same tokens as transformers and as the unrolled model, in text,
image and interleaved mode."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import chameleon_jax as cj
from chameleon_jax import ChameleonError
from chameleon_jax.config import ChameleonConfig
from chameleon_jax.model import init_cache
from conftest import build_hf_model, left_pad, text_ids
from test_generation import NEW, batch_of_three, hf_generate


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("scan") / "hf"
    hf = build_hf_model(d, seed=22, num_key_value_heads=2, swin_norm=True, tie_word_embeddings=True)
    return hf, cj.load(d), cj.load(d, scan_layers=True)


def test_scanned_model_holds_the_stacked_tree(models):
    _, per_layer, scanned = models
    n = scanned.config.num_hidden_layers
    assert scanned.scan_layers and not per_layer.scan_layers
    assert "layers" in scanned.params and not any(k.startswith("layers_") for k in scanned.params)
    kernel = scanned.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.shape == (n,) + per_layer.params["layers_0"]["mlp"]["up_proj"]["kernel"].shape
    np.testing.assert_array_equal(np.asarray(kernel[n - 1]),
                                  np.asarray(per_layer.params[f"layers_{n - 1}"]["mlp"]["up_proj"]["kernel"]))
    cache = init_cache(scanned.config, 2, 16, stacked=True)
    assert set(cache) == {"layers"}
    assert cache["layers"]["k"].shape == (n, 2, scanned.config.num_key_value_heads, 16, scanned.config.head_dim)


def test_scanned_logits_equal_unrolled(models):
    hf, per_layer, scanned = models
    ids, mask, pixels = batch_of_three(hf.config)
    ref = per_layer.logits(ids, mask, pixels)
    got = scanned.logits(ids, mask, pixels)
    finite = ref > -1e30
    assert np.abs(got - ref)[finite].max() <= 1e-6 * np.abs(ref)[finite].max()
    with pytest.raises(ChameleonError, match="output_hidden_states.*scan"):
        scanned.logits(ids, mask, pixels, output_hidden_states=True)


def test_scanned_greedy_generate_matches_transformers(models):
    """Left-padded batch, one prompt with an image, an early stop: the stacked cache through the scan."""
    hf, per_layer, scanned = models
    ids, mask, pixels = batch_of_three(hf.config)
    got = scanned.generate(ids, mask, pixels, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, hf_generate(hf, ids, mask, pixels))
    sampled = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, seed=3)
    np.testing.assert_array_equal(scanned.generate(ids, mask, pixels, **sampled),
                                  per_layer.generate(ids, mask, pixels, **sampled))


def test_scanned_image_and_interleaved_generation_equal_unrolled(models):
    hf, per_layer, scanned = models
    prompts = [text_ids(5, 11), text_ids(8, 12)]
    ids, mask = left_pad(prompts)
    for kw in (dict(do_sample=False), dict(guidance_scale_text=1.0, guidance_scale_image=1.0, do_sample=False)):
        np.testing.assert_array_equal(scanned.generate_image(ids, mask, **kw), per_layer.generate_image(ids, mask, **kw))
    ref = per_layer.image_logits(ids, mask)
    assert np.abs(scanned.image_logits(ids, mask) - ref).max() <= 1e-5 * np.abs(ref).max()
    args = dict(max_new_tokens=10, max_images=1, seed=4)
    a = scanned.generate_interleaved(ids, mask, **args)
    b = per_layer.generate_interleaved(ids, mask, **args)
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert [k for k, _ in ra] == [k for k, _ in rb]
        for (_, x), (_, y) in zip(ra, rb):
            np.testing.assert_array_equal(x, y)


def test_stacked_cache_is_required_and_checked():
    config = ChameleonConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vq_config=None)
    from chameleon_jax.model import Chameleon, cache_mask, causal_mask

    module = Chameleon(config, scan_layers=True)
    ids = jax.numpy.zeros((1, 4), jax.numpy.int32)
    pos = jax.numpy.broadcast_to(jax.numpy.arange(4), (1, 4))
    mask = cache_mask(jax.numpy.ones((1, 8), bool), 0, 4)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, pos, causal_mask(jax.numpy.ones((1, 4)))))
    with pytest.raises(ChameleonError, match="stacked"):
        jax.eval_shape(lambda p: module.apply(p, ids, pos, mask, cache=init_cache(config, 1, 8), cache_index=0),
                       params)
    out = jax.eval_shape(lambda p: module.apply(p, ids, pos, mask, cache=init_cache(config, 1, 8, stacked=True),
                                                cache_index=0), params)
    assert out[1]["layers"]["k"].shape == (2, 1, 2, 8, config.head_dim)


def test_scanned_int8_model_equals_unrolled_int8(tmp_path):
    """Weight-only int8 kernels (QArrays) stack like float ones: the same logits and tokens."""
    build_hf_model(tmp_path, seed=3)
    per, scan = (cj.load(tmp_path, quantize="int8", scan_layers=s) for s in (False, True))
    ids, mask = left_pad([text_ids(6, 1), text_ids(9, 2)])
    ref = per.logits(ids, mask)
    finite = ref > -1e30
    # On CPU each int8 matmul splits its activations into two int8 rows (quant.split_rows): an ulp of
    # difference in a hidden state can move its low row by one step, max|x| / (127 * LO), hence 1e-4.
    assert np.abs(scan.logits(ids, mask) - ref)[finite].max() <= 1e-4 * np.abs(ref)[finite].max()
    np.testing.assert_array_equal(scan.generate(ids, mask, max_new_tokens=8), per.generate(ids, mask, max_new_tokens=8))
