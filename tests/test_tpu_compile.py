"""The whole generate loop (text and image mode) and the train step of a small config lower and compile for
TPU v5e:2x4 devices (libtpu's ahead-of-time compiler, abstract params with fsdp x tensor shardings), so a TPU
lowering failure is caught on a CPU host."""

from __future__ import annotations

import importlib.util

import jax
import pytest

from chameleon_jax.config import ChameleonConfig, VQConfig
from chameleon_jax.generation import GenerationSettings
from chameleon_jax.generation.aot import abstract_params, compile_generate
from chameleon_jax.generation.image import ImageSettings
from chameleon_jax.sharding import make_mesh
from conftest import make_vocabulary_map

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu not installed (pip install 'chameleon-jax[tpu-aot]'): TPU compile not checked")


def _config():
    vq = VQConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=8, base_channels=32,
                  channel_multiplier=(1, 2), num_res_blocks=1)
    return ChameleonConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3, vq_config=vq,
                           vocabulary_map=make_vocabulary_map(256), dtype="bfloat16")


@pytest.fixture(scope="module")
def tpu():
    from chameleon_jax.plan import topology_devices

    devices, _ = topology_devices("v5e:2x4")
    mesh = make_mesh(1, 4, 2, devices=devices)
    config = _config()
    return config, mesh, abstract_params(config, mesh, "bfloat16")


def _check(out, mesh):
    for name in ("blocks", "prefill", "decode"):
        shardings = jax.tree.leaves(out[name].input_shardings)
        assert shardings and all(s.device_set == set(mesh.devices.flat) for s in shardings), name
        assert {d.platform for d in mesh.devices.flat} == {"tpu"}
        assert out[name].memory_analysis().temp_size_in_bytes >= 0
    hlo = out["decode"].as_text()
    assert "while" in hlo  # the decode loop is one on-device program, not a host loop


# every processor of the loop: repetition penalty, min-new-tokens, temperature, top-k, top-p, a draw
TEXT = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=5, top_p=0.9,
                          repetition_penalty=1.2, min_new_tokens=2)


@needs_libtpu
def test_text_generate_compiles_for_tpu(tpu):
    config, mesh, params = tpu
    out = compile_generate(config, params, mesh, batch=4, prompt_length=24, settings=TEXT)
    assert out["plan"].mode.use_penalty and out["plan"].rows == 4
    _check(out, mesh)


@needs_libtpu
def test_scanned_text_generate_compiles_for_tpu():
    """load(..., scan_layers=True)'s programs: stacked params and KV cache [L, B, K, S, Dh], the cache's
    batch and kv-head axes sharded as the per-layer cache's are."""
    from chameleon_jax.plan import topology_devices

    devices, _ = topology_devices("v5e:2x4")
    mesh = make_mesh(1, 4, 2, devices=devices)
    config = _config()
    params = abstract_params(config, mesh, "bfloat16", scan_layers=True)
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == config.num_hidden_layers
    out = compile_generate(config, params, mesh, batch=4, prompt_length=24, settings=TEXT)
    _check(out, mesh)
    k = out["abstract"]["state"]["cache"]["layers"]["k"]
    assert k.shape[:3] == (config.num_hidden_layers, 4, config.num_key_value_heads)
    per_device = k.sharding.shard_shape(k.shape)
    assert per_device[0] == config.num_hidden_layers and per_device[1] * per_device[2] < 4 * config.num_key_value_heads


@needs_libtpu
def test_image_generate_with_guidance_compiles_for_tpu(tpu):
    """Image mode with images in the prompt: the VQ-VAE encoder in the prefill, the image stream of CFG."""
    config, mesh, params = tpu
    image, loop = ImageSettings().validate(config, 24)
    assert image.streams == 3  # Meta's three-stream classifier-free guidance
    out = compile_generate(config, params, mesh, batch=4, prompt_length=24, settings=loop, modality="image",
                           streams=3, guidance=(image.guidance_scale_text, image.guidance_scale_image), images=4)
    assert out["plan"].rows == 12 and out["plan"].max_new_tokens == config.vq_config.tokens_per_image
    _check(out, mesh)


def test_compiled_programs_are_the_ones_generate_runs():
    """On CPU devices: the programs compile_generate compiles, run on real params, give the tokens
    ChameleonModel.generate gives (so the TPU tests above compile what generate runs)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 CPU devices (JAX_NUM_CPU_DEVICES=8)")
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import chameleon_jax as cj
    from chameleon_jax.sharding import batch_sharding

    config = _config().replace(dtype="float32")
    mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
    abstract = abstract_params(config, mesh)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jax.device_put(rng.normal(0, 0.3, a.shape).astype(a.dtype), a.sharding),
                          abstract)
    model = cj.ChameleonModel(config, params, mesh=mesh)
    vocab = config.image_vocab
    text = [i for i in range(4, config.vocab_size) if i != vocab.image_token_id and not vocab.is_image_token(i)]
    ids = rng.choice(text, (4, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    kw = dict(max_new_tokens=TEXT.max_new_tokens, do_sample=True, temperature=TEXT.temperature, top_k=TEXT.top_k,
              top_p=TEXT.top_p, repetition_penalty=TEXT.repetition_penalty, min_new_tokens=TEXT.min_new_tokens)
    expected = model.generate(ids, mask, **kw)

    out = compile_generate(config, abstract, mesh, batch=4, prompt_length=16, settings=TEXT)
    gen = model._generator
    knobs = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in gen.knobs(TEXT).items()}
    ids_d, mask_d = (jax.device_put(a, batch_sharding(mesh, a.shape)) for a in (ids, mask))
    blocks = out["blocks"](params)
    state = out["prefill"](params, blocks, ids_d, mask_d, None, None, knobs)
    state = out["decode"](params, blocks, state, knobs, jax.device_put(np.int32(TEXT.max_new_tokens),
                                                                     NamedSharding(mesh, P())))
    got = np.asarray(jax.device_get(state["tokens"]))
    assert got.shape == expected.shape == (4, TEXT.max_new_tokens)
    np.testing.assert_array_equal(got, expected)
