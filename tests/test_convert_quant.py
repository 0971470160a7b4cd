"""convert --quantize: weight-only int8 / int4 stored in the converted (Orbax) checkpoint and read back
as QArrays by load(): equal to quantizing at load, smaller on disk, no float kernel ever restored,
sharded restore, bad metadata and mode errors, export refused, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

import chameleon_jax as cj
from chameleon_jax import ChameleonError, cli, quant
from chameleon_jax.checkpoint import orbax
from chameleon_jax.checkpoint.convert import convert, export
from conftest import build_hf_model, fail_on_call, text_ids

VOCAB = 1024


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The HF source (test_quant's model size) and its float, int8 and int4 conversions."""
    root = tmp_path_factory.mktemp("convq")
    build_hf_model(root / "hf", seed=3, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    out = {"hf": root / "hf", "seconds": {}}
    for mode in (None, "int8", "int4"):
        t = time.perf_counter()
        convert(str(root / "hf"), str(root / str(mode)), progress=False, quantize=mode)
        out["seconds"][mode] = time.perf_counter() - t
        out[mode] = root / str(mode)
    return out


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/", is_leaf=lambda _, x: isinstance(x, quant.QArray))


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert set(fa) == set(fb)
    for path, x in fa.items():
        y = fb[path]
        assert type(x) is type(y), path
        if isinstance(x, quant.QArray):
            assert (x.mode, x.shape, x.n_in, x.impl) == (y.mode, y.shape, y.n_in, y.impl), path
            assert x.q.dtype == y.q.dtype and x.q.sharding == y.q.sharding and x.scale.sharding == y.scale.sharding
            assert x.scale.dtype == y.scale.dtype, path
            assert np.array_equal(np.asarray(x.q.astype(np.int8)), np.asarray(y.q.astype(np.int8))), path
            assert np.array_equal(np.asarray(x.scale), np.asarray(y.scale)), path
        else:
            assert x.dtype == y.dtype and x.sharding == y.sharding, path
            assert np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_converted_quantized_equals_quantize_at_load(dirs, mode):
    stored = cj.load(dirs[mode])
    ref = cj.load(dirs["hf"], quantize=mode)
    flat = _flat(stored.params)
    qpaths = sorted(p for p, x in flat.items() if isinstance(x, quant.QArray))
    assert len(qpaths) == 2 * 7 + 1 and "lm_head" in qpaths and all(flat[p].mode == mode for p in qpaths)
    _assert_same_params(stored.params, ref.params)
    ids = np.array([text_ids(12, s, VOCAB) for s in range(3)])
    np.testing.assert_array_equal(stored.logits(ids), ref.logits(ids))  # bit-identical
    _assert_same_params(cj.load(dirs[mode], quantize=mode).params, stored.params)  # the stored mode: the same


def test_checkpoint_bytes_and_convert_time(dirs):
    def size(d):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d / "params") for f in fs)

    b = {m: size(dirs[m]) for m in (None, "int8", "int4")}
    print("params bytes float/int8/int4:", b, "convert seconds:", {m: round(s, 2) for m, s in dirs["seconds"].items()})
    # the embeddings and the VQ-VAE stay float, so the ratios are well above 1/4 and 1/8 here
    assert b["int8"] < 0.6 * b[None] and b["int4"] < 0.9 * b["int8"], b
    meta = json.loads((dirs["int4"] / orbax.MARKER).read_text())
    assert meta["quantization"] == "int4"
    info = json.loads((dirs["int4"] / orbax.QUANT_FILE).read_text())
    assert info["mode"] == "int4" and info["group"] == quant.GROUP["int4"]
    assert info["params"]["layers_0/self_attn/o_proj/kernel"]["q_shape"] == [2, 128, 256]  # K = 4 heads x 64
    assert not (dirs[None] / orbax.QUANT_FILE).exists() and "quantization" not in json.loads(
        (dirs[None] / orbax.MARKER).read_text())


def test_no_float_kernel_is_restored(dirs, monkeypatch):
    """What load asks Orbax for: q (int4) and scale (float32) for every quantized kernel, never the kernel."""
    asked = {}
    real = orbax._checkpointer

    class Spy:
        def __init__(self):
            self.inner = real()

        def restore(self, directory, target):
            asked.update(traverse_util.flatten_dict(target, sep="/"))
            return self.inner.restore(directory, target)

    monkeypatch.setattr(orbax, "_checkpointer", Spy)
    cj.load(dirs["int4"])
    kernels = [p for p in asked if quant.is_target(p)]
    assert not kernels, kernels
    q = [p for p in asked if p.endswith("/q")]
    assert len(q) == 15 and all(asked[p].dtype == np.dtype(quant.q_dtype("int4")) for p in q)
    assert all(asked[p[:-2] + "/scale"].dtype == np.float32 for p in q)


def test_sharded_restore_matches_quantize_at_load(dirs):
    mesh = cj.make_mesh(data=2, fsdp=2, tensor=2)
    stored = cj.load(dirs["int4"], mesh=mesh)
    from jax.sharding import PartitionSpec as P

    o = stored.params["layers_0"]["self_attn"]["o_proj"]["kernel"]
    assert o.q.sharding.spec == P("tensor", None, "fsdp") and o.scale.sharding.spec == P("tensor", "fsdp")
    assert len(o.q.sharding.device_set) == 8
    _assert_same_params(stored.params, cj.load(dirs["hf"], quantize="int4", mesh=mesh).params)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_dtype_cast_happens_before_quantizing(dirs, tmp_path, mode):
    convert(str(dirs["hf"]), str(tmp_path / f"bf16-{mode}"), dtype="bfloat16", progress=False, quantize=mode)
    stored = cj.load(tmp_path / f"bf16-{mode}", dtype="bfloat16")
    ref = cj.load(dirs["hf"], dtype="bfloat16", quantize=mode)
    _assert_same_params(stored.params, ref.params)
    assert stored.params["embed_tokens"]["embedding"].dtype == np.dtype("bfloat16")
    # int4 scales of a bf16 kernel are stored bf16 (quant.scale_dtype); int8's stay float32
    assert stored.params["lm_head"].scale.dtype == np.dtype("bfloat16" if mode == "int4" else "float32")
    info = json.loads((tmp_path / f"bf16-{mode}" / orbax.QUANT_FILE).read_text())
    assert info["params"]["lm_head"]["scale_dtype"] == str(stored.params["lm_head"].scale.dtype)


def test_checkpoints_without_scale_dtype_load_float32_scales(dirs, tmp_path):
    """quantization.json written before scale_dtype existed: its scales are float32 (as they were)."""
    d = _copy(dirs["int4"], tmp_path)
    qfile = d / orbax.QUANT_FILE
    info = json.loads(qfile.read_text())
    for entry in info["params"].values():
        assert entry.pop("scale_dtype") == "float32"
    qfile.write_text(json.dumps(info))
    _assert_same_params(cj.load(d).params, cj.load(dirs["int4"]).params)


def test_wrong_mode_names_the_stored_one(dirs):
    with pytest.raises(ChameleonError, match=r"quantize: .* holds int8-quantized weights .* cannot be loaded as int4"):
        cj.load(dirs["int8"], quantize="int4")
    with pytest.raises(ChameleonError, match="quantize: 'int3'"):
        cj.load(dirs["int8"], quantize="int3")


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_missing_or_bad_metadata_names_the_file(dirs, tmp_path):
    d = _copy(dirs["int8"], tmp_path)
    qfile = d / orbax.QUANT_FILE
    good = qfile.read_text()
    qfile.unlink()
    with pytest.raises(ChameleonError, match=rf"{qfile}: quantization metadata .*int8.* not found"):
        cj.load(d)
    qfile.write_text("{not json")
    with pytest.raises(ChameleonError, match=str(qfile)):
        cj.load(d)
    info = json.loads(good)
    for change, want in [({"mode": "int4"}, "mode 'int4', but the marker"),
                         ({"group": "x"}, "\"group\" is 'x'"),
                         ({"format": "other"}, "format 'other'"),
                         ({"params": {**info["params"], "lm_head": {**info["params"]["lm_head"], "q_shape": [2, 128, 1024]}}},
                          r"lm_head q_shape \[2, 128, 1024\]"),
                         ({"params": {k: v for k, v in info["params"].items() if k != "lm_head"}},
                          "no entry for quantized param 'lm_head'"),
                         ({"params": {**info["params"], "lm_head": {**info["params"]["lm_head"], "scale_dtype": "int7"}}},
                          "lm_head scale_dtype 'int7'")]:
        qfile.write_text(json.dumps({**info, **change}))
        with pytest.raises(ChameleonError, match=re.escape(str(qfile)) + ".*" + want):
            cj.load(d)
    qfile.write_text(good)
    marker = d / orbax.MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "quantization": "int2"}))
    with pytest.raises(ChameleonError, match=rf"{marker}: \"quantization\" is 'int2'"):
        cj.load(d)
    del meta["quantization"]
    marker.write_text(json.dumps(meta))
    with pytest.raises(ChameleonError, match=rf"{qfile}: quantization metadata present, but the marker"):
        cj.load(d)


def test_export_of_a_quantized_checkpoint_is_refused(dirs, tmp_path):
    with pytest.raises(ChameleonError, match=r"holds int4-quantized weights .* cannot be exported to HF"):
        export(str(dirs["int4"]), str(tmp_path / "back"))
    assert not (tmp_path / "back").exists()


def test_failure_while_quantizing_leaves_no_dst(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "quantize_leaf", fail_on_call(quant.quantize_leaf, 5))
    with pytest.raises(OSError, match="No space left"):
        convert(str(dirs["hf"]), str(tmp_path / "dst"), progress=False, quantize="int8")
    assert os.listdir(tmp_path) == []


def test_cli_convert_quantize(dirs, tmp_path, capsys):
    dst = tmp_path / "cli-int8"
    assert cli.main(["convert", str(dirs["hf"]), str(dst), "--quiet", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "weights stored int8-quantized" in out and "cannot be exported" in out
    assert orbax.stored_quantization(str(dst))["mode"] == "int8"
    _assert_same_params(cj.load(dst).params, cj.load(dirs["int8"]).params)
    assert "--quantize" in cli.build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    with pytest.raises(SystemExit):
        cli.main(["convert", str(dirs["hf"]), str(tmp_path / "x"), "--quantize", "int3"])
    assert not (tmp_path / "x").exists()

