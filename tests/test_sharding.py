"""Sharded loading and execution on 8 simulated CPU devices, compared with one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import chameleon_jax as cj
from chameleon_jax import ChameleonError
from chameleon_jax.checkpoint.convert import convert
from chameleon_jax.sharding import bytes_per_device, logical_to_spec, make_mesh
from conftest import build_hf_model, random_pixels, text_ids

MESHES = [dict(data=8), dict(fsdp=8), dict(tensor=8), dict(data=2, tensor=4), dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    # 8 heads, 8 kv heads, mlp 256, vocab 256: every sharded dim divides 8.
    build_hf_model(root / "hf", seed=51, hidden_size=128, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=256)
    convert(str(root / "hf"), str(root / "orbax"), progress=False)
    return root


@pytest.fixture(scope="module")
def reference(ckpt):
    model = cj.load(ckpt / "hf")
    ids = np.array([text_ids(5, s) + image_placeholders_cfg(model) + text_ids(4, s + 1)[1:] for s in range(8)])
    pixels = random_pixels(8, seed=52)
    return model, ids, pixels, model.logits(ids, pixel_values=pixels)


def image_placeholders_cfg(model):
    vm = model.config.vocabulary_map
    n = model.config.vq_config.tokens_per_image
    return [vm["<racm3:break>"]] + [vm["<image>"]] * n + [vm["<eoss>"]]


def test_eight_devices_available():
    assert jax.device_count() == 8, "tests/conftest.py sets JAX_NUM_CPU_DEVICES=8 before jax starts"


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
@pytest.mark.parametrize("source", ["hf", "orbax"])
def test_logits_on_mesh_equal_one_device(ckpt, reference, axes, source):
    model1, ids, pixels, ref = reference
    mesh = make_mesh(**axes)
    model = cj.load(ckpt / source, mesh=mesh)
    out = model.logits(ids, pixel_values=pixels)
    text = ~np.isin(np.arange(ref.shape[-1]), model.config.image_vocab.image_token_ids)
    assert np.abs(out[..., text] - ref[..., text]).max() < 1e-5 * np.abs(ref[..., text]).max()
    q = model.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape
    expected = {"data": (None, None, None), "fsdp": ("fsdp", None, None), "tensor": (None, "tensor", None)}
    if len(axes) == 1:
        assert tuple(q.sharding.spec) == expected[next(iter(axes))]
    if axes.get("tensor", 1) > 1:
        assert tuple(model.params["lm_head"].sharding.spec) == ("fsdp" if axes.get("fsdp", 1) > 1 else None, "tensor")
        assert tuple(model.params["layers_1"]["mlp"]["down_proj"]["kernel"].sharding.spec)[0] == "tensor"


def test_fsdp8_per_device_bytes(ckpt):
    model = cj.load(ckpt / "orbax", mesh=make_mesh(fsdp=8))
    decoder = {k: v for k, v in model.params.items() if k != "vqmodel"}
    leaves = jax.tree.leaves(decoder)
    split = [x for x in leaves if any(ax is not None for ax in x.sharding.spec)]
    whole = [x for x in leaves if all(ax is None for ax in x.sharding.spec)]
    # every matrix (embeddings, projections, LM head) is split over fsdp
    assert sum(x.nbytes for x in split) > 0.97 * sum(x.nbytes for x in leaves)
    per_device = bytes_per_device(decoder)
    assert len(per_device) == 8
    want = sum(x.nbytes for x in split) / 8 + sum(x.nbytes for x in whole)
    assert set(per_device.values()) == {want}  # exactly 1/8 of the split params per device


def test_greedy_generate_on_mesh_equals_one_device(ckpt, reference):
    model1, ids, pixels, _ = reference
    want = model1.generate(ids, pixel_values=pixels, max_new_tokens=6)
    for axes in (dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)):
        model = cj.load(ckpt / "orbax", mesh=make_mesh(**axes))
        np.testing.assert_array_equal(model.generate(ids, pixel_values=pixels, max_new_tokens=6), want)


def test_indivisible_dims_fall_back_to_replication():
    mesh = make_mesh(data=2, tensor=4)
    # 6 heads on tensor=4: replicated along that dim instead of an error.
    assert tuple(logical_to_spec(("embed", "heads", "head_dim"), (64, 6, 16), mesh)) == (None, None, None)
    assert tuple(logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh)) == (None, "tensor", None)
    # a batch of 3 on data=2 is replicated; a batch of 4 is split
    assert tuple(logical_to_spec(("batch", None), (3, 5), mesh)) == (None, None)
    assert tuple(logical_to_spec(("batch", None), (4, 5), mesh)) == ("data", None)


def test_odd_batch_on_mesh_still_correct(ckpt, reference):
    model1, ids, pixels, ref = reference
    model = cj.load(ckpt / "hf", mesh=make_mesh(data=2, fsdp=2, tensor=2))
    out = model.logits(ids[:3], pixel_values=pixels[:3])
    np.testing.assert_allclose(out, ref[:3], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_make_mesh_errors():
    with pytest.raises(ChameleonError, match=r"data\*fsdp\*tensor = 6 but there are 8 devices"):
        make_mesh(data=2, tensor=3)
    with pytest.raises(ChameleonError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    assert make_mesh(data=2, fsdp=-1).shape == {"data": 2, "fsdp": 4, "tensor": 1}


def test_replicated_dims_warn_once_naming_params_and_bytes():
    """Abstract (no memory): 4 kv heads of a 7B-shaped config on tensor=8 cannot be split; one
    warning names each such param and the bytes per device it costs over an even split."""
    import warnings

    from chameleon_jax.sharding import param_shardings

    config = cj.load_preset("chameleon-7b").replace(num_hidden_layers=2, num_key_value_heads=8, vq_config=None)
    mesh = make_mesh(data=1, fsdp=1, tensor=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param_shardings(config, mesh)  # 32 heads, 8 kv heads: everything divides, no warning
    config = config.replace(num_key_value_heads=4)
    with pytest.warns(UserWarning) as record:
        param_shardings(config, mesh)
    assert len(record) == 1
    msg = str(record[0].message)
    # k_proj [4096, 4, 128] fp32 = 8 MiB: replicated over tensor=8 instead of split, +7 MiB a device
    assert "sharding: 8 param(s) have a dim their mesh axes do not divide" in msg
    assert "layers_0/self_attn/k_proj/kernel: dim 1 (4) over tensor=8: +7.0 MiB per device" in msg
    assert "layers_1/self_attn/v_proj/kernel" in msg and "layers_0/self_attn/k_norm/scale" in msg
    assert "(+28.0 MiB per device in all, at float32)" in msg
