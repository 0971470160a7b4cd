"""Bad input gets a ChameleonError naming the file, tensor, field or argument."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import chameleon_jax as cj
from chameleon_jax import ChameleonError
from chameleon_jax.checkpoint.hf import save_hf
from chameleon_jax.checkpoint.safetensors_io import SafetensorsFile
from chameleon_jax.demo import build_tiny_checkpoint
from conftest import build_hf_model, image_placeholders, random_pixels, text_ids


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "good"
    build_hf_model(d, seed=31)
    return d


@pytest.fixture(scope="module")
def model(good):
    return cj.load(good)


def _copy(good, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


def _edit_tensors(d, fn):
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _raises(match, fn, *a, **kw):
    with pytest.raises(ChameleonError, match=match) as e:
        fn(*a, **kw)
    return str(e.value)


def test_missing_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.1.self_attn.k_norm.bias"))
    _raises(r"missing tensor.*model\.layers\.1\.self_attn\.k_norm\.bias", cj.load, d)


def test_unexpected_tensor(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}))
    msg = _raises(r"unexpected tensor.*model\.layers\.7\.mlp\.up_proj\.weight", cj.load, d)
    assert "model.safetensors" in msg


def test_wrong_shape(good, tmp_path):
    d = _copy(good, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": np.zeros((64, 95), np.float32)}))
    _raises(r"model\.layers\.0\.mlp\.down_proj\.weight.*shape \[64, 95\], expected \[64, 96\]", cj.load, d)


def test_truncated_safetensors(good, tmp_path):
    d = _copy(good, tmp_path)
    path = d / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    _raises(r"model\.safetensors: not a valid safetensors file .*truncated", cj.load, d)


@pytest.mark.parametrize("payload", [b"", b"\x00\x01garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx"])
def test_corrupt_safetensors(good, tmp_path, payload):
    d = _copy(good, tmp_path)
    (d / "model.safetensors").write_bytes(payload)
    _raises(r"model\.safetensors: not a valid safetensors file", cj.load, d)


def test_index_points_to_missing_shard(good, tmp_path):
    d = _copy(good, tmp_path)
    names = SafetensorsFile(str(d / "model.safetensors")).keys()
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _raises(r"model-00002-of-00002\.safetensors: file not found", cj.load, d)


def test_not_a_chameleon_config(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(r"config\.json: model_type is 'llama', expected 'chameleon'", cj.load, d)


def test_config_not_json(good, tmp_path):
    d = _copy(good, tmp_path)
    (d / "config.json").write_text("{ this is not json")
    _raises(r"config\.json: not valid JSON", cj.load, d)


def test_config_missing_field(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(r"config\.json: missing required field\(s\) \['hidden_size'\]", cj.load, d)


def test_config_unknown_fields_warn_once_with_suggestions(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_head"] = 2  # misspelled: its default is used, and the warning says so
    cfg["hidden_dropout_prob"] = 0.1
    cfg["vq_config"]["base_chanels"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning) as record:
        model = cj.load(d)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "config.json: ignoring field(s) this project does not know: hidden_dropout_prob, " \
           "num_key_value_head (did you mean num_key_value_heads?), vq_config.base_chanels (did you mean " \
           "base_channels?)" in msg, msg
    assert model.config.num_key_value_heads == 4 and model.config.vq_config.base_channels == 32


@pytest.mark.parametrize("field, value, want", [
    ("hidden_size", "64", "an integer >= 1"), ("num_hidden_layers", 0, "an integer >= 1"),
    ("swin_norm", "yes", "true or false"), ("rms_norm_eps", -1.0, "a number > 0"),
    ("eos_token_id", [2, "x"], "a token id"), ("model_parallel_size", 1.5, "an integer >= 1"),
])
def test_config_known_fields_stay_strict(good, tmp_path, field, value, want):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(rf"config\.json: {field}: expected {want}", cj.load, d)


def test_unsupported_rope_type(good, tmp_path):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(r"rope type 'yarn' is not supported", cj.load, d)


def test_missing_files(good, tmp_path):
    _raises(r"no such directory", cj.load, tmp_path / "nope")
    d = _copy(good, tmp_path, "no_config")
    (d / "config.json").unlink()
    _raises(r"config\.json: config file not found", cj.load, d)
    d = _copy(good, tmp_path, "no_weights")
    (d / "model.safetensors").unlink()
    _raises(r"no model\.safetensors or model\.safetensors\.index\.json", cj.load, d)


def test_bad_dtype_and_mesh(good):
    _raises(r"dtype: 'int8' is not supported", cj.load, good, dtype="int8")


def test_image_placeholder_count_mismatch(model):
    ids = np.array([text_ids(4, 1) + image_placeholders(model.config, 2)])
    _raises(r"128 <image> placeholder tokens but 1 image\(s\) need 64", model.logits, ids, pixel_values=random_pixels(1))
    _raises(r"placeholder tokens but no pixel_values", model.logits, ids)


def test_bad_forward_arguments(model):
    ids = np.array([text_ids(6, 2)])
    _raises(r"pixel_values: expected \[N, 3, 16, 16\]", model.logits, ids, pixel_values=np.zeros((1, 3, 8, 8)))
    _raises(r"attention_mask: shape \(1, 5\) does not match input_ids \(1, 6\)", model.logits, ids,
            attention_mask=np.ones((1, 5)))
    _raises(r"input_ids: ids must lie in \[0, 256\)", model.logits, np.array([[1, 999]]))
    _raises(r"input_ids: expected an integer array", model.logits, np.zeros((1, 3), np.float32))
    _raises(r"sequence length 513 exceeds max_position_embeddings 512", model.logits, np.ones((1, 513), np.int32))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from chameleon_jax.checkpoint import hf as checkpoint

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", boom)
    with pytest.raises(OSError):
        build_tiny_checkpoint(tmp_path / "out")
    assert os.listdir(tmp_path) == []  # no partial dir, no temp dir


def test_save_refuses_existing_dir(tmp_path):
    (tmp_path / "exists").mkdir()
    _raises(r"already exists", save_hf, {}, cj.ChameleonConfig(), str(tmp_path / "exists"))


def test_image_tokens_wrong_shape(model):
    for bad in (np.zeros((3, 16, 16)), np.zeros((1, 1, 3, 16, 16)), np.zeros((2, 3, 8, 8))):
        _raises(r"pixel_values: expected \[N, 3, 16, 16\] \(N images\), got shape", model.image_tokens, bad)


def test_load_dtype_none_follows_most_params(good, tmp_path):
    """dtype=None: the compute dtype is the one holding most of the decoder's params, not the
    first leaf's (here the embeddings, alone in bfloat16)."""
    import ml_dtypes

    d = _copy(good, tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.embed_tokens.weight":
                                         t["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)}))
    model = cj.load(d, dtype=None)
    assert model.params["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")
    assert model.config.dtype == "float32"


# ------------------------------------------------------------------ cases the fuzzer (tests/fuzz.py) found
def _rewrite_header(path, fn):
    """Apply ``fn`` to a safetensors file's header JSON and write it back (body unchanged)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    fn(header)
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update({"lm_head.weight": True}), r"tensor 'lm_head\.weight': expected an object"),
    (lambda h: h["lm_head.weight"].update(shape=[True, 64]), r"tensor 'lm_head\.weight': shape holds True"),
    (lambda h: h["lm_head.weight"].update(data_offsets=[0, "8"]), r"data_offsets holds '8'"),
    (lambda h: h["lm_head.weight"].update(dtype=["F32"]), r"unsupported dtype \['F32'\]"),
    (lambda h: h.update({"__metadata__": [1]}), r"__metadata__ is a list"),
])
def test_safetensors_header_entries_checked(good, tmp_path, edit, match):
    d = _copy(good, tmp_path)
    _rewrite_header(d / "model.safetensors", edit)
    _raises(r"model\.safetensors: not a valid safetensors file .*" + match, cj.load, d)


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "default", "rope_theta": {"a": 1}}, r"rope_theta: expected a number > 0, got \{'a': 1\}"),
    ({"rope_type": "default", "rope_theta": "1e4"}, r"rope_theta: expected a number > 0, got '1e4'"),
    ({"rope_type": "linear", "factor": [2]}, r"rope factor: expected a number > 0, got \[2\]"),
])
def test_config_rope_numbers_checked(good, tmp_path, rope, match):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(r"config\.json: " + match, cj.load, d)


@pytest.mark.parametrize("vm", [[1, 2], {"<image>": "8"}, {"<s>": -1}])
def test_config_vocabulary_map_checked(good, tmp_path, vm):
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocabulary_map"] = vm
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(r"config\.json: vocabulary_map: expected an object of token name -> id", cj.load, d)


def test_meta_tokenizer_malformed_entries(tmp_path):
    from tokenizer_utils import build_test_tokenizer

    build_test_tokenizer(tmp_path, num_image_codes=16, layout="meta")
    path = tmp_path / "tokenizer" / "text_tokenizer.json"
    tok = json.loads(path.read_text())
    for bad in ({**tok, "added_tokens": ["<s>", 3]}, {**tok, "model": "BPE"}):
        path.write_text(json.dumps(bad))
        _raises(r"text_tokenizer\.json: not a valid tokenizers JSON file", cj.ChameleonProcessor.from_pretrained,
                tmp_path)


def test_jsonl_token_ids_beyond_int64(tmp_path):
    from chameleon_jax.training.data import read_jsonl
    from tokenizer_utils import build_test_tokenizer

    build_test_tokenizer(tmp_path / "tok", num_image_codes=16)
    proc = cj.ChameleonProcessor.from_pretrained(tmp_path / "tok")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"input_ids": [1, 99999999999999999999]}\n')
    _raises(r"data\.jsonl:2: \"input_ids\" holds 99999999999999999999, not a token id", read_jsonl, data, proc,
            max_length=64)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(num_hidden_layers=1001), r"num_hidden_layers=1001 but the checkpoint holds layers 0\.\.1"),
    (lambda c: c["vq_config"].update(in_channels=[]), r"vq_config: in_channels: expected an integer >= 1, got \[\]"),
    (lambda c: c["vq_config"].update(channel_multiplier=[1, "2"]), r"channel_multiplier: expected a list of integers"),
    (lambda c: c.update(vocab_size=10**30), r"vocab_size: expected an integer >= 1 \(below 2\*\*31\)"),
])
def test_config_values_checked_before_use(good, tmp_path, edit, match):
    """Fuzzer finds: 1001 layers traced for minutes before the missing tensors were reported; a list as
    in_channels and a 10**30 vocab_size reached jax as TypeError / OverflowError."""
    d = _copy(good, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    _raises(match, cj.load, d)


@pytest.mark.parametrize("layout, edit", [
    ("hf", lambda t: t["post_processor"]["special_tokens"].pop("<s>")),  # loads, then panics in encode
    ("meta", lambda t: t["model"].update(continuing_subword_prefix="<image>")),  # panics in the BPE model
])
def test_tokenizer_panics_become_errors(tmp_path, layout, edit):
    """tokenizers' Rust panics are BaseExceptions (pyo3 PanicException): they escaped `except Exception`."""
    from tokenizer_utils import build_test_tokenizer

    build_test_tokenizer(tmp_path, num_image_codes=16, layout=layout)
    path = tmp_path / ("tokenizer.json" if layout == "hf" else "tokenizer/text_tokenizer.json")
    tok = json.loads(path.read_text())
    edit(tok)
    path.write_text(json.dumps(tok))
    _raises(r"tokenizer\.json: not a valid tokenizers JSON file \(tokenizers panicked", cj.ChameleonProcessor.from_pretrained,
            tmp_path)
