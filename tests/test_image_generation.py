"""Image mode (``generate_image``): Meta's 3-stream guidance against a reference loop built on
transformers' forward, batch invariance, sampling, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import chameleon_jax as cj
from chameleon_jax import ChameleonError
from chameleon_jax.vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN
from conftest import build_hf_model, image_placeholders, left_pad, random_pixels, text_ids



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("img") / "hf"
    hf = build_hf_model(d, seed=7, num_key_value_heads=2)
    return hf, cj.load(d)


def _prompts(hf):
    """Two prompts of different lengths; the second holds an image and ends with boi already."""
    vm = hf.config.vocabulary_map
    short = text_ids(5, 11)
    with_image = text_ids(4, 12) + image_placeholders(hf.config, 1) + text_ids(6, 13)[1:] + [vm[BOI_TOKEN]]
    return [short, with_image]


def _reference_streams(hf, prompt, pixels):
    """Meta's three streams, built independently of chameleon_jax: the <image> placeholders take
    the images' real tokens (transformers' get_image_tokens), then full / image-only / [bos, boi]."""
    vm = hf.config.vocabulary_map
    boi, eoi, bos, placeholder = vm[BOI_TOKEN], vm[EOI_TOKEN], hf.config.bos_token_id, vm[IMAGE_TOKEN]
    seq = list(prompt)
    if pixels is not None:
        with torch.no_grad():
            tokens = hf.model.get_image_tokens(torch.tensor(pixels)).reshape(-1).tolist()
        it = iter(tokens)
        seq = [next(it) if t == placeholder else t for t in seq]
    if seq[-1] != boi:
        seq.append(boi)
    image_ids = set(hf.model.vocabulary_mapping.image_tokens)
    cond = [t for t in seq if t in (bos, boi, eoi) or t in image_ids]
    return [seq, cond, [bos, boi]]


def _hf_last_logits(hf, seq):
    # model.model + lm_head: the raw logits, without the forward's image-token mask
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor([seq])).last_hidden_state
        return hf.lm_head(h[0, -1]).double().numpy()


def _mix(f, i, u, s_txt, s_img):
    return u + s_img * (i - u) + s_txt * (f - i)


def _code_columns(hf, num_codes):
    """BPE id of each VQ code (the order of image_logits' columns)."""
    return np.array(hf.model.vocabulary_mapping.convert_img2bpe(torch.arange(num_codes)).tolist())


def test_first_step_guided_logits_match_transformers(models):
    hf, model = models
    prompts = _prompts(hf)
    ids, mask = left_pad(prompts)
    pixels = random_pixels(1, seed=5)
    got = model.image_logits(ids, mask, pixels, guidance_scale_text=3.0, guidance_scale_image=1.2)
    cols = _code_columns(hf, hf.config.vq_config.num_embeddings)
    for b, prompt in enumerate(prompts):
        streams = _reference_streams(hf, prompt, pixels if b == 1 else None)
        f, i, u = (_hf_last_logits(hf, s) for s in streams)
        want = _mix(f, i, u, 3.0, 1.2)[cols]
        rel = np.abs(got[b] - want).max() / np.abs(want).max()
        assert rel < 1e-4, (b, rel)


def _reference_generate(hf, prompt, pixels, n, s_txt, s_img):
    """Step-by-step greedy image mode on transformers' forward (no cache, one stream at a time)."""
    streams = _reference_streams(hf, prompt, pixels)
    cols = _code_columns(hf, hf.config.vq_config.num_embeddings)
    if (s_txt, s_img) == (1.0, 1.0):
        streams = streams[:1]  # no guidance: the full stream alone
    caches = [None] * len(streams)
    feed = [list(s) for s in streams]  # what each stream has not yet run
    out = []
    for _ in range(n):
        logits = []
        for k in range(len(streams)):  # transformers' forward with its own KV cache, one stream at a time
            with torch.no_grad():
                o = hf.model(input_ids=torch.tensor([feed[k]]), past_key_values=caches[k], use_cache=True)
                caches[k] = o.past_key_values
                logits.append(hf.lm_head(o.last_hidden_state[0, -1]).double().numpy())
        mixed = _mix(*logits, s_txt, s_img) if len(logits) == 3 else logits[0]
        tok = int(cols[np.argmax(mixed[cols])])  # only image tokens are allowed
        out.append(tok)
        feed = [[tok]] * len(streams)
    return out


_GREEDY: dict = {}


def _batched_greedy(model, hf, scales):
    """Greedy generate_image of the two prompts (computed once per scales, shared by two tests)."""
    if scales not in _GREEDY:
        ids, mask = left_pad(_prompts(hf))
        _GREEDY[scales] = model.generate_image(ids, mask, random_pixels(1, seed=5), guidance_scale_text=scales[0],
                                               guidance_scale_image=scales[1], do_sample=False)
    return _GREEDY[scales]


@pytest.mark.parametrize("scales", [(3.0, 1.2), (1.0, 1.0)], ids=["guided", "no-guidance"])
def test_greedy_generate_image_equals_reference_loop(models, scales):
    """A batch of two prompts of different lengths, one with an image: all image_seq_length tokens."""
    hf, model = models
    prompts = _prompts(hf)
    pixels = random_pixels(1, seed=5)
    got = _batched_greedy(model, hf, scales)
    n = model.config.vq_config.tokens_per_image
    assert got.shape == (2, n) and got.dtype == np.int32
    for b, prompt in enumerate(prompts):
        want = _reference_generate(hf, prompt, pixels if b == 1 else None, n, *scales)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}")


def test_batched_rows_equal_rows_alone(models):
    hf, model = models
    prompts = _prompts(hf)
    pixels = random_pixels(1, seed=5)
    batched = _batched_greedy(model, hf, (3.0, 1.2))
    for b, prompt in enumerate(prompts):
        alone = model.generate_image(np.array([prompt]), None, pixels if b == 1 else None, do_sample=False)
        np.testing.assert_array_equal(batched[b], alone[0], err_msg=f"row {b}")
    # with progress reports: the same loop in chunks, the same tokens
    seen = []
    ids, mask = left_pad(prompts)
    chunked = model.generate_image(ids, mask, pixels, do_sample=False, progress=lambda n, total: seen.append((n, total)))
    np.testing.assert_array_equal(chunked, batched)
    n = model.config.vq_config.tokens_per_image
    assert seen[-1] == (n, n) and [a for a, _ in seen] == sorted({a for a, _ in seen})


def test_sampling_is_seeded_and_yields_image_tokens(models):
    hf, model = models
    ids, mask = left_pad(_prompts(hf)[:1] * 2)
    a = model.generate_image(ids, mask, seed=1)
    b = model.generate_image(ids, mask, seed=1)
    c = model.generate_image(ids, mask, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # rows draw independently
    allowed = set(_code_columns(hf, hf.config.vq_config.num_embeddings).tolist())
    assert set(a.reshape(-1).tolist()) <= allowed
    # a very low temperature and top_p are greedy
    greedy = model.generate_image(ids, mask, do_sample=False)
    np.testing.assert_array_equal(model.generate_image(ids, mask, temperature=1e-6, seed=5), greedy)
    np.testing.assert_array_equal(model.generate_image(ids, mask, top_p=0.0, seed=5), greedy)


def test_generate_then_decode_on_the_tiny_demo_checkpoint(tmp_path):
    """End to end on a checkpoint that carries the VQ-GAN decoder: prompt -> image ids -> PIL."""
    from chameleon_jax.demo import build_tiny_checkpoint

    model = cj.load(build_tiny_checkpoint(tmp_path / "tiny", seed=0))
    vq = model.config.vq_config
    ids = np.array([[model.config.bos_token_id, 10, 11, 12]])
    images = model.decode_images(model.generate_image(ids, seed=0))
    assert len(images) == 1 and images[0].size == (vq.resolution, vq.resolution) and images[0].mode == "RGB"


def test_bad_input(models):
    hf, model = models
    ids, mask = left_pad(_prompts(hf)[:1])
    with pytest.raises(ChameleonError, match="guidance_scale_text: expected a finite number >= 0"):
        model.generate_image(ids, guidance_scale_text=-1.0)
    with pytest.raises(ChameleonError, match="guidance_scale_image"):
        model.generate_image(ids, guidance_scale_image=float("nan"))
    with pytest.raises(ChameleonError, match="top_p"):
        model.generate_image(ids, top_p=1.5)
    n = model.config.vq_config.tokens_per_image
    room = model.config.max_position_embeddings - n - 1
    too_long = np.array([text_ids(room + 1, 3)])  # + the appended boi: one past the limit
    with pytest.raises(ChameleonError, match=rf"leaves no room for an image.*at most {room} tokens"):
        model.generate_image(too_long)
    fits = np.array([text_ids(room - 1, 3) + [hf.config.vocabulary_map[BOI_TOKEN]]])
    assert model.generate_image(fits, do_sample=False).shape == (1, n)
    two_images = np.array([text_ids(3, 1) + image_placeholders(hf.config, 1)])
    with pytest.raises(ChameleonError, match="no pixel_values"):
        model.generate_image(two_images)


def test_cli_generate_image_writes_pngs(tmp_path, capsys):
    """`chameleon-jax generate --mode image` on the embedded tiny checkpoint: PNGs, progress, bad flags."""
    from PIL import Image

    from chameleon_jax import cli

    out = tmp_path / "pic.png"
    assert cli.main(["generate", "--mode", "image", "--prompt", "a red square", "--out", str(out),
                     "--num-images", "2", "--cfg-text", "2.0", "--seed", "3"]) == 0
    cap = capsys.readouterr()
    paths = [tmp_path / "pic-0.png", tmp_path / "pic-1.png"]
    assert cap.out.split() == [str(p) for p in paths]
    assert "image tokens" in cap.err and "2 image(s)" in cap.err
    a, b = (np.asarray(Image.open(p)) for p in paths)
    assert a.shape == b.shape and a.shape[2] == 3 and not np.array_equal(a, b)  # the two rows drew differently
    assert sorted(os.listdir(tmp_path)) == ["pic-0.png", "pic-1.png"]  # no temp files left
    for extra, match in ((["--num-images", "2"], "--out"),
                         (["--out", str(out), "--cfg-image", "-1"], "--cfg-image"),
                         (["--out", str(tmp_path / "nodir" / "x.png")], "--out")):
        assert cli.main(["generate", "--mode", "image", "--prompt", "x"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("chameleon-jax: error:") and match in err[-1], err
