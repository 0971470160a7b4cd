"""Per-layer parity with transformers' modules, so a failure points at the layer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import chameleon_jax as cj
from chameleon_jax.model import causal_mask, decoder, vqvae
from conftest import build_hf_model, random_pixels, text_ids


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("layers") / "hf"
    hf = build_hf_model(d, seed=21, num_key_value_heads=2, swin_norm=True, model_parallel_size=2,
                        attention_bias=True)
    return hf, cj.load(d)


def _close(ours, ref, tol=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < tol, f"relative error {err:.2e}"


def _t(x):
    return torch.tensor(np.asarray(x))


def test_rmsnorm(pair):
    hf, model = pair
    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    ours = decoder.RMSNorm(1e-5).apply({"params": model.params["layers_0"]["input_layernorm"]}, x)
    with torch.no_grad():
        ref = hf.model.layers[0].input_layernorm(_t(x)).numpy()
    _close(ours, ref)


@pytest.mark.parametrize("which,heads", [("q_norm", 4), ("k_norm", 2)])
def test_qk_layernorm_per_head(pair, which, heads):
    hf, model = pair
    p = model.params["layers_0"]["self_attn"][which]
    # randomized per-head params really are distinct across heads (model_parallel_size=2 repeats)
    assert not np.allclose(p["scale"][0], p["scale"][-1])
    x = np.random.default_rng(1).normal(size=(2, 5, heads, 16)).astype(np.float32) * 3 + 1
    axes = ("heads", "head_dim")
    ours = decoder.HeadLayerNorm(heads, 16, 1e-5, axes).apply({"params": p}, x)
    with torch.no_grad():
        ref = getattr(hf.model.layers[0].self_attn, which)(_t(x.reshape(-1, heads, 16))).numpy()
    _close(ours, ref.reshape(x.shape))


def test_rope_matches_transformers(pair):
    hf, model = pair
    from transformers.models.chameleon.modeling_chameleon import apply_rotary_pos_emb

    rng = np.random.default_rng(2)
    q = rng.normal(size=(2, 6, 4, 16)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])
    inv = decoder.rope_inv_freq(model.config, jnp.asarray(pos))
    ours = decoder.apply_rope(jnp.asarray(q), jnp.asarray(pos), inv)
    with torch.no_grad():
        cos, sin = hf.model.rotary_emb(_t(q), _t(pos))
        ref, _ = apply_rotary_pos_emb(_t(q).transpose(1, 2), _t(q).transpose(1, 2), cos, sin)
    _close(ours, ref.transpose(1, 2).numpy())


def test_mlp(pair):
    hf, model = pair
    x = np.random.default_rng(3).normal(size=(2, 5, 64)).astype(np.float32)
    ours = decoder.MLP(model.config).apply({"params": model.params["layers_1"]["mlp"]}, x)
    with torch.no_grad():
        ref = hf.model.layers[1].mlp(_t(x)).numpy()
    _close(ours, ref)


def test_each_decoder_layer(pair):
    """Feed transformers' hidden state into each of our layers; compare with its next one."""
    hf, model = pair
    ids = np.array([text_ids(9, seed=4)])
    with torch.no_grad():
        out = hf(input_ids=_t(ids), output_hidden_states=True)
    states = [h.numpy() for h in out.hidden_states]
    c = model.config
    pos = jnp.arange(ids.shape[1])[None]
    mask = causal_mask(jnp.ones(ids.shape, jnp.int32))
    inv = decoder.rope_inv_freq(c, pos)
    for i in range(c.num_hidden_layers):
        y, _ = decoder.DecoderLayer(c).apply({"params": model.params[f"layers_{i}"]}, states[i], pos, mask, inv)
        if i + 1 < c.num_hidden_layers:
            _close(y, states[i + 1], 1e-5)
        else:  # transformers reports the last layer after the final norm
            final = decoder.RMSNorm(c.rms_norm_eps).apply({"params": model.params["norm"]}, y)
            _close(final, states[-1], 1e-5)


# ------------------------------------------------------------------ VQ-VAE encoder blocks
def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _vq(model):
    return model.params["vqmodel"]


def test_vq_resnet_block_with_shortcut(pair):
    hf, model = pair
    x = np.random.default_rng(5).normal(size=(2, 32, 8, 8)).astype(np.float32)
    p = _vq(model)["encoder"]["down_1"]["block_0"]  # 32 -> 64 channels: has nin_shortcut
    assert "nin_shortcut" in p
    ours = vqvae.ResnetBlock(64).apply({"params": p}, _nhwc(x))
    with torch.no_grad():
        ref = hf.model.vqmodel.encoder.down[1].block[0](_t(x)).numpy()
    _close(ours, _nhwc(ref))


def test_vq_attention_block(pair):
    hf, model = pair
    x = np.random.default_rng(6).normal(size=(2, 64, 8, 8)).astype(np.float32)
    ours = vqvae.AttnBlock().apply({"params": _vq(model)["encoder"]["down_1"]["attn_0"]}, _nhwc(x))
    with torch.no_grad():
        ref = hf.model.vqmodel.encoder.down[1].attn[0](_t(x)).numpy()
    _close(ours, _nhwc(ref))


def test_vq_downsample(pair):
    hf, model = pair
    x = np.random.default_rng(7).normal(size=(2, 32, 16, 16)).astype(np.float32)
    ours = vqvae.Downsample().apply({"params": _vq(model)["encoder"]["down_0"]["downsample"]}, _nhwc(x))
    with torch.no_grad():
        ref = hf.model.vqmodel.encoder.down[0].downsample(_t(x)).numpy()
    _close(ours, _nhwc(ref))


def test_vq_encoder_and_quantizer(pair):
    hf, model = pair
    pixels = random_pixels(3, seed=8)
    c = model.config.vq_config
    ours = vqvae.Encoder(c).apply({"params": _vq(model)["encoder"]}, _nhwc(pixels))
    with torch.no_grad():
        ref = hf.model.vqmodel.encoder(_t(pixels)).numpy()
        ref_codes = hf.model.vqmodel.encode(_t(pixels)).image_tokens.numpy()
    _close(ours, _nhwc(ref), 1e-5)
    codes = vqvae.VQVAE(c).apply({"params": _vq(model)}, pixels, method=vqvae.VQVAE.encode)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref_codes)
    # the image-code -> BPE table is the one transformers uses
    bpe = np.asarray(model.image_tokens(pixels))
    np.testing.assert_array_equal(bpe.reshape(-1), hf.model.vocabulary_mapping.convert_img2bpe(_t(ref_codes)).numpy())


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_query_with_no_visible_key_gets_zero_attention_output(pair, impl):
    """A left-pad query sees no key: its attention output is zero (transformers' default sdpa), so
    o_proj gives just its bias, not an average over every key, later ones included."""
    _, model = pair
    c = model.config
    x = np.random.default_rng(1).normal(size=(1, 4, c.hidden_size)).astype(np.float32)
    pad = np.array([[0, 0, 1, 1]])
    mask = causal_mask(jnp.asarray(pad))
    pos = jnp.asarray([[0, 0, 0, 1]])
    inv_freq = decoder.rope_inv_freq(c, pos)
    params = {"params": model.params["layers_0"]["self_attn"]}
    out, _ = decoder.Attention(c.replace(attention_impl=impl)).apply(params, x, pos, mask, inv_freq)
    bias = np.asarray(model.params["layers_0"]["self_attn"]["o_proj"]["bias"])
    np.testing.assert_allclose(np.asarray(out)[0, :2], np.broadcast_to(bias, (2, c.hidden_size)), atol=1e-6)
    assert np.abs(np.asarray(out)[0, 2:] - bias).max() > 1e-3  # real tokens do attend


def test_attention_implementations_agree_with_transformers(pair, tmp_path):
    """jax.nn.dot_product_attention ("xla") gives transformers' logits on a left-padded GQA batch, like
    the einsum path; an unknown implementation is named before any weight is read."""
    from conftest import left_pad

    hf, model = pair
    ids, mask = left_pad([text_ids(9, 1), text_ids(5, 2), text_ids(7, 3)])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    xla = cj.api.ChameleonModel(model.config.replace(attention_impl="xla"), model.params)
    real = mask.astype(bool)
    for m in (model, xla):
        _close(m.logits(ids, mask)[real], ref[real])
    with pytest.raises(cj.errors.ChameleonError, match="attention_impl 'nope'"):
        cj.load(tmp_path, attention_impl="nope")


def test_dot_product_attention_compiles_for_tpu():
    """The "xla" implementation lowers for a TPU v5e-8 slice (a small decode step, fsdp x tensor)."""
    pytest.importorskip("libtpu", reason="needs the tpu-aot extra (libtpu) to compile for a TPU topology")
    from chameleon_jax.plan import plan

    cfg = cj.load_preset("chameleon-7b").replace(hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                                                 attention_impl="xla")
    r = plan(cfg, "v5e:2x4", {"fsdp": 4, "tensor": 2}, task="generate", seq=128, batch=4)
    assert r.fits and r.bytes_accessed > 0
