"""The shapes world, the demo training stages (smoke), and what the shipped demo model can do."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import chameleon_jax as cj
from chameleon_jax.demo import evaluate, world


# ------------------------------------------------------------------ the world
def test_world_grammar_and_split():
    caps = world.all_captions()
    assert len(caps) == len(set(caps)) == 54
    assert "an orange square on a gray background" in caps and "a red circle on a white background" in caps
    assert all(world.parse_caption(c) is not None for c in caps)
    for bad in ("a orange square on a gray background", "an red square on a gray background",
                "a red hexagon on a gray background", "a red square on a gray", ""):
        assert world.parse_caption(bad) is None
    _, train = world.sample(300, seed=0)
    _, held = world.sample(300, seed=0, split="eval")
    assert not any(world.is_held_out(s.side, s.x) for s in train)
    assert all(world.is_held_out(s.side, s.x) for s in held)
    for s in train + held:
        assert world.MIN_SIDE <= s.side <= world.MAX_SIDE and s.x + s.side <= 64 and s.y + s.side <= 64


def test_world_rendering_matches_its_contract():
    img = world.render(world.Scene("orange", "square", "gray", x=5, y=7, side=30))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (128, 128, 128) and tuple(img[7 + 15, 5 + 15]) == (240, 140, 30)
    assert (img == (240, 140, 30)).all(-1).sum() == 30 * 30
    for shape, fill in world.FILL.items():
        m = world.shape_mask(shape, 8, 8, 48)
        assert abs(m.sum() / 48**2 - fill) < 0.03, shape
    tri = world.shape_mask("triangle", 0, 0, 40)
    assert tri[1].sum() < 4 and tri[39].sum() > 36  # apex up


def test_classifier_reads_rendered_scenes_exactly():
    imgs, scenes = world.sample(200, seed=3, split="eval")
    assert all(world.classify(im) == s.attributes for im, s in zip(imgs, scenes))


# ------------------------------------------------------------------ pre-tokenized training records
def test_pretokenized_records(tmp_path):
    from chameleon_jax.demo.train_lm import demo_processor
    from chameleon_jax.training.data import read_jsonl

    proc = demo_processor()
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 5, 6, 2]}) + "\n"
                    + json.dumps({"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}) + "\n")
    ds = read_jsonl(str(path), proc, max_length=8)
    assert ds.examples[0].ids.tolist() == [1, 5, 6, 2] and ds.examples[0].labels.tolist() == [1, 5, 6, 2]
    assert ds.examples[1].labels.tolist() == [-100, 5, 6] and ds.examples[1].images == ()
    image_id = proc.image_token_id
    for rec, want in [({"input_ids": []}, "non-empty list of integers"),
                      ({"input_ids": [1, "a"]}, "non-empty list of integers"),
                      ({"input_ids": [1, 2], "labels": [1]}, "has 1 entries"),
                      ({"input_ids": [1, 2], "labels": [1, -5]}, "token ids or -100"),
                      ({"input_ids": [1, 9999]}, rf"must lie in \[0, {proc.tokenizer.get_vocab_size()}\)"),
                      ({"input_ids": [1, image_id]}, "<image> placeholder"),
                      ({"input_ids": [1, 2], "images": ["x.png"]}, 'drop "images"'),
                      ({"input_ids": [1, 2], "text": "a"}, "more than one of"),
                      ({"input_ids": list(range(1, 12))}, "longer than max_length 8")]:
        path.write_text(json.dumps(rec) + "\n")
        with pytest.raises(cj.ChameleonError, match=f"{path}:1: .*{want}"):
            read_jsonl(str(path), proc, max_length=8)


# ------------------------------------------------------------------ training stages (smoke: CI never retrains)
def test_training_stages_smoke(tmp_path):
    from chameleon_jax.demo import train_lm, train_vq

    vq_file = tmp_path / "vq.safetensors"
    logs = []
    train_vq.train(steps=3, batch=2, out=str(vq_file), log=logs.append)
    assert vq_file.is_file() and "vq step     2" in logs[-2]
    model = train_lm.train(steps=2, work=str(tmp_path / "lm"), out=str(tmp_path / "ship"), num_examples=64,
                           batch_size=4, vq_path=str(vq_file), log=logs.append)
    assert any(line.startswith("step 2/2") for line in logs), logs
    shipped = cj.load(str(tmp_path / "ship"))
    assert shipped.config.vq_config == train_vq.demo_vq_config()
    # The shipped copy is the trained model with decoder params rounded to bfloat16.
    x = np.array([[1, 4, 5, 6]], np.int32)
    np.testing.assert_allclose(shipped.logits(x), model.logits(x), atol=0.05)


# ------------------------------------------------------------------ the shipped model
def test_shipped_checkpoint_loads_like_any_checkpoint():
    path = cj.demo.checkpoint_dir()
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size <= 15 * 2**20, size
    model = cj.load(path)
    proc = cj.ChameleonProcessor.from_pretrained(path)
    assert model.config.vq_config.tokens_per_image == proc.image_seq_length == 64
    assert "vqmodel" in model.params and "decoder" in model.params["vqmodel"]


def test_vq_reconstruction_keeps_the_caption():
    r = evaluate.vq_reconstruction(200)
    assert r["image_size"] == (64, 64)
    assert r["caption_kept"] >= 0.95, r


def test_captions_of_held_out_images():
    r = evaluate.caption_accuracy(200)
    assert r["exact"] >= 0.90, r


def test_drawings_match_their_captions():
    acc = evaluate.drawing_accuracy()
    assert acc["color"] >= 0.90 and acc["background"] >= 0.90 and acc["shape"] >= 0.70, acc


def test_draw_and_caption_inputs():
    assert cj.demo.caption([]) == [] and cj.demo.draw([]) == []
    (im,) = cj.demo.draw("a blue square on a white background", seed=1)
    assert im.size == (64, 64)


def test_transformers_loads_the_shipped_checkpoint_and_agrees():
    """The shipped directory is a plain HF Chameleon checkpoint: transformers' processor and model
    read it (ignoring the VQ-GAN decoder tensors) and give our logits on a captioning prompt."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = cj.demo.checkpoint_dir()
    model, proc = cj.demo.load_demo()
    imgs, _ = world.sample(2, seed=5, split="eval")
    from PIL import Image

    pil = [Image.fromarray(im) for im in imgs]
    ours_in = proc(text=["<image>", "<image> a"], images=pil, padding=True)
    hf_proc = transformers.ChameleonProcessor.from_pretrained(path)
    hf_in = hf_proc(text=["<image>", "<image> a"], images=pil, padding=True, return_tensors="pt")
    np.testing.assert_array_equal(hf_in["input_ids"].numpy(), ours_in["input_ids"])
    np.testing.assert_allclose(hf_in["pixel_values"].numpy(), ours_in["pixel_values"], atol=1e-6)
    hf = transformers.ChameleonForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**hf_in).logits.numpy()
    ours = model.logits(ours_in["input_ids"], ours_in["attention_mask"], ours_in["pixel_values"])
    real = ours_in["attention_mask"].astype(bool)
    text_cols = ref[real].max(0) > -1e30  # image-token columns are the dtype minimum in both
    err = np.abs(ours[real][:, text_cols] - ref[real][:, text_cols]).max() / np.abs(ref[real][:, text_cols]).max()
    assert err < 1e-4, err
