"""Processor output fed to our model equals transformers' processor output fed to its model."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image

import chameleon_jax as cj
from conftest import build_hf_model
from tokenizer_utils import build_test_tokenizer


def test_processor_to_logits_matches_transformers(tmp_path):
    tok_dir = tmp_path / "ckpt"
    vm = build_test_tokenizer(tok_dir, num_image_codes=64, vocab_size=448, image_seq_length=64, image_size=16,
                              shuffle_seed=3)
    hf = build_hf_model(tok_dir, seed=61, vocab_size=448, vocabulary_map=vm, num_key_value_heads=2,
                        pad_token_id=vm["<pad>"], bos_token_id=vm["<s>"], eos_token_id=vm["</s>"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)),
              Image.fromarray(rng.integers(0, 255, (20, 20, 4), np.uint8), "RGBA"),
              Image.fromarray(rng.integers(0, 255, (50, 17), np.uint8), "L")]
    texts = ["What is in<image>this picture?", "hello world<image> and <image>!"]

    ref_proc = transformers.ChameleonProcessor.from_pretrained(str(tok_dir))
    ref_in = ref_proc(text=texts, images=images, padding=True, return_tensors="pt")
    proc = cj.ChameleonProcessor.from_pretrained(tok_dir, max_length=hf.config.max_position_embeddings)
    ours_in = proc(text=texts, images=images, padding=True)
    np.testing.assert_array_equal(ours_in["input_ids"], ref_in["input_ids"].numpy())

    mask = ref_in["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as transformers' generate; our default
    with torch.no_grad():
        ref = hf(**ref_in, position_ids=positions).logits.numpy()
    model = cj.load(tok_dir)
    ours = model.logits(ours_in["input_ids"], ours_in["attention_mask"], ours_in["pixel_values"])
    valid = ours_in["attention_mask"].astype(bool)
    text = ~np.isin(np.arange(ref.shape[-1]), model.config.image_vocab.image_token_ids)
    err = np.abs(ours[valid][:, text] - ref[valid][:, text]).max() / np.abs(ref[valid][:, text]).max()
    assert err < 1e-4
    with torch.no_grad():
        ref_codes = hf.model.get_image_tokens(ref_in["pixel_values"]).numpy()
    np.testing.assert_array_equal(model.image_tokens(ours_in["pixel_values"]), ref_codes)
