"""Meta's original release (consolidated*.pth, params.json, vqgan.ckpt, text_tokenizer.json) as a
tensor source: a fake release written from a random transformers model converts back to the same
model (per-tensor equality, end-to-end logits and image codes), and bad input fails clearly."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from chameleon_jax import ChameleonConfig, ChameleonError, ChameleonModel
from chameleon_jax.checkpoint.hf import hf_tensors, read_params
from chameleon_jax.checkpoint.meta import MetaRelease
from chameleon_jax.checkpoint.meta_files import intermediate_size, is_meta_release, load_torch_file
from conftest import build_hf_model, image_placeholders, random_pixels, text_ids
from meta_fake import share_norms_per_shard, write_meta_release

TOL = 1e-4

# 7B-style: one consolidated.pth, MHA, unfused wq/wk/wv, w1/w3, no ffn_dim_multiplier.
SEVEN = dict(hf=dict(intermediate_size=192), shards=1, meta=dict(multiple_of=64))
# 30B-style: 4 shards, GQA (2 kv heads per shard), swin_norm, unfused wq/wk/wv and w1/w3 in every
# shard (the real release's layout), a multiplier, per-shard q/k norms, and norm copies that differ
# between shards (averaged on load). Fused wqkv/w13: test_fused_shards_are_accepted_too.
THIRTY = dict(
    hf=dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8, intermediate_size=448,
            swin_norm=True, model_parallel_size=4),
    shards=4,
    meta=dict(fused=False, multiple_of=64, ffn_dim_multiplier=1.3, norm_jitter=0.01),
)


def _build(root, spec, seed, name):
    hf = build_hf_model(root / "hf", seed=seed, max_position_embeddings=4096, **spec["hf"])
    share_norms_per_shard(hf, spec["shards"])
    decoder = write_meta_release(root / "release", hf, name=name, shards=spec["shards"], seed=seed, **spec["meta"])
    return root / "release", hf, decoder


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("meta7b"), SEVEN, seed=41, name="7b")


@pytest.fixture(scope="module")
def thirty(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("meta30b"), THIRTY, seed=42, name="30b")


@pytest.fixture(params=["seven", "thirty"])
def case(request):
    return request.getfixturevalue(request.param)


def _hf_logits(hf, ids, pixels=None):
    kw = {"input_ids": torch.tensor(ids)}
    if pixels is not None:
        kw["pixel_values"] = torch.tensor(pixels)
    with torch.no_grad():
        return hf(**kw).logits.float().numpy()


def _text_err(ours, ref, image_ids):
    text = ~np.isin(np.arange(ref.shape[-1]), image_ids)
    return np.abs(ours[..., text] - ref[..., text]).max() / np.abs(ref[..., text]).max()


def _raises(match, fn, *a, **kw):
    with pytest.raises(ChameleonError, match=match) as e:
        fn(*a, **kw)
    return str(e.value)


# ------------------------------------------------------------------ conversion is exact
def test_every_tensor_equals_the_source(case):
    root, hf, decoder = case
    release = MetaRelease(root)
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ref.update({"model.vqmodel." + k: v for k, v in decoder.items()})  # transformers has no VQ decoder
    assert sorted(release.keys()) == sorted(ref)
    for name in release.keys():
        got = release.get(name)
        assert got.shape == release.shape(name) == ref[name].shape, name
        assert got.dtype == release.dtype(name) == np.float32, name
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            # 30B: the mean of the per-shard copies (fp32 rounding)
            np.testing.assert_allclose(got, ref[name], rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, ref[name], err_msg=name)


def test_logits_and_image_codes_match_transformers(case):
    root, hf, _ = case
    release = MetaRelease(root)
    model = ChameleonModel(release.config, read_params(release, release.config))
    pixels = random_pixels(1, seed=3)
    ids = np.array([text_ids(6, seed=4) + image_placeholders(hf.config, 1) + text_ids(6, seed=5)[1:]])
    with torch.no_grad():
        ref_codes = hf.model.get_image_tokens(torch.tensor(pixels)).numpy()
    np.testing.assert_array_equal(model.image_tokens(pixels), ref_codes)
    image_ids = release.config.image_vocab.image_token_ids
    ours = model.logits(ids, pixel_values=pixels)
    assert _text_err(ours, _hf_logits(hf, ids, pixels), image_ids) < TOL
    assert np.all(ours[..., image_ids] == np.finfo(np.float32).min)
    plain = np.array([text_ids(16, seed=6)])
    assert _text_err(model.logits(plain), _hf_logits(hf, plain), image_ids) < TOL


def test_config_equals_the_source(case):
    root, hf, _ = case
    release = MetaRelease(root)
    source = ChameleonConfig.from_json_file(root.parent / "hf" / "config.json")
    assert release.config == source  # every field but the vocabulary map (compare=False)
    assert dict(release.config.vocabulary_map) == dict(source.vocabulary_map)
    assert "<image>" in release.config.vocabulary_map and "<reserved08707>" not in release.config.vocabulary_map
    assert release.config.model_parallel_size == (4 if "30b" in str(release.model_dir) else 1)
    # params.json says 8 at top level; consolidate_params.json overrides it, as Meta's loader merges
    assert not any("model_parallel_size" in n for n in release.notes)
    assert release.tokenizer_path == str(root / "tokenizer" / "text_tokenizer.json")


def test_decoder_tensors_are_params(case):
    root, _, decoder = case
    release = MetaRelease(root)
    assert sorted(k for k in release.keys() if ".decoder." in k) == sorted("model.vqmodel." + k for k in decoder)
    for k, v in decoder.items():
        np.testing.assert_array_equal(release.get("model.vqmodel." + k), v)
    params = read_params(release, release.config)
    assert "decoder" in params["vqmodel"] and "post_quant_conv" in params["vqmodel"]
    assert any("loss.logvar" in n for n in release.notes)  # non-model tensors are reported, not kept


def test_sharded_release_notes_and_names(thirty):
    root, _, _ = thirty
    release = MetaRelease(root)
    read_params(release, release.config)
    assert any("averaged" in n for n in release.notes)
    assert release.where("model.embed_tokens.weight").endswith("consolidated.{00..03}.pth")
    assert release.where("model.vqmodel.quant_conv.weight").endswith("vqgan.ckpt")
    assert intermediate_size(4096, None, 256) == 11008  # the real 7B
    assert intermediate_size(8192, 1, 256) == 22016  # the real 30B


def test_fused_shards_are_accepted_too(thirty, tmp_path):
    """No known release file holds fused wqkv / w13 (transformers' converter reads every shard
    unfused; Meta's code fuses them at load time). Accepted anyway: the same tensors come out."""
    root, hf, _ = thirty
    with open(root / "models" / "30b" / "consolidated.00.pth", "rb") as f:
        names = torch.load(f, weights_only=True, mmap=False).keys()
    assert "layers.0.attention.wq.weight" in names and not any("wqkv" in n or "w13" in n for n in names)
    meta = {**THIRTY["meta"], "fused": True}
    write_meta_release(tmp_path / "fused", hf, name="30b", shards=4, seed=42, with_vqgan=False, **meta)
    fused, unfused = MetaRelease(tmp_path / "fused"), MetaRelease(root)
    assert sorted(fused.keys()) == sorted(k for k in unfused.keys() if not k.startswith("model.vqmodel."))
    for name in fused.keys():
        np.testing.assert_array_equal(fused.get(name), unfused.get(name), err_msg=name)


def test_bfloat16_release_keeps_dtype(seven, tmp_path):
    root, hf, _ = seven
    write_meta_release(tmp_path / "bf16", hf, shards=1, multiple_of=64, dtype=torch.bfloat16)
    shutil.copy(root / "tokenizer" / "vqgan.ckpt", tmp_path / "bf16" / "tokenizer")
    shutil.copy(root / "tokenizer" / "vqgan.yaml", tmp_path / "bf16" / "tokenizer")
    bf, fp = MetaRelease(tmp_path / "bf16"), MetaRelease(root)
    assert bf.config.dtype == "bfloat16"
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_norm.bias",
                 "model.embed_tokens.weight"):
        got = bf.get(name)
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), fp.get(name).astype(ml_dtypes.bfloat16).view(np.uint16))


# ------------------------------------------------------------------ accepted paths
def test_accepted_path_forms(seven, tmp_path):
    root, hf, _ = seven
    model_dir = root / "models" / "7b"
    assert is_meta_release(root) and is_meta_release(model_dir)
    assert not is_meta_release(root.parent / "hf")  # an HF directory
    assert not is_meta_release(tmp_path) and not is_meta_release(tmp_path / "nope")
    by_dir = MetaRelease(model_dir)  # finds ../../tokenizer
    assert by_dir.tokenizer_dir == str(root / "tokenizer") and by_dir.config == MetaRelease(root).config
    two = tmp_path / "two"
    shutil.copytree(root, two)
    shutil.copytree(two / "models" / "7b", two / "models" / "30b")
    _raises(r"several models \['30b', '7b'\].*model=", MetaRelease, two)
    assert MetaRelease(two, model="7B").model_dir == str(two / "models" / "7b")
    _raises(r"no model '13b'", MetaRelease, two, model="13b")
    _raises("not a Meta Chameleon release", MetaRelease, tmp_path)


# ------------------------------------------------------------------ missing pieces
def _copy(seven, tmp_path):
    dst = tmp_path / "release"
    shutil.copytree(seven[0], dst)
    return dst


def test_missing_vqgan_converts_text_only(seven, tmp_path):
    root = _copy(seven, tmp_path)
    hf = seven[1]
    os.remove(root / "tokenizer" / "vqgan.ckpt")
    release = MetaRelease(root)
    assert release.config.vq_config is None
    assert any("vqgan.ckpt not found" in n and "text model only" in n for n in release.notes)
    assert not any(k.startswith("model.vqmodel.") for k in release.keys())
    model = ChameleonModel(release.config, read_params(release, release.config))
    ids = np.array([text_ids(12, seed=7)])
    assert _text_err(model.logits(ids), _hf_logits(hf, ids), release.config.image_vocab.image_token_ids) < TOL
    _raises(r"vqgan\.ckpt: VQ-GAN image tokenizer checkpoint not found", MetaRelease, root, require_vqgan=True)


@pytest.mark.parametrize("rel, match", [
    ("models/7b/params.json", r"models/7b/params\.json: model parameters \(params\.json\) not found"),
    ("tokenizer/text_tokenizer.json", r"tokenizer/text_tokenizer\.json: text tokenizer .* not found"),
    ("tokenizer/vqgan.yaml", r"tokenizer/vqgan\.yaml: VQ-GAN config \(vqgan\.yaml\) not found"),
    ("models/7b/consolidated.pth", r"models/7b: no consolidated\.pth or consolidated\.NN\.pth"),
])
def test_missing_file(seven, tmp_path, rel, match):
    root = _copy(seven, tmp_path)
    os.remove(root / rel)
    _raises(match, MetaRelease, root)


def test_missing_or_extra_shard(thirty, tmp_path):
    root = tmp_path / "release"
    shutil.copytree(thirty[0], root)
    d = root / "models" / "30b"
    os.rename(d / "consolidated.03.pth", tmp_path / "03.pth")
    _raises(r"tok_embeddings widths sum to 96 over 3 shard.*dim=128.*shard missing", MetaRelease, root)
    os.remove(d / "consolidated.01.pth")
    _raises(r"consolidated\.01\.pth: shard file missing", MetaRelease, root)


# ------------------------------------------------------------------ damaged and hostile files
def test_truncated_pth(seven, tmp_path):
    root = _copy(seven, tmp_path)
    path = root / "models" / "7b" / "consolidated.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _raises(r"consolidated\.pth: not a PyTorch zip checkpoint \(truncated", MetaRelease, root)
    assert str(path) in msg


def test_damaged_archive_member(seven, tmp_path):
    # A zip whose central directory is intact but whose pickle is cut short.
    import zipfile

    root = _copy(seven, tmp_path)
    path = root / "models" / "7b" / "consolidated.pth"
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl][: len(members[pkl]) // 2]
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    _raises(r"consolidated\.pth: (cannot read this PyTorch file|refused to load)", MetaRelease, root)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("target", ["models/7b/consolidated.pth", "tokenizer/vqgan.ckpt"])
@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_pickle_with_code_is_refused_not_run(seven, tmp_path, target, fmt):
    root = _copy(seven, tmp_path)
    marker = tmp_path / "PWNED"
    payload = {"tok_embeddings.weight": _Exploit(marker)}
    if fmt == "torch_zip":
        torch.save(payload, root / target)
    else:
        (root / target).write_bytes(pickle.dumps(payload))
    match = "refused to load" if fmt == "torch_zip" else "not a PyTorch zip checkpoint"
    msg = _raises(match, MetaRelease, root)
    assert target.split("/")[-1] in msg
    assert not marker.exists()


def test_unexpected_tensor_and_wrong_shapes(seven, tmp_path):
    root = _copy(seven, tmp_path)
    path = root / "models" / "7b" / "consolidated.pth"
    sd = torch.load(path, weights_only=True)
    torch.save({**sd, "layers.0.attention.wq.bias": torch.zeros(64)}, path)
    _raises(r"consolidated\.pth: unexpected tensor 'layers\.0\.attention\.wq\.bias'", MetaRelease, root)
    torch.save({**sd, "layers.0.attention.q_normalization.weight": torch.zeros(4, 16)}, path)
    _raises(r"'layers\.0\.attention\.q_normalization\.weight' has shape \[4, 16\], expected \[16\]", MetaRelease, root)
    bad = dict(sd)
    del bad["layers.1.feed_forward.w3.weight"]
    torch.save(bad, path)
    _raises(r"missing tensor 'layers\.1\.feed_forward\.w3\.weight'", MetaRelease, root)
    torch.save(sd, path)
    params = json.loads((root / "models" / "7b" / "params.json").read_text())
    params["model"]["multiple_of"] = 256  # intermediate 256, the files hold 192
    (root / "models" / "7b" / "params.json").write_text(json.dumps(params))
    _raises(r"params\.json: dim=64, ffn_dim_multiplier=None, multiple_of=256 give an FFN width of 256, "
            r"but layers\.0\.feed_forward\.w2\.weight in .*consolidated\.pth holds 192", MetaRelease, root)
    params["model"]["multiple_of"] = 64
    params["model"]["vocab_size"] = 300  # the files hold 256 rows: read_params names the tensor and file
    (root / "models" / "7b" / "params.json").write_text(json.dumps(params))
    release = MetaRelease(root)
    _raises(r"consolidated\.pth: tensor '(model\.embed_tokens|lm_head)\.weight' has shape \[256, 64\], "
            r"expected \[300, 64\]", read_params, release, release.config)


def test_torch_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    _raises(r"pip install 'chameleon-jax\[convert\]'", load_torch_file, str(tmp_path / "x.pth"))


# ------------------------------------------------------------------ through `chameleon-jax convert`
def test_convert_cli_meta_release_end_to_end(thirty, tmp_path, capsys):
    """30B-style release -> convert -> cj.load + processor from DST; logits equal transformers'."""
    import chameleon_jax as cj
    from chameleon_jax import cli
    from chameleon_jax.checkpoint import orbax as checkpoint

    root, hf, decoder = thirty
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(root), str(dst), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "converted meta checkpoint" in out and "note:" in out  # averaged shard norms are reported
    model = cj.load(dst)
    proc = cj.ChameleonProcessor.from_pretrained(dst)
    assert proc.image_token_id == model.config.image_vocab.image_token_id
    ids = np.array([text_ids(5, 1) + image_placeholders(hf.config, 1) + text_ids(4, 2)[1:]])
    pixels = random_pixels(1, seed=4)
    err = _text_err(model.logits(ids, pixel_values=pixels), _hf_logits(hf, ids, pixels), model.config.image_vocab.image_token_ids)
    assert err < 1e-4
    # the VQ-GAN decoder is a param group member now, not an extra tensor
    assert checkpoint.read_extra_tensors(str(dst)) == {}
    assert json.loads((dst / checkpoint.MARKER).read_text())["vq_decoder"] is True
    held = {name: x for name, x in hf_tensors(model.params) if ".decoder." in name}
    assert sorted(held) == sorted("model.vqmodel." + k for k in decoder)
    for k, v in decoder.items():
        np.testing.assert_array_equal(held["model.vqmodel." + k], v)


def test_remapping_shard_files_midway_changes_nothing(seven, monkeypatch):
    """Re-opening the .pth mappings (done every 512 MiB to bound memory) gives the same tensors."""
    from chameleon_jax.checkpoint import meta as meta_format

    root, hf, _ = seven
    steady = meta_format.MetaRelease(str(root))
    want = {k: np.array(steady.get(k)) for k in steady.keys()}
    monkeypatch.setattr(meta_format.MetaRelease, "_REMAP_BYTES", 1)
    calls = []
    real = meta_format.load_torch_file
    monkeypatch.setattr(meta_format, "load_torch_file", lambda p: calls.append(p) or real(p))
    remapped = meta_format.MetaRelease(str(root))
    for k in remapped.keys():
        np.testing.assert_array_equal(remapped.get(k), want[k])
    from_pth = [k for k in want if not k.startswith("model.vqmodel.")]
    assert len(calls) >= len(from_pth) - 1  # it re-opened the .pth before (almost) every tensor
