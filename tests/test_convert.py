"""convert (HF -> Orbax) and export (Orbax -> HF): round trips, atomicity, bad input."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

import chameleon_jax as cj
from chameleon_jax import ChameleonError, cli
from chameleon_jax.checkpoint import hf, orbax
from chameleon_jax.checkpoint import hf as hf_module
from chameleon_jax.checkpoint.convert import convert, export
from chameleon_jax.checkpoint.safetensors_io import SafetensorsFile
from conftest import build_hf_model, fail_on_call, image_placeholders, random_pixels, text_ids
from test_parity import _compare, _hf_logits


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv") / "hf"
    hf = build_hf_model(d, seed=41, num_key_value_heads=2, swin_norm=True, model_parallel_size=2)
    (d / "tokenizer.json").write_text("{}")  # tokenizer files travel with the checkpoint
    return hf, d


def _tensors(directory):
    source = hf.HFSource(str(directory))
    return {k: source.get(k) for k in source.keys()}


def test_roundtrip_hf_orbax_hf(src, tmp_path):
    hf, d = src
    assert cli.main(["convert", str(d), str(tmp_path / "orbax"), "--quiet"]) == 0
    assert (tmp_path / "orbax" / "tokenizer.json").exists()
    model = cj.load(tmp_path / "orbax")
    ids = np.array([text_ids(5, 1) + image_placeholders(hf.config, 1) + text_ids(4, 2)[1:]])
    pixels = random_pixels(1, seed=3)
    _compare(model.logits(ids, pixel_values=pixels), _hf_logits(hf, ids, pixels=pixels),
             model.config.image_vocab.image_token_ids)
    assert cli.main(["export", str(tmp_path / "orbax"), str(tmp_path / "back")]) == 0
    orig, back = _tensors(d), _tensors(tmp_path / "back")
    assert set(orig) == set(back)
    for k in orig:
        assert orig[k].dtype == back[k].dtype and np.array_equal(orig[k], back[k]), k  # bit-identical
    again = transformers.ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "back")).eval()
    np.testing.assert_array_equal(_hf_logits(again, ids, pixels=pixels), _hf_logits(hf, ids, pixels=pixels))


def test_relative_paths(src, tmp_path, monkeypatch):
    """Orbax itself refuses relative paths; convert, export and load must take them (found by notebook 04)."""
    _, d = src
    monkeypatch.chdir(tmp_path)
    convert(str(d), "rel-orbax", progress=False)
    export("rel-orbax", "rel-back")
    orig, back = _tensors(d), _tensors(tmp_path / "rel-back")
    assert set(orig) == set(back) and all(np.array_equal(orig[k], back[k]) for k in orig)
    model = cj.load("rel-orbax")
    assert np.array_equal(model.params["lm_head"], cj.load(str(d)).params["lm_head"])


def test_bf16_source_stays_bf16_and_sharded_export(src, tmp_path):
    hf, _ = src
    hf16 = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(str(hf16))
    hf.float()
    convert(str(hf16), str(tmp_path / "o16"), progress=False)
    model = cj.load(tmp_path / "o16", dtype=None)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype("bfloat16")}
    export(str(tmp_path / "o16"), str(tmp_path / "back16"), max_shard_bytes=200_000)
    assert (tmp_path / "back16" / "model.safetensors.index.json").exists()
    orig, back = _tensors(hf16), _tensors(tmp_path / "back16")
    for k in orig:
        assert back[k].dtype == np.dtype("bfloat16") and np.array_equal(orig[k], back[k]), k
    transformers.ChameleonForConditionalGeneration.from_pretrained(str(tmp_path / "back16"))


def test_convert_with_dtype_cast(src, tmp_path):
    _, d = src
    convert(str(d), str(tmp_path / "cast"), dtype="bfloat16", progress=False)
    model = cj.load(tmp_path / "cast", dtype=None)
    assert model.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype("bfloat16")}


def test_dst_exists_refused_unless_overwrite(src, tmp_path, capsys):
    _, d = src
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    assert cli.main(["convert", str(d), str(tmp_path / "out"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").exists()
    assert cli.main(["convert", str(d), str(tmp_path / "out"), "--quiet", "--overwrite"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert orbax.is_orbax_dir(str(tmp_path / "out"))


def test_write_failure_midway_leaves_no_dst(src, tmp_path, monkeypatch):
    _, d = src
    flaky = fail_on_call(orbax.convert_tensor, 20)
    monkeypatch.setattr(orbax, "convert_tensor", flaky)
    with pytest.raises(OSError, match="No space left"):
        convert(str(d), str(tmp_path / "dst"), progress=False)
    assert flaky.calls == 20
    assert os.listdir(tmp_path) == []  # neither DST nor a temp dir


def test_failed_overwrite_keeps_previous(src, tmp_path, monkeypatch):
    _, d = src
    convert(str(d), str(tmp_path / "dst"), progress=False)
    before = sorted(os.listdir(tmp_path / "dst"))
    monkeypatch.setattr(orbax, "write_safetensors", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    monkeypatch.setattr(orbax, "convert_tensor", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError):
        convert(str(d), str(tmp_path / "dst"), overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path / "dst")) == before
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    cj.load(tmp_path / "dst")


def test_truncated_source_fails_before_writing(src, tmp_path):
    _, d = src
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in os.listdir(d):
        (bad / f).write_bytes((d / f).read_bytes())
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChameleonError, match=r"model\.safetensors: not a valid safetensors file"):
        convert(str(bad), str(tmp_path / "dst"), progress=False)
    assert not (tmp_path / "dst").exists()


def test_bad_sources(tmp_path):
    with pytest.raises(ChameleonError, match="no such file or directory"):
        convert(str(tmp_path / "missing"), str(tmp_path / "x"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChameleonError, match="neither an HF Chameleon directory"):
        convert(str(tmp_path / "empty"), str(tmp_path / "x"), progress=False)
    with pytest.raises(ChameleonError, match=r"not a converted checkpoint"):
        export(str(tmp_path / "empty"), str(tmp_path / "x"))
    with pytest.raises(ChameleonError, match=r"missing: no such directory"):
        export(str(tmp_path / "missing"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_convert_warns_when_the_source_has_no_tokenizer(src, tmp_path, capsys):
    _, d = src
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((d / f).read_bytes())
    assert cli.main(["convert", str(bare), str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {bare} holds no tokenizer (tokenizer.json)" in out
    assert f"`chameleon-jax generate --model {tmp_path / 'out'}`" in out and "need the tokenizer files" in out
    assert cli.main(["convert", str(d), str(tmp_path / "out2"), "--quiet"]) == 0
    assert "no tokenizer" not in capsys.readouterr().out


def test_safetensors_reader_matches_library(src):
    from safetensors.numpy import load_file

    _, d = src
    ours = SafetensorsFile(str(d / "model.safetensors"))
    ref = load_file(str(d / "model.safetensors"))
    assert sorted(ours.keys()) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(ours.get(k), v)


def test_mixed_dtypes_are_restored_per_tensor(src, tmp_path):
    """A bf16 decoder beside an fp32 VQ-VAE: every tensor comes back in its own dtype, bit for bit,
    also from a marker written before per-param dtypes were recorded (Orbax's metadata says)."""
    import json

    hf, _ = src
    mixed = tmp_path / "mixed"
    hf.to(torch.bfloat16)
    hf.model.vqmodel.float()
    try:
        hf.save_pretrained(str(mixed))
    finally:
        hf.float()
    orig = _tensors(mixed)
    assert {str(v.dtype) for k, v in orig.items() if "vqmodel" in k} == {"float32"}
    assert orig["model.embed_tokens.weight"].dtype == np.dtype("bfloat16")
    convert(str(mixed), str(tmp_path / "o"), progress=False)

    def check():
        model = cj.load(tmp_path / "o", dtype=None)
        assert model.config.dtype == "bfloat16"  # the decoder's, not the VQ-VAE's
        for path, x in traverse_util.flatten_dict(model.params, sep="/").items():
            name, layout = hf_module.hf_name(path)
            assert x.dtype == orig[name].dtype, path
            np.testing.assert_array_equal(hf_module._to_hf(np.asarray(x), layout), orig[name], err_msg=path)

    check()
    marker = tmp_path / "o" / orbax.MARKER
    meta = json.loads(marker.read_text())
    assert meta["dtypes"] == ["bfloat16", "float32"]
    del meta["param_dtypes"]  # as written before this fix
    marker.write_text(json.dumps(meta))
    check()
