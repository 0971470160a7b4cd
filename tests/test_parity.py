"""End-to-end parity: our logits vs transformers' ChameleonForConditionalGeneration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import chameleon_jax as cj
from conftest import build_hf_model, image_placeholders, random_pixels, text_ids

TOL = 1e-4  # max |ours - ref| over text-token columns, relative to max |ref|


def _compare(ours: np.ndarray, ref: np.ndarray, image_ids: np.ndarray, valid=None):
    """Text columns within TOL (relative to the largest |logit|); image columns both at fp32 min."""
    text = ~np.isin(np.arange(ref.shape[-1]), image_ids)
    if valid is not None:
        ours, ref = ours[valid], ref[valid]
    err = np.abs(ours[..., text] - ref[..., text]).max() / np.abs(ref[..., text]).max()
    assert err < TOL, f"relative logit error {err:.2e} >= {TOL}"
    assert np.all(ours[..., ~text] == np.finfo(np.float32).min)
    assert np.all(ref[..., ~text] == np.finfo(np.float32).min)
    return err


def _hf_logits(model, ids, mask=None, pixels=None, positions=None):
    kw = {"input_ids": torch.tensor(ids)}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if pixels is not None:
        kw["pixel_values"] = torch.tensor(pixels)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


CONFIGS = {
    "mha": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1, "num_hidden_layers": 1},
    "swin_mp2": {"swin_norm": True, "model_parallel_size": 2, "num_key_value_heads": 2},
    "rope_linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}},
    "tied": {"tie_word_embeddings": True},
    "biases": {"attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_text_logits_match(tmp_path, name):
    hf = build_hf_model(tmp_path / name, seed=1, **CONFIGS[name])
    model = cj.load(tmp_path / name)
    ids = np.array([text_ids(24, seed=2)])
    _compare(model.logits(ids), _hf_logits(hf, ids), model.config.image_vocab.image_token_ids)


def test_rope_dynamic_beyond_max_positions(tmp_path):
    # Dynamic NTK scaling only changes anything past max_position_embeddings: go past it.
    hf = build_hf_model(
        tmp_path / "dyn", seed=3, max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    model = cj.load(tmp_path / "dyn")
    ids = np.array([text_ids(40, seed=4)])
    ours = model.logits(ids)
    _compare(ours, _hf_logits(hf, ids), model.config.image_vocab.image_token_ids)
    # and the scaling really is in effect: below the threshold (a larger max) the logits differ.
    plain = cj.ChameleonModel(model.config.replace(max_position_embeddings=64), model.params)
    assert np.abs(plain.logits(ids)[0, -1] - ours[0, -1]).max() > 1e-3


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_prompt_logits_and_codes(tmp_path, n_images):
    hf = build_hf_model(tmp_path / "img", seed=5, num_key_value_heads=2)
    model = cj.load(tmp_path / "img")
    pixels = random_pixels(n_images, seed=n_images)
    ids = text_ids(6, seed=6)
    for k in range(n_images):
        ids += image_placeholders(hf.config, 1) + text_ids(5, seed=10 + k)[1:]
    ids = np.array([ids])
    with torch.no_grad():
        ref_codes = hf.model.get_image_tokens(torch.tensor(pixels)).numpy()
    np.testing.assert_array_equal(model.image_tokens(pixels), ref_codes)
    _compare(model.logits(ids, pixel_values=pixels), _hf_logits(hf, ids, pixels=pixels),
             model.config.image_vocab.image_token_ids)


def test_images_across_batch_rows(tmp_path):
    # Two rows, one image each: placeholders are filled in row-major order like masked_scatter.
    hf = build_hf_model(tmp_path / "img2", seed=7)
    model = cj.load(tmp_path / "img2")
    pixels = random_pixels(2, seed=8)
    rows = [text_ids(4, seed=s) + image_placeholders(hf.config, 1) + text_ids(4, seed=s + 1)[1:] for s in (1, 3)]
    ids = np.array(rows)
    _compare(model.logits(ids, pixel_values=pixels), _hf_logits(hf, ids, pixels=pixels),
             model.config.image_vocab.image_token_ids)


def test_left_padded_batch(tmp_path):
    hf = build_hf_model(tmp_path / "pad", seed=9, num_key_value_heads=2, swin_norm=True)
    model = cj.load(tmp_path / "pad")
    lengths = [20, 13, 7]
    t = max(lengths)
    ids = np.full((3, t), 3, np.int64)
    mask = np.zeros((3, t), np.int64)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = text_ids(n, seed=20 + r)
        mask[r, t - n:] = 1
    ours = model.logits(ids, attention_mask=mask)
    # transformers' generate passes these positions; its bare forward would count from the pad.
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 1)
    ref = _hf_logits(hf, ids, mask=mask, positions=positions)
    _compare(ours, ref, model.config.image_vocab.image_token_ids, valid=mask.astype(bool))
    # Left padding changes nothing: each row alone gives the same logits.
    for r, n in enumerate(lengths):
        alone = model.logits(ids[r:r + 1, t - n:])
        np.testing.assert_allclose(ours[r, t - n:], alone[0], rtol=0, atol=1e-4 * np.abs(alone).max())


def test_explicit_position_ids(tmp_path):
    hf = build_hf_model(tmp_path / "pos", seed=11)
    model = cj.load(tmp_path / "pos")
    ids = np.array([text_ids(10, seed=12)])
    pos = np.arange(5, 15)[None]
    _compare(model.logits(ids, position_ids=pos), _hf_logits(hf, ids, positions=pos),
             model.config.image_vocab.image_token_ids)


def test_sharded_index_checkpoint(tmp_path):
    hf = build_hf_model(tmp_path / "src", seed=13)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = cj.load(tmp_path / "sharded")
    ids = np.array([text_ids(12, seed=14)])
    _compare(model.logits(ids), _hf_logits(hf, ids), model.config.image_vocab.image_token_ids)


def test_bfloat16_loading(tmp_path):
    hf = build_hf_model(tmp_path / "bf", seed=15)
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    kept = cj.load(tmp_path / "bf16", dtype=None)
    assert all(x.dtype == np.dtype("bfloat16") for x in __import__("jax").tree.leaves(kept.params))
    assert kept.config.dtype == "bfloat16"
    ids = np.array([text_ids(12, seed=16)])
    import transformers

    # fp32 reference on the bf16-rounded weights (fresh load: .float() would keep bf16-rounded RoPE buffers).
    ref_model = transformers.ChameleonForConditionalGeneration.from_pretrained(
        str(tmp_path / "bf16"), dtype=torch.float32
    ).eval()
    ref = _hf_logits(ref_model, ids)
    image_ids = kept.config.image_vocab.image_token_ids
    text = ~np.isin(np.arange(ref.shape[-1]), image_ids)
    # bf16 compute: looser bound, but the same model (fp32 upcast of the same weights is exact).
    err = np.abs(kept.logits(ids)[..., text] - ref[..., text]).max() / np.abs(ref[..., text]).max()
    assert err < 5e-2
    up = cj.load(tmp_path / "bf16", dtype="float32")
    _compare(up.logits(ids), ref, image_ids)


def test_output_hidden_states_match(tmp_path):
    """logits(..., output_hidden_states=True): transformers' tuple (embeddings with the image tokens
    merged, each layer's output but the last, the final-norm output), on a left-padded batch."""
    hf = build_hf_model(tmp_path / "hs", seed=17, num_hidden_layers=3, num_key_value_heads=2)
    model = cj.load(tmp_path / "hs")
    rows = [text_ids(4, seed=18) + image_placeholders(hf.config, 1) + text_ids(5, seed=19)[1:], text_ids(9, seed=20)]
    t = max(map(len, rows))
    ids = np.full((2, t), 3, np.int64)
    mask = np.zeros((2, t), np.int64)
    for r, row in enumerate(rows):
        ids[r, t - len(row):], mask[r, t - len(row):] = row, 1
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    pixels = random_pixels(1, seed=21)
    logits, hidden = model.logits(ids, mask, pixels, pos, output_hidden_states=True)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                 position_ids=torch.tensor(pos), output_hidden_states=True)
    _compare(logits, out.logits.numpy(), model.config.image_vocab.image_token_ids, valid=mask.astype(bool))
    ref = [h.numpy() for h in out.hidden_states]
    assert len(hidden) == len(ref) == 4
    for i, (ours, want) in enumerate(zip(hidden, ref)):
        assert ours.shape == want.shape and ours.dtype == np.float32
        err = np.abs(ours - want).max() / np.abs(want).max()
        assert err < 1e-4, f"hidden_states[{i}]: relative error {err:.2e}"
