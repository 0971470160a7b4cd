"""The VQ-GAN decoder as part of the model: loading it (HF dirs with ``model.vqmodel.decoder.*``,
Meta's vqgan.ckpt through ``convert``, Orbax dirs old and new), ``export`` writing it, and
``decode_pixels`` / ``decode_images`` against transformers' JanusVQVAEDecoder (the same taming
architecture; see tests/test_vq_decoder.py for how its differences are undone).

One small random model serves every test: a transformers Chameleon (which has no decoder) plus a
random decoder in Meta's names (tests/meta_fake.py), written as an Anole-style HF directory and as
a fake Meta release.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch

import chameleon_jax as cj
from chameleon_jax import ChameleonError, ChameleonModel
from chameleon_jax.checkpoint import convert as convert_mod
from chameleon_jax.checkpoint import orbax
from chameleon_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from chameleon_jax.model.vqvae import VQVAE
from chameleon_jax.vocab import image_code_name
from conftest import build_hf_model, random_pixels
from meta_fake import share_norms_per_shard, write_meta_release
from test_vq_decoder import _torch_decoder

TOL = 2e-5  # relative to max |reference|, float64 oracle (tests/test_vq_decoder.py explains the floor)


def _swap_levels(state: dict, n: int) -> dict:
    """Meta ``up.k`` <-> Janus ``up.(n-1-k)`` (the same map both ways)."""
    swap = lambda m: f"up.{n - 1 - int(m.group(1))}."  # noqa: E731
    return {re.sub(r"^up\.(\d+)\.", swap, k): v for k, v in state.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Directories and references shared by the tests (built once: ~5 s)."""
    root = tmp_path_factory.mktemp("imgdec")
    # transformers' layout (no decoder)
    hf = build_hf_model(root / "plain", seed=7, intermediate_size=192, max_position_embeddings=4096)
    share_norms_per_shard(hf, 1)  # a Meta checkpoint holds one q/k norm per shard
    hf.save_pretrained(str(root / "plain"))
    decoder = write_meta_release(root / "release", hf, seed=7, multiple_of=64)  # {"decoder.*": array}
    config = cj.ChameleonConfig.from_json_file(root / "plain" / "config.json")
    vq = config.vq_config
    # Anole-style HF conversion: transformers' tensors plus model.vqmodel.decoder.*
    with_dec = root / "with_decoder"
    shutil.copytree(root / "plain", with_dec)
    f = SafetensorsFile(str(with_dec / "model.safetensors"))
    tensors = {k: f.get(k) for k in f.keys()}
    tensors.update({"model.vqmodel." + k: v for k, v in decoder.items()})
    write_safetensors(str(with_dec / "model.safetensors"), tensors, {"format": "pt"})
    # the reference: Janus's decoder holding the same weights (strict load: names and shapes agree)
    janus, _ = _torch_decoder(vq)
    janus.load_state_dict(_swap_levels({k[len("decoder."):]: torch.tensor(v) for k, v in decoder.items()},
                                       len(vq.channel_multiplier)), strict=True)
    return dict(root=root, hf=hf, decoder=decoder, config=config, plain=root / "plain", with_dec=with_dec,
                release=root / "release", janus=janus)


@pytest.fixture(scope="module")
def model(world):
    return cj.load(world["with_dec"])


def _codes(config, n: int, seed: int) -> np.ndarray:
    vq = config.vq_config
    rng = np.random.default_rng(seed)
    return rng.integers(0, vq.num_embeddings, (n, vq.tokens_per_image)).astype(np.int32)


def _reference(world, codes: np.ndarray) -> np.ndarray:
    """codebook -> post_quant_conv (transformers' modules) -> Janus decoder, in float64."""
    vq = world["config"].vq_config
    side = int(np.sqrt(codes.shape[1]))
    vqm = copy.deepcopy(world["hf"].model.vqmodel).double()
    dec = copy.deepcopy(world["janus"]).double()
    with torch.no_grad():
        emb = vqm.quantize.embedding(torch.tensor(codes, dtype=torch.long))
        emb = emb.reshape(-1, side, side, vq.embed_dim)
        return dec(vqm.post_quant_conv(emb.permute(0, 3, 1, 2))).numpy()


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _raises(match, fn, *a, **kw):
    with pytest.raises(ChameleonError, match=match) as e:
        fn(*a, **kw)
    return str(e.value)


# ------------------------------------------------------------------ decode_pixels vs references
def test_hf_dir_with_decoder_decodes_like_janus_and_vqvae(world, model):
    config = world["config"]
    codes = _codes(config, 2, seed=1)
    ids = config.image_vocab.codes_to_bpe(codes)  # shuffled vocabulary: BPE ids are not codes + offset
    pixels = model.decode_pixels(ids)
    side = config.vq_config.resolution
    assert pixels.shape == (2, 3, side, side) and pixels.dtype == np.float32
    assert _rel(pixels, _reference(world, codes)) <= TOL
    # the same as the Linen VQVAE applied to the loaded vqmodel params and the codes
    direct = jax.jit(lambda p, c: VQVAE(config.vq_config).apply({"params": p}, c, method=VQVAE.decode))
    np.testing.assert_allclose(pixels, np.asarray(direct(model.params["vqmodel"], codes)), rtol=0, atol=1e-6)
    # one image as a 1-D row, ids of any integer dtype (a batch of 1 may take other conv kernels than a
    # batch of 2: equal to fp32 rounding, 6.9e-7 seen on an AMD EPYC host, bit-equal on Sapphire Rapids)
    np.testing.assert_allclose(model.decode_pixels(ids[1].astype(np.int64)), pixels[1:], rtol=0, atol=1e-6)


def test_decode_on_a_mesh_equals_one_device(world, model):
    mesh = cj.make_mesh(data=2, devices=jax.devices()[:2])
    sharded = cj.load(world["with_dec"], mesh=mesh)
    ids = world["config"].image_vocab.codes_to_bpe(_codes(world["config"], 2, seed=2))
    np.testing.assert_allclose(sharded.decode_pixels(ids), model.decode_pixels(ids), rtol=0, atol=1e-6)


def test_round_trip_decode_images_of_image_tokens(world, model):
    pixels_in = random_pixels(2, seed=3)
    ids = model.image_tokens(pixels_in)
    images = model.decode_images(ids)
    side = world["config"].vq_config.resolution
    assert len(images) == 2 and all(im.size == (side, side) and im.mode == "RGB" for im in images)
    # Meta's conversion (chameleon/inference/image_tokenizer.py), done here in torch
    x = torch.tensor(model.decode_pixels(ids))
    want = (((torch.clamp(x, -1.0, 1.0) + 1.0) / 2.0).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    assert (np.abs(x.numpy()) > 1).any()  # the clamp matters on this random decoder
    for im, w in zip(images, want):
        np.testing.assert_array_equal(np.asarray(im), w)
    assert model.decode_images(np.zeros((0, ids.shape[1]), np.int32)) == []


def test_demo_checkpoint_draws(tmp_path):
    """`make demo` / random checkpoints carry a decoder, so images decode end to end."""
    from chameleon_jax.demo import build_tiny_checkpoint

    demo = cj.load(build_tiny_checkpoint(tmp_path / "tiny"))
    vq = demo.config.vq_config
    with open(tmp_path / "tiny" / "model.safetensors", "rb") as fh:
        header = fh.read(8 + int.from_bytes(fh.read(8), "little"))
    assert b"model.vqmodel.decoder.conv_out.weight" in header
    ids = demo.config.image_vocab.codes_to_bpe(np.arange(vq.tokens_per_image) % vq.num_embeddings)
    (image,) = demo.decode_images(ids)
    assert image.size == (vq.resolution, vq.resolution)


# ------------------------------------------------------------------ loading: HF, Meta, Orbax
def test_hf_dir_without_decoder_loads_as_before(world):
    plain = cj.load(world["plain"])
    assert set(plain.params["vqmodel"]) == {"encoder", "quant_conv", "quantize", "post_quant_conv"}
    msg = _raises(r"no VQ-GAN decoder", plain.decode_pixels, np.zeros((64,), np.int32) + 4)
    assert "tokenizer/vqgan.ckpt" in msg and "chameleon-jax convert" in msg and "model.vqmodel.decoder" in msg
    _raises(r"no VQ-GAN decoder", plain.decode_images, np.zeros((64,), np.int32) + 4)


def test_partial_decoder_is_an_error_naming_what_is_missing(world, tmp_path):
    bad = tmp_path / "partial"
    shutil.copytree(world["with_dec"], bad)
    f = SafetensorsFile(str(bad / "model.safetensors"))
    gone = "model.vqmodel.decoder.up.1.block.0.conv2.weight"
    write_safetensors(str(bad / "model.safetensors"), {k: f.get(k) for k in f.keys() if k != gone},
                      {"format": "pt"})
    n = sum(k.startswith("model.vqmodel.decoder.") for k in f.keys())
    _raises(rf"partial: checkpoint holds {n - 1} of the {n} VQ-GAN decoder tensors .*"
            rf"missing \['{re.escape(gone)}'\]", cj.load, bad)


def test_meta_release_decoder_through_convert_and_orbax(world, tmp_path, model):
    dst = tmp_path / "converted"
    convert_mod.convert(str(world["release"]), str(dst), progress=False)
    marker = json.loads((dst / orbax.MARKER).read_text())
    assert marker["vq_decoder"] is True and marker["extra_tensors"] == []
    assert not (dst / "extra_tensors.safetensors").exists()
    restored = cj.load(dst)
    flat = lambda p: dict(jax.tree_util.tree_leaves_with_path(p["vqmodel"]["decoder"]))  # noqa: E731
    ours, hf_dir = flat(restored.params), flat(model.params)
    assert ours.keys() == hf_dir.keys()
    for k in ours:  # Meta's vqgan.ckpt and the HF conversion hold the same decoder
        np.testing.assert_array_equal(np.asarray(ours[k]), np.asarray(hf_dir[k]),
                                      err_msg=jax.tree_util.keystr(k))
    codes = _codes(world["config"], 1, seed=4)
    got = restored.decode_pixels(world["config"].image_vocab.codes_to_bpe(codes))
    assert _rel(got, _reference(world, codes)) <= TOL


def test_orbax_dir_without_decoder_and_old_dirs_with_it_in_extra_tensors(world, tmp_path, model):
    """Converted before the decoder became params: Meta's decoder sat in extra_tensors.safetensors
    as vqgan.decoder.* (PyTorch layout) and the marker had no "vq_decoder"; it still loads."""
    old = tmp_path / "old"
    convert_mod.convert(str(world["plain"]), str(old), progress=False)
    marker = json.loads((old / orbax.MARKER).read_text())
    assert marker["vq_decoder"] is False
    assert "decoder" not in cj.load(old).params["vqmodel"]
    write_safetensors(str(old / "extra_tensors.safetensors"),
                      {"vqgan." + k: v for k, v in world["decoder"].items()})
    del marker["vq_decoder"]
    marker["extra_tensors"] = sorted("vqgan." + k for k in world["decoder"])
    (old / orbax.MARKER).write_text(json.dumps(marker))
    legacy = cj.load(old)
    for path, x in jax.tree_util.tree_leaves_with_path(model.params["vqmodel"]["decoder"]):
        got = legacy.params["vqmodel"]["decoder"]
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    # a broken legacy decoder says how to get a good one
    write_safetensors(str(old / "extra_tensors.safetensors"),
                      {"vqgan." + k: v for k, v in world["decoder"].items() if "norm_out" not in k})
    _raises(r"extra_tensors\.safetensors: checkpoint holds .*norm_out.*convert the source again",
            cj.load, old)


def test_export_writes_the_decoder_and_transformers_still_loads_it(world, tmp_path):
    import transformers

    dst, out = tmp_path / "converted", tmp_path / "exported"
    convert_mod.convert(str(world["release"]), str(dst), progress=False)
    convert_mod.export(str(dst), str(out))
    f = SafetensorsFile(str(out / "model.safetensors"))
    for k, v in world["decoder"].items():  # Meta's tensors, unchanged, under the HF names
        np.testing.assert_array_equal(f.get("model.vqmodel." + k), v)
    # transformers warns that the decoder's tensors are unused, and loads the rest
    exported = transformers.ChameleonForConditionalGeneration.from_pretrained(str(out)).eval()
    ids = torch.tensor([[1] + list(range(100, 130))])
    with torch.no_grad():
        want = world["hf"](input_ids=ids).logits.numpy()
        np.testing.assert_array_equal(exported(input_ids=ids).logits.numpy(), want)
    # and it loads back with its decoder
    assert "decoder" in cj.load(out).params["vqmodel"]


# ------------------------------------------------------------------ bad input
def test_bad_image_ids(world, model):
    vq = world["config"].vq_config
    n = vq.tokens_per_image
    good = world["config"].image_vocab.codes_to_bpe(_codes(world["config"], 2, seed=5))
    _raises(rf"image_ids: expected integer BPE ids .* \[N, {n}\] or \[{n}\] .*got int32 \(2, {n - 1}\)",
            model.decode_pixels, good[:, 1:])
    _raises(r"got int32 \(1, 1, 64\)", model.decode_pixels, good[None, :1])
    _raises(r"got float32 \(64,\)", model.decode_pixels, good[0].astype(np.float32))
    bad = good.copy()
    bad[1, 5] = 1  # <s>
    bad[1, 9] = -3
    _raises(r"image_ids\[1, 5\] = 1 is not an image token \(the BPE ids of IMGIMG\* names: ids 4\.\.67\); "
            r"2 such id\(s\)", model.decode_pixels, bad)
    _raises(r"image_ids\[7\] = 300 is not an image token", model.decode_images,
            np.where(np.arange(n) == 7, 300, good[0]))
    # an image token whose code the codebook does not hold
    vm = dict(world["config"].vocabulary_map)
    name = next(k for k, v in vm.items() if v == 200)
    vm[image_code_name(vq.num_embeddings)] = vm.pop(name)
    wide = ChameleonModel(world["config"].replace(vocabulary_map=vm), model.params)
    _raises(rf"image_ids\[3\] = 200 is image code {vq.num_embeddings}, but the VQ codebook holds "
            rf"{vq.num_embeddings} codes", wide.decode_pixels, np.where(np.arange(n) == 3, 200, good[0]))
    text_only = ChameleonModel(world["config"].replace(vq_config=None),
                               {k: v for k, v in model.params.items() if k != "vqmodel"})
    _raises(r"no vq_config", text_only.decode_pixels, good)
