"""The memory planner: per-device argument bytes match real sharded arrays (cpu:8); TPU compile (libtpu)."""

from __future__ import annotations

import importlib.util

import jax
import pytest
from flax import linen as nn

from chameleon_jax.config import ChameleonConfig
from chameleon_jax.errors import ChameleonError
from chameleon_jax.model import init_params
from chameleon_jax.plan import parse_mesh, per_device_bytes, plan
from chameleon_jax.sharding import make_mesh, param_shardings
from chameleon_jax.training.step import _tree
from conftest import make_vocabulary_map

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _config():
    return ChameleonConfig(**SMALL, vq_config=None, vocabulary_map=make_vocabulary_map(256))


def test_planner_param_bytes_match_real_sharded_arrays():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 CPU devices (JAX_NUM_CPU_DEVICES=8)")
    config = _config()
    res = plan(config, "cpu:8", {"fsdp": 4, "tensor": 2}, task="train", seq=16, batch=4, dtype="float32")
    mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
    flat = {k: v for k, v in __import__("flax").traverse_util.flatten_dict(
        nn.unbox(init_params(config, jax.random.key(0), vq_decoder=False)), sep="/").items()}
    sh = param_shardings(config, mesh, {k: v.shape for k, v in flat.items()})
    real = _tree({k: jax.device_put(v, sh[k]) for k, v in flat.items()})
    device0 = jax.devices()[0]
    real_bytes = sum(s.data.nbytes for x in jax.tree.leaves(real) for s in x.addressable_shards
                     if s.device == device0)
    assert res.params_bytes == real_bytes == per_device_bytes(real)
    # Adam m and v (fp32, sharded like the params) plus the step counters
    assert 2 * real_bytes <= res.optimizer_bytes <= 2 * real_bytes + 64
    # XLA's own argument figure: the state plus the (1, 4, 16) int32 batch of three arrays, 1 row per device
    batch = 3 * 1 * 16 * 4
    assert abs(res.argument_bytes - (res.params_bytes + res.optimizer_bytes + batch)) <= 64 and res.temp_bytes > 0


def test_bad_plan_arguments():
    with pytest.raises(ChameleonError, match="--mesh"):
        parse_mesh("fsdp=x")
    with pytest.raises(ChameleonError, match="--topology"):
        plan(_config(), "v9z:2x2", {"fsdp": 4})
    with pytest.raises(ChameleonError, match="--task"):
        plan(_config(), "cpu:1", {}, task="bogus")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'chameleon-jax[tpu-aot]'): TPU compile not checked")
@pytest.mark.parametrize("task,scan", [("train", False), ("generate", False), ("generate", True)])
def test_compiles_for_tpu_v5e_2x4(task, scan):
    res = plan(_config(), "v5e:2x4", {"fsdp": 4, "tensor": 2}, task=task, seq=32, batch=4, scan=scan)
    assert res.devices == 8 and res.total_bytes > 0 and res.fits()


def test_scanned_decode_step_holds_the_same_bytes():
    """generate --scan: params and KV cache stacked, the same bytes per device as the per-layer tree, and
    the decode step reads about what the unrolled one reads (the stacked cache is written in place)."""
    per, scan = (plan(_config(), "cpu:1", {}, task="generate", seq=64, batch=2, dtype="float32", scan=s)
                 for s in (False, True))
    assert (scan.params_bytes, scan.cache_bytes) == (per.params_bytes, per.cache_bytes) and scan.cache_bytes > 0
    assert scan.bytes_accessed <= 1.5 * per.bytes_accessed, (scan.bytes_accessed, per.bytes_accessed)


def test_plan_cli_names_the_flag(capsys):
    from chameleon_jax.cli import main

    assert main(["plan", "--model", "7b", "--topology", "v5e"]) == 2
    assert "--topology" in capsys.readouterr().err
    assert main(["plan", "--model", "7b", "--topology", "cpu:1", "--mesh", "fsdp=two"]) == 2
    assert "--mesh" in capsys.readouterr().err


def test_plan_model_may_be_a_config_json(tmp_path, capsys):
    """--model takes a config.json file, as its --help says (not only a preset name or a directory)."""
    from chameleon_jax import cli
    from chameleon_jax.demo import tiny_config

    path = tmp_path / "config.json"
    tiny_config().to_json_file(path)
    assert cli.main(["plan", "--model", str(path), "--topology", "cpu:1", "--mesh", "fsdp=1", "--task", "generate",
                     "--seq", "32", "--batch", "1", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()


def test_plan_image_generation_counts_three_cache_rows_per_prompt():
    """generate --image: the whole image-mode loop compiles; its KV cache holds guidance's 3 rows per prompt
    (full, image, unconditioned), each with slots for the prompt bucket and the image's tokens."""
    from chameleon_jax.config import VQConfig
    from chameleon_jax.generation import bucket_length
    from chameleon_jax.plan import plan_image_generation

    vq = VQConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=8, base_channels=32,
                  channel_multiplier=(1, 2), num_res_blocks=1)
    # no vocabulary map, as in the 7b/30b presets (the tokenizer holds it): the planner lays out the image codes
    config = ChameleonConfig(**SMALL, vq_config=vq, max_position_embeddings=256)
    res = plan_image_generation(config, "cpu:1", {}, prompt=20, batch=2, dtype="float32")
    n = vq.tokens_per_image
    slots = bucket_length(bucket_length(20) + n)
    head_dim = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    k_and_v = 2 * SMALL["num_hidden_layers"] * (2 * 3) * slots * SMALL["num_key_value_heads"] * head_dim * 4
    assert res.cache_bytes == k_and_v
    assert res.task == "generate (image)" and res.bytes_accessed > 0
    assert res.total_bytes > res.argument_bytes >= res.params_bytes + res.cache_bytes
    with pytest.raises(ChameleonError, match="--mesh"):
        plan_image_generation(config, "cpu:1", {"fsdp": 2})


def test_plan_image_flag_needs_task_generate(capsys):
    from chameleon_jax.cli import main

    assert main(["plan", "--model", "7b", "--topology", "cpu:1", "--mesh", "fsdp=1", "--task", "train", "--image"]) == 2
    assert "--image" in capsys.readouterr().err
