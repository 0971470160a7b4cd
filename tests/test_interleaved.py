"""generate_interleaved: text mode until the model opens an image, image mode for it, then text again.

Checked on the shipped demo model, which was trained on "caption <sep> image" sequences, so it opens
an image by itself after completing a caption. Each segment must equal what the plain text and
image calls give on the same sequence (the loop adds no numerics of its own).
"""

from __future__ import annotations

import numpy as np
import pytest

import chameleon_jax as cj
from chameleon_jax.demo import world
from chameleon_jax.vocab import BOI_TOKEN, EOI_TOKEN

GREEDY_IMAGE = {"do_sample": False}


@pytest.fixture(scope="module")
def demo():
    return cj.demo.load_demo()


def _prompt(proc, texts):
    b = proc(text=texts, return_for_text_completion=True, padding=True)
    return b["input_ids"], b["attention_mask"]


def test_segments_equal_the_plain_text_and_image_calls(demo):
    model, proc = demo
    vm = model.config.vocabulary_map
    boi, eoi = vm[BOI_TOKEN], vm[EOI_TOKEN]
    ids, mask = _prompt(proc, ["a green", "an orange triangle"])
    rows = model.generate_interleaved(ids, mask, max_new_tokens=24, image=GREEDY_IMAGE)
    for r, segments in enumerate(rows):
        context = ids[r][mask[r] > 0]
        assert [kind for kind, _ in segments][:2] == ["text", "image"], segments
        words = model.generate(context[None], max_new_tokens=24, stop_token_ids=[boi])[0]
        cut = int(np.flatnonzero(words == boi)[0])
        np.testing.assert_array_equal(segments[0][1], words[:cut])
        context = np.concatenate([context, words[:cut], [boi]])
        picture = model.generate_image(context[None], do_sample=False)[0]
        np.testing.assert_array_equal(segments[1][1], picture)
        # and the picture is what the words say
        text = proc.decode(context[:-1], skip_special_tokens=True).strip()  # prompt + words, <sep> dropped
        drawn = world.caption_of(*world.classify(model.decode_images(picture[None])[0]))
        assert world.parse_caption(text) == world.parse_caption(drawn) is not None, (text, drawn)
        # what follows the image: text mode on everything so far (the demo model ends with </s>)
        after = model.generate(np.concatenate([context, picture, [eoi]])[None], max_new_tokens=4,
                               stop_token_ids=[boi])[0]
        stop = int(np.flatnonzero(np.isin(after, [boi, *model.config.eos_token_ids]))[0])
        tail = segments[2:]
        if stop:
            assert tail and np.array_equal(tail[0][1], after[:stop])
        else:
            assert tail == []


def test_limits_end_the_row_cleanly(demo):
    model, proc = demo
    ids, mask = _prompt(proc, ["a green"])
    (no_image,) = model.generate_interleaved(ids, mask, max_new_tokens=24, max_images=0)
    assert [kind for kind, _ in no_image] == ["text"]
    (short,) = model.generate_interleaved(ids, mask, max_new_tokens=3)
    assert [kind for kind, _ in short] == ["text"] and short[0][1].shape == (3,)


def test_image_prompts_take_their_vq_tokens(demo):
    model, proc = demo
    images, _ = world.sample(2, seed=3, split="eval")
    b = proc(text=["<image>"] * 2, images=list(images), padding=True)
    rows = model.generate_interleaved(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens=12)
    want = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], max_new_tokens=12)
    for segments, ref in zip(rows, want):
        assert [kind for kind, _ in segments] == ["text"]
        stop = np.flatnonzero(np.isin(ref, model.config.eos_token_ids))
        np.testing.assert_array_equal(segments[0][1], ref[:int(stop[0]) if stop.size else ref.size])


def test_sampled_rows_are_reproducible_and_differ_by_seed(demo):
    model, proc = demo
    ids, mask = _prompt(proc, ["a"])
    kw = dict(max_new_tokens=24, text={"do_sample": True, "temperature": 1.0})
    a = model.generate_interleaved(ids, mask, seed=5, **kw)[0]
    b = model.generate_interleaved(ids, mask, seed=5, **kw)[0]
    assert len(a) == len(b) and all(x[0] == y[0] and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    images = [seg for s in (1, 2, 3) for seg in model.generate_interleaved(ids, mask, seed=s, **kw)[0]
              if seg[0] == "image"]
    assert len({seg[1].tobytes() for seg in images}) == len(images) >= 2


@pytest.mark.parametrize("kw, culprit", [
    (dict(max_images=-1), "max_images"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(text={"temprature": 0.5}), "temprature"),
    (dict(image={"seed": 1}), "seed"),
    (dict(seed=1.5), "seed"),
])
def test_bad_arguments_name_the_culprit(demo, kw, culprit):
    model, proc = demo
    ids, mask = _prompt(proc, ["a"])
    with pytest.raises(cj.ChameleonError, match=culprit):
        model.generate_interleaved(ids, mask, **kw)
