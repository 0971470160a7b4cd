"""The training loss against transformers' ``labels=`` loss and torch autograd; loss options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import chameleon_jax as cj
from chameleon_jax.checkpoint.hf import _to_hf, hf_name
from chameleon_jax.model.loss import model_loss
from conftest import build_hf_model, image_placeholders, random_pixels, text_ids


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A random HF model (GQA, randomized norms) and a left-padded batch of two rows with images."""
    path = tmp_path_factory.mktemp("loss") / "hf"
    hf = build_hf_model(path, seed=1, num_key_value_heads=2)
    hf.set_attn_implementation("eager")
    model = cj.load(path)
    c = hf.config
    rows = [text_ids(5, seed=2) + image_placeholders(c, 1) + text_ids(6, seed=3)[1:],
            text_ids(4, seed=4) + image_placeholders(c, 1) + text_ids(3, seed=5)[1:]
            + image_placeholders(c, 1)]
    t = max(map(len, rows))
    ids = np.full((2, t), c.pad_token_id, np.int64)
    mask = np.zeros((2, t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    labels = np.where(mask > 0, ids, -100)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)  # transformers counts positions from 0 at the pad otherwise
    return hf, model, ids, mask, labels, pos, random_pixels(3, seed=7)


def _hf(hf, ids, mask, labels, pos, pix):
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
              position_ids=torch.tensor(pos), pixel_values=torch.tensor(pix))


def test_loss_matches_transformers(case):
    """transformers' default attention (sdpa) gives a query that sees no key (a left-pad position) a
    zero output; so do we. Every attention implementation of ours must keep this test passing."""
    hf, model, ids, mask, labels, pos, pix = case
    hf.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            ref = _hf(hf, ids, mask, labels, pos, pix).loss.item()
    finally:
        hf.set_attn_implementation("eager")
    ours = model.loss(ids, labels, mask, pix, pos)
    assert abs(ours - ref) <= 1e-5 * abs(ref), (ours, ref)
    assert model.loss(ids, None, mask, pix, pos) == ours  # default labels: input_ids, padding ignored
    # transformers' eager attention instead averages every key, later ones included, for such a
    # query: that only changes the label predicted from the last pad position. Drop it and eager agrees.
    first = mask.argmax(axis=1)
    labels2 = labels.copy()
    labels2[np.arange(2), first] = -100
    with torch.no_grad():
        ref2 = _hf(hf, ids, mask, labels2, pos, pix).loss.item()
    ours2 = model.loss(ids, labels2, mask, pix, pos)
    assert abs(ours2 - ref2) <= 1e-5 * abs(ref2), (ours2, ref2)


def test_gradients_match_torch_autograd(case):
    hf, model, ids, mask, labels, pos, pix = case
    # As above, drop the label predicted from a pad position: transformers' eager attention gives its
    # fully masked row a (numerically meaningless) softmax gradient, ours a zero one.
    labels = labels.copy()
    labels[np.arange(2), mask.argmax(axis=1)] = -100
    hf.zero_grad()
    _hf(hf, ids, mask, labels, pos, pix).loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    def loss(params):
        return model_loss(model.module, params, jnp.asarray(ids, jnp.int32), jnp.asarray(labels, jnp.int32),
                          jnp.asarray(mask, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(pix))[0]

    grads = jax.jit(jax.grad(loss))(model.params)
    for path in ("embed_tokens/embedding", "layers_0/self_attn/q_norm/scale",
                 "layers_1/self_attn/k_norm/bias", "layers_1/mlp/gate_proj/kernel",
                 "layers_0/mlp/down_proj/kernel", "lm_head"):
        g = grads
        for k in path.split("/"):
            g = g[k]
        name, layout = hf_name(path)
        ours = _to_hf(np.asarray(g), layout)
        err = np.abs(ours - ref[name]).max() / np.abs(ref[name]).max()
        assert err < 1e-4, f"{path}: relative gradient error {err:.2e}"
    # the VQ-VAE only yields integer codes: nothing flows back into it
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(grads["vqmodel"]))


def test_loss_options(case):
    hf, model, ids, mask, labels, pos, pix = case
    c = model.config
    logits = model.logits(ids, mask, pix, pos)
    free = model.logits(ids, mask, pix, pos, suppress_image_tokens=False)
    merged = ids.copy()
    merged[ids == c.image_vocab.image_token_id] = model.image_tokens(pix).reshape(-1)

    def ref(lg, lab):
        tgt = np.concatenate([lab[:, 1:], np.full((2, 1), -100)], axis=1)
        ok = tgt != -100
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll = lse - np.take_along_axis(lg, np.where(ok, tgt, 0)[..., None], -1)[..., 0]
        return nll[ok].mean(), (lse[ok] ** 2).mean(), ok.sum()

    full, lse2, n_all = ref(logits, labels)
    assert np.isclose(model.loss(ids, labels, mask, pix, pos), full, rtol=1e-5)
    # z-loss adds z * mean(logsumexp^2)
    assert np.isclose(model.loss(ids, labels, mask, pix, pos, z_loss=1e-2), full + 1e-2 * lse2, rtol=1e-5)
    # text only / image only: the placeholder labels split off; the parts recombine to "all"
    is_img = np.isin(labels, np.append(c.image_vocab.image_token_ids, c.image_vocab.image_token_id))
    text_ref, _, n_text = ref(logits, np.where(is_img, -100, labels))
    img_ref, _, n_img = ref(logits, np.where(is_img, labels, -100))
    text = model.loss(ids, labels, mask, pix, pos, loss_on="text")
    img = model.loss(ids, labels, mask, pix, pos, loss_on="image")
    assert np.isclose(text, text_ref, rtol=1e-5) and np.isclose(img, img_ref, rtol=1e-5)
    assert np.isclose(text * n_text + img * n_img, full * n_all, rtol=1e-5)
    # image targets: no logit masking, placeholder labels become the image tokens
    tgt_ref, _, _ = ref(free, np.where(labels == c.image_vocab.image_token_id, merged, labels))
    assert np.isclose(model.loss(ids, labels, mask, pix, pos, image_targets=True), tgt_ref, rtol=1e-5)
    # loss_mask drops labels: row 1 masked out = row 0 alone
    lm = np.ones_like(ids)
    lm[1] = 0
    row0, _, _ = ref(logits, np.where(lm > 0, labels, -100))
    assert np.isclose(model.loss(ids, labels, mask, pix, pos, loss_mask=lm), row0, rtol=1e-5)
    with pytest.raises(cj.ChameleonError, match="loss_on"):
        model.loss(ids, labels, mask, pix, pos, loss_on="assistant")
    with pytest.raises(cj.ChameleonError, match="labels"):
        model.loss(ids, labels[:, 1:], mask, pix, pos)
