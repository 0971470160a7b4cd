"""ChameleonProcessor parity with transformers' ChameleonProcessor, round trips, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from chameleon_jax import vocab as cv
from chameleon_jax.errors import ChameleonError
from chameleon_jax.processing import ChameleonProcessor
from tokenizer_utils import build_test_tokenizer

transformers = pytest.importorskip("transformers")

SEQ = 5  # image tokens per image in the small setup
SIZE = 32  # shortest edge and crop in the small setup


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    vm = build_test_tokenizer(d, image_seq_length=SEQ, image_size=SIZE, shuffle_seed=3)
    return d, vm


@pytest.fixture(scope="module")
def procs(small_dir):
    d, _ = small_dir
    return ChameleonProcessor.from_pretrained(d), transformers.ChameleonProcessor.from_pretrained(d)


def make_image(kind: str, seed: int = 0) -> Image.Image:
    """Random test images of many modes; alpha spans 0..255 so blending matters."""
    rng = np.random.default_rng(seed)
    sizes = {"1x1": (1, 1), "4000x10": (4000, 10), "10x4000": (10, 4000), "32x32": (32, 32)}
    w, h = sizes.get(kind, (47, 29))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    modes = {"1x1": "RGB", "4000x10": "RGBA", "10x4000": "RGB", "32x32": "RGB", "P+transparency": "P"}
    mode = modes.get(kind, kind)
    if mode == "RGBA":
        return rgba
    img = rgba.convert("RGB").convert(mode) if mode != "RGB" else rgba.convert("RGB")
    if kind == "P+transparency":
        img.info["transparency"] = int(np.asarray(img)[0, 0])
    return img


def both_from(path):
    return ChameleonProcessor.from_pretrained(path), transformers.ChameleonProcessor.from_pretrained(path)


def call_both(procs, text, images=None, **kw):
    ours, theirs = procs
    a = ours(text, images, **kw)
    kw.setdefault("padding_side", "left")
    b = theirs(text=text, images=images, padding=True, return_tensors="np", **kw)
    return a, b


def assert_same(a, b):
    assert a["input_ids"].dtype == np.int32 and a["attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])
    assert ("pixel_values" in a) == ("pixel_values" in b)
    if "pixel_values" in a:
        assert a["pixel_values"].dtype == np.float32
        assert a["pixel_values"].shape == b["pixel_values"].shape
        np.testing.assert_allclose(a["pixel_values"], b["pixel_values"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- parity
KINDS = ["RGB", "RGBA", "L", "P", "P+transparency", "LA", "1x1", "4000x10", "10x4000", "CMYK", "I;16"]


@pytest.mark.parametrize("kind", KINDS)
def test_single_image_matches_transformers(procs, kind):
    a, b = call_both(procs, "Describe the image<image> please.", make_image(kind, seed=len(kind)))
    assert_same(a, b)
    assert a["pixel_values"].shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_several_images_per_prompt_matches(procs, padding_side):
    text = ["Compare<image> and<image>: what", "no image here at all, just words", "<image>the cat"]
    images = [make_image("RGB", 1), make_image("RGBA", 2), make_image("P", 3)]
    a, b = call_both(procs, text, images, padding_side=padding_side)
    assert_same(a, b)
    assert a["pixel_values"].shape == (3, 3, SIZE, SIZE)
    ours = procs[0]
    row0 = a["input_ids"][0][a["attention_mask"][0] == 1]
    assert (row0 == ours.image_token_id).sum() == 2 * SEQ
    assert (row0 == ours.boi_token_id).sum() == 2 and (row0 == ours.eoi_token_id).sum() == 2
    assert row0[0] == ours.bos_token_id and row0[-1] == ours.sep_token_id
    pad_col = 0 if padding_side == "left" else -1
    assert a["attention_mask"][2, pad_col] == 0 and a["input_ids"][2, pad_col] == ours.pad_token_id


def test_nested_image_lists_are_flattened_in_order(procs):
    imgs = [make_image("RGB", 5), make_image("L", 6), make_image("LA", 7)]
    a = procs[0](["<image><image>", "<image>"], [[imgs[0], imgs[1]], [imgs[2]]])
    b = procs[0](["<image><image>", "<image>"], imgs)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    assert not np.array_equal(a["pixel_values"][0], a["pixel_values"][1])


@pytest.mark.parametrize(
    "text", ["Hello world", ["Hello world", "What is the color of a dog?", ""], "Ünïcödé ✓ 猫"])
def test_text_only_matches_transformers(procs, text):
    a, b = call_both(procs, text)
    assert_same(a, b)


@pytest.mark.parametrize("completion", [True, False])
def test_text_completion_mode_matches(procs, completion):
    a, b = call_both(procs, ["Tell me about<image>", "the"], [make_image("RGB")],
                     return_for_text_completion=completion)
    assert_same(a, b)
    ours = procs[0]
    assert (a["input_ids"][:, -1] == ours.sep_token_id).all() != completion


def test_default_settings_1024_tokens_and_512_pixels(tmp_path):
    build_test_tokenizer(tmp_path)
    procs = both_from(tmp_path)
    assert procs[0].image_seq_length == 1024
    a, b = call_both(procs, ["What is this?<image>", "and<image>"], [make_image("RGB"), make_image("RGBA")])
    assert_same(a, b)
    assert a["pixel_values"].shape == (2, 3, 512, 512)
    assert (a["input_ids"][0] == procs[0].image_token_id).sum() == 1024
    # HF normalization: x * 0.0078 - 1 spans [-1, 0.989]
    assert a["pixel_values"].min() >= -1.0 and a["pixel_values"].max() <= 255 * 0.0078 - 1 + 1e-6


def test_no_bos_post_processor_matches_transformers(tmp_path):
    build_test_tokenizer(tmp_path, image_seq_length=SEQ, image_size=SIZE, add_bos_token=False)
    procs = both_from(tmp_path)
    a, b = call_both(procs, ["the image<image>"], [make_image("RGB")])
    assert_same(a, b)
    assert a["input_ids"][0, 0] != procs[0].bos_token_id


def test_file_paths_match_transformers_including_exif(procs, tmp_path):
    paths = []
    for i, orientation in enumerate([1, 6, 3]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        p = tmp_path / f"img{i}.jpg"
        make_image("RGB", i).resize((64, 40)).save(p, exif=exif, quality=95)
        paths.append(str(p) if i % 2 else p)  # str and Path both accepted
    a = procs[0]("<image><image><image>", paths)
    b = procs[1](text="<image><image><image>", images=[str(p) for p in paths], return_tensors="np")
    assert_same(a, b)
    rotated = procs[0].preprocess_images([paths[1]])
    assert not np.array_equal(rotated, procs[0].preprocess_images([Image.open(paths[1])]))


def test_numpy_image_equals_pil(procs):
    img = make_image("RGB", 9)
    ours = procs[0]
    np.testing.assert_array_equal(ours.preprocess_images(np.asarray(img)), ours.preprocess_images(img))


def test_meta_normalization_option(small_dir):
    d, _ = small_dir
    meta = ChameleonProcessor.from_pretrained(d, normalization="meta")
    img = make_image("32x32")  # already at the target size: no resampling
    pix = meta.preprocess_images(img)[0]
    expected = np.asarray(img).transpose(2, 0, 1).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(pix, expected, atol=1e-6)
    assert pix.min() >= -1 and pix.max() <= 1


# ----------------------------------------------------------------------------- decode
def test_batch_decode_matches_transformers(procs, small_dir):
    ours, theirs = procs
    _, vm = small_dir
    a, _ = call_both(procs, ["Hello the image<image>what?", "hi there, ok."], [make_image("RGB")])
    for skip in (True, False):
        assert ours.batch_decode(a["input_ids"], skip_special_tokens=skip) == theirs.batch_decode(
            a["input_ids"], skip_special_tokens=skip)
    rng = np.random.default_rng(0)
    text_ids = rng.integers(0, ours.tokenizer.get_vocab_size(), (4, 30))
    image_ids = np.array(sorted(v for k, v in vm.items() if k.startswith("IMGIMG")))
    text_ids[np.isin(text_ids, image_ids)] = vm["<s>"]
    assert ours.batch_decode(text_ids) == theirs.batch_decode(text_ids, skip_special_tokens=True)
    assert ours.batch_decode(text_ids, skip_special_tokens=False) == theirs.batch_decode(
        text_ids, skip_special_tokens=False)
    assert ours.decode(text_ids[0]) == theirs.decode(text_ids[0], skip_special_tokens=True)


def test_decode_drops_image_code_runs(procs, small_dir):
    ours, theirs = procs
    _, vm = small_dir
    text = ours.tokenizer.encode("the cat is in the picture", add_special_tokens=False).ids
    codes = [vm[cv.image_code_name(c)] for c in (3, 0, 15, 7)]
    ids = text[:3] + [ours.boi_token_id] + codes + [ours.eoi_token_id] + text[3:]
    assert ours.decode(ids) == theirs.decode(text, skip_special_tokens=True) == "the cat is in the picture"
    kept = ours.decode(ids, skip_special_tokens=False)
    assert kept == theirs.decode(ids, skip_special_tokens=False) and "IMGIMGDZ" in kept


# ----------------------------------------------------------------------------- attributes / loading
def test_attributes(procs, small_dir):
    ours, _ = procs
    _, vm = small_dir
    assert isinstance(ours.tokenizer, Tokenizer)
    expected = {"bos_token_id": "<s>", "eos_token_id": "</s>", "pad_token_id": "<pad>",
                "sep_token_id": cv.SEP_TOKEN, "boi_token_id": cv.BOI_TOKEN, "eoi_token_id": cv.EOI_TOKEN,
                "image_token_id": cv.IMAGE_TOKEN}
    for attr, name in expected.items():
        assert getattr(ours, attr) == vm[name], attr
    assert ours.image_seq_length == SEQ
    assert sorted(ours.image_vocab.image_token_ids.tolist()) == sorted(
        v for k, v in vm.items() if k.startswith("IMGIMG"))
    assert ours.image_vocab.code_to_bpe[5] == vm[cv.image_code_name(5)]


@pytest.mark.parametrize("where", ["tokenizer/text_tokenizer.json", "text_tokenizer.json", "file"])
def test_meta_layout_matches_transformers_converter(tmp_path, where):
    src = tmp_path / "src"
    meta_vm = build_test_tokenizer(src, layout="meta")
    meta_file = src / "tokenizer" / "text_tokenizer.json"
    raw = json.loads(meta_file.read_text())
    assert cv.META_IMAGE_TOKEN in raw["model"]["vocab"]
    if where == "text_tokenizer.json":
        (tmp_path / "flat").mkdir()
        (tmp_path / "flat" / "text_tokenizer.json").write_text(meta_file.read_text())
        path = tmp_path / "flat"
    else:
        path = meta_file if where == "file" else src
    ours = ChameleonProcessor.from_pretrained(path)
    assert ours.image_token_id == raw["model"]["vocab"][cv.META_IMAGE_TOKEN] == meta_vm[cv.IMAGE_TOKEN]
    assert ours.tokenizer.token_to_id(cv.META_IMAGE_TOKEN) is None

    # transformers' converter: rename the token in the JSON; LlamaTokenizerFast (adds <s>); pad, sep set
    raw["model"]["vocab"][cv.IMAGE_TOKEN] = raw["model"]["vocab"].pop(cv.META_IMAGE_TOKEN)
    for tok in raw["added_tokens"]:
        if tok["content"] == cv.META_IMAGE_TOKEN:
            tok["content"] = cv.IMAGE_TOKEN
    mod = tmp_path / "text_tokenizer_modified.json"
    mod.write_text(json.dumps(raw))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(mod), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        sep_token=cv.SEP_TOKEN, add_bos_token=True, add_eos_token=False)
    theirs = transformers.ChameleonProcessor(image_processor=transformers.ChameleonImageProcessorPil(),
                                             tokenizer=tok)
    a, b = call_both((ours, theirs), ["What is the image<image>", "hello"], [make_image("RGBA")])
    assert_same(a, b)
    assert a["input_ids"][0, 0] == ours.bos_token_id
    assert ours.batch_decode(a["input_ids"]) == theirs.batch_decode(b["input_ids"], skip_special_tokens=True)


def test_reads_directory_saved_by_transformers(procs, tmp_path):
    procs[1].save_pretrained(tmp_path)  # transformers 5 nests the image settings in processor_config.json
    assert not (tmp_path / "preprocessor_config.json").exists()
    reloaded = ChameleonProcessor.from_pretrained(tmp_path)
    assert reloaded.image_config.crop_height == SIZE and reloaded.image_seq_length == SEQ
    a, b = call_both((reloaded, procs[1]), ["a<image>b"], [make_image("LA")])
    assert_same(a, b)


def test_save_pretrained_round_trip(procs, tmp_path):
    out = tmp_path / "saved"
    procs[0].save_pretrained(out)
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temp dir left behind
    ours2 = ChameleonProcessor.from_pretrained(out)
    theirs2 = transformers.ChameleonProcessor.from_pretrained(out)
    text, imgs = ["Hello<image>", "a dog and a cat"], [make_image("P+transparency")]
    assert_same(ours2(text, imgs), call_both(procs, text, imgs)[1])
    assert_same(*call_both((ours2, theirs2), text, imgs))
    procs[0].save_pretrained(out)  # over an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_meta_layout_saves_as_hf_layout_transformers_reads(tmp_path):
    build_test_tokenizer(tmp_path / "meta", layout="meta")
    ours = ChameleonProcessor.from_pretrained(tmp_path / "meta")
    ours.save_pretrained(tmp_path / "hf")
    theirs = transformers.ChameleonProcessor.from_pretrained(tmp_path / "hf")
    a, b = call_both((ours, theirs), "Describe<image>", [make_image("RGB")])
    assert_same(a, b)


def test_failed_save_leaves_nothing(procs, tmp_path, monkeypatch):
    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(type(procs[0].image_config), "to_hf_dict", boom)
    with pytest.raises(OSError):
        procs[0].save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("text,n_images,needle", [
    ("one<image>", 2, "1 <image> placeholder(s) (per prompt: [1]) but 2 image(s)"),
    (["<image>", "<image><image>"], 2, "3 <image> placeholder(s) (per prompt: [1, 2]) but 2 image(s)"),
    ("no placeholder", 1, "0 <image> placeholder(s) (per prompt: [0]) but 1 image(s)"),
    ("<image>", 0, "1 <image> placeholder(s) (per prompt: [1]) but 0 image(s)"),
])
def test_placeholder_image_count_mismatch(procs, text, n_images, needle):
    images = [make_image("RGB")] * n_images if n_images else None
    with pytest.raises(ChameleonError) as e:
        procs[0](text, images)
    assert needle in str(e.value)


def test_not_an_image(procs, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture")
    cases = [(bad, "notes.txt"), (str(tmp_path / "missing.png"), "missing.png"), (42, "images[1] (int)"),
             (np.zeros((4, 4), np.float32), "images[1] (ndarray)")]
    for item, needle in cases:
        with pytest.raises(ChameleonError, match="images\\[1\\]") as e:
            procs[0]("<image><image>", [make_image("RGB"), item])
        assert needle in str(e.value)


def test_truncated_image_file(procs, tmp_path):
    p = tmp_path / "cut.png"
    make_image("RGB").resize((200, 200)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ChameleonError, match="cut.png"):
        procs[0].preprocess_images([p])


def test_decompression_bomb(small_dir, tmp_path, monkeypatch):
    d, _ = small_dir
    proc = ChameleonProcessor.from_pretrained(d)
    assert ChameleonProcessor.max_image_pixels == 89_478_485
    proc.max_image_pixels = 1000
    with pytest.raises(ChameleonError, match=r"images\[0\].*1200 pixels \(40x30\).*max_image_pixels=1000"):
        proc.preprocess_images(Image.new("RGB", (40, 30)))
    p = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(p)
    with pytest.raises(ChameleonError, match="big.png"):
        proc.preprocess_images(p)
    # PIL's own guard (DecompressionBombError at 2x its limit) also surfaces as ChameleonError
    proc.max_image_pixels = None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ChameleonError, match="big.png.*decompression bomb"):
        proc.preprocess_images(p)
    proc.max_resized_pixels = 10_000
    with pytest.raises(ChameleonError, match="aspect ratio"):
        proc.preprocess_images(make_image("4000x10"))


def test_prompt_longer_than_max_length(small_dir):
    d, _ = small_dir
    proc = ChameleonProcessor.from_pretrained(d, max_length=12)
    with pytest.raises(ChameleonError, match=r"prompt 1 is \d+ tokens .*max_length is 12"):
        proc(["hi", "a long prompt<image> with an image"], [make_image("RGB")])
    with pytest.raises(ChameleonError, match="max_length is 3"):
        ChameleonProcessor.from_pretrained(d)("Hello world", max_length=3)
    out = proc("the", padding="max_length")  # <s> the <reserved08706>
    assert out["input_ids"].shape == (1, 12) and out["attention_mask"].sum() == 3


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(ChameleonError) as e:
        ChameleonProcessor.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer/text_tokenizer.json" in msg
    with pytest.raises(ChameleonError, match="does not exist"):
        ChameleonProcessor.from_pretrained(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ChameleonError, match="tokenizer.json"):
        ChameleonProcessor.from_pretrained(tmp_path)


def test_other_bad_arguments(procs):
    ours = procs[0]
    with pytest.raises(ChameleonError, match="text must be a str"):
        ours(text=123)
    with pytest.raises(ChameleonError, match="different lengths"):
        ours(["a", "the cat is here"], padding=False)
    with pytest.raises(ChameleonError, match="padding_side"):
        ours("a", padding_side="middle")
    with pytest.raises(ChameleonError, match="1-D"):
        ours.decode([[1, 2]])
    with pytest.raises(ChameleonError, match=">= 0"):
        ours.batch_decode(np.array([[5, -1]]))
    assert ours(["the cat", "the dog"], padding=False)["input_ids"].shape == (2, 4)  # <s> the Ġcat sep
    assert set(ours(images=make_image("RGB"))) == {"pixel_values"}


def test_named_special_tokens_become_added_tokens_like_transformers(tmp_path):
    # A tokenizer.json where the separator is only a BPE vocabulary entry: transformers registers the
    # named special tokens as special added tokens after loading, so "<reserved08706>" stays one token.
    build_test_tokenizer(tmp_path, image_seq_length=SEQ, image_size=SIZE)
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != cv.SEP_TOKEN]
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    procs = both_from(tmp_path)
    a, b = call_both(procs, ["the<image>", "a dog"], [make_image("RGB")])
    assert_same(a, b)
    assert a["input_ids"][0, -1] == procs[0].sep_token_id


def test_same_lazy_image_twice_and_lazy_truncated_image(procs, tmp_path):
    p = tmp_path / "lazy.png"
    make_image("RGBA", 4).resize((120, 90)).save(p)
    lazy = Image.open(p)
    pix = procs[0]("<image><image>", [lazy, lazy])["pixel_values"]
    np.testing.assert_array_equal(pix[0], pix[1])
    np.testing.assert_allclose(pix, procs[1].image_processor([Image.open(p)] * 2, return_tensors="np")
                               ["pixel_values"], atol=1e-6)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ChameleonError, match=r"images\[0\] \(PIL RGBA image 120x90\) cannot be decoded"):
        procs[0].preprocess_images(Image.open(p))
