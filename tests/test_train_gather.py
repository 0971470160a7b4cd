"""The train step's per-layer FSDP gathers (unrolled and scanned layers, full and LoRA) equal the step
without gathers; bf16 Adam moments; the Trainer's scanned layout converts to and from checkpoints."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from chameleon_jax.config import ChameleonConfig
from chameleon_jax.model import Chameleon, init_params
from chameleon_jax.sharding import make_mesh, param_shardings
from chameleon_jax.training.config import TrainConfig
from chameleon_jax.training.lora import LoraConfig
from chameleon_jax.training.step import _tree, convert_layout, init_train_state, make_train_step
from conftest import make_vocabulary_map

LAYERS = 4


@pytest.fixture(scope="module")
def model():
    config = ChameleonConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, vq_config=None,
                             vocabulary_map=make_vocabulary_map(256))
    shapes = nn.unbox(init_params(config, jax.random.key(3), abstract=True, vq_decoder=False))
    rng = np.random.default_rng(0)  # random values (norms near 1), drawn here: no init compile
    flat = {k: (1.0 if "norm" in k and "scale" in k else 0.0) + rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
    ids = rng.integers(72, 256, (1, 4, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 1, :3] = 0  # a left-padded row
    labels = np.where(mask > 0, ids, -100)
    return config, flat, {"input_ids": ids, "labels": labels,
                                                                  "attention_mask": mask}


def _run(model, sizes, scan=False, lora=False, steps=1, memory=False, remat="full", **kw):
    """``steps`` train steps on a (data, fsdp, tensor) mesh -> (per-layer params as numpy, losses[, temp bytes]).
    Adam with a huge eps and learning rate is plain SGD at rate 1 here (update = -g / (|g| + eps) * lr), so
    the params' changes are the gradients themselves."""
    config, flat, batch = model
    mesh = make_mesh(*sizes, devices=jax.devices()[: math.prod(sizes)])
    tc = TrainConfig(demo=True, batch_size=4, max_length=8, steps=10, remat=remat, scan_layers=scan,
                     learning_rate=1e4, adam_eps=1e4, max_grad_norm=0.0,
                     lora=LoraConfig(rank=4, targets=("all",)) if lora else None, **kw)
    flat_sh = param_shardings(config, mesh, {k: v.shape for k, v in flat.items()})
    base = _tree({k: jax.device_put(v, flat_sh[k]) for k, v in flat.items()})
    state, frozen, shardings, frozen_sh, tx = init_train_state(tc, base, _tree(flat_sh), mesh, LAYERS)
    step = make_train_step(Chameleon(config, remat_policy=remat, scan_layers=scan), tx, tc, shardings, frozen_sh,
                           mesh, tc.lora)
    rows = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
    placed = {k: jax.device_put(v, rows) for k, v in batch.items()}
    temp = step.lower(state, frozen, placed).compile().memory_analysis().temp_size_in_bytes if memory else None
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, placed)
        losses.append(float(metrics["loss"]))
    if tc.offload_optimizer:  # the moments live in host memory between steps
        assert {x.sharding.memory_kind for x in jax.tree.leaves(state["opt_state"])} == {"pinned_host"}
    out = jax.device_get(convert_layout(state["params"], LAYERS, False))
    return traverse_util.flatten_dict(out, sep="/"), losses, temp


def _close(out, ref, start=None, tol=1e-6):
    """Params within ``tol`` of the reference (relative to each leaf's largest entry); with ``start``, the
    changes are checked to be real (the gradients, ~1e-2 here, > 1e-3 of the leaf, far above the tolerance)."""
    for path in ref:
        a, b = np.asarray(out[path]), np.asarray(ref[path])
        assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-30), path
        if start is not None:
            assert np.abs(b - start[path]).max() > 1e-3 * np.abs(b).max(), path


def test_per_layer_gather_step_equals_the_step_without_gathers(model):
    """fsdp=4, tensor=2 (each layer all-gathered inside its remat region, in the scan body) against one
    device, where nothing is gathered: the previous step's numbers."""
    _, flat, _ = model
    ref, ref_losses, _ = _run(model, (1, 1, 1))
    # (the unrolled layers' per-layer gather: test_train.py::test_sharded_step_matches_single_device)
    scanned, losses, temp = _run(model, (1, 4, 2), scan=True, memory=True)
    # The sharded sums run in another order: 1.0-1.2e-6 of a leaf's largest entry measured (the unrolled
    # sharded step too, with the 5-D and the 4-D attention alike), so 1e-6 sat on the noise floor.
    _close(scanned, ref, flat, tol=1e-5)
    assert np.allclose(losses, ref_losses, rtol=1e-6)
    # One layer's weights are gathered at a time: the temporaries stay below what all layers' gathered
    # fp32 weights alone would take (per device: the layers split over tensor=2 only).
    layer_bytes = sum(v.nbytes for k, v in flat.items() if k.startswith("layers_")) // 2
    assert temp < layer_bytes, (temp, layer_bytes)  # 0.67 MB here; 3.1 MB when the whole tree was gathered


def test_per_layer_lora_merge_and_gather_equal_the_step_without_gathers(model):
    """LoRA pairs merged per layer inside the scan (and the optimizer state offloaded to host memory)."""
    ref, ref_losses, _ = _run(model, (1, 1, 1), lora=True)
    out, losses, _ = _run(model, (1, 4, 2), scan=True, lora=True, offload_optimizer=True)
    _close(out, ref, tol=1e-5)  # 1.3e-6 seen: the sharded sums run in another order
    assert np.allclose(losses, ref_losses, rtol=1e-6)


def test_lora_adapters_train_under_remat(model):
    """The per-layer LoRA merge runs inside the remat region too (it once got dropped when the layer class
    was wrapped in nn.remat): remat full trains the adapters exactly like no remat, and they do move."""
    none, none_losses, _ = _run(model, (1, 1, 1), lora=True, steps=2, remat="none")
    full, full_losses, _ = _run(model, (1, 1, 1), lora=True, steps=2, remat="full")
    _close(full, none, tol=1e-5)  # recomputation fuses differently: ~1e-6 apart
    assert np.allclose(full_losses, none_losses, rtol=1e-5)
    assert none_losses[1] != none_losses[0]
    moved = [p for p, v in none.items() if p.endswith("/b") and np.abs(np.asarray(v)).max() > 0]  # B starts at 0
    assert moved, sorted(none)[:5]


def test_query_chunked_attention_equals_whole_attention(model):
    """attention_chunk: logits and gradients equal the all-queries attention (a chunk that does not divide
    the length, a left-padded row whose first queries see no key)."""
    from chameleon_jax.model.decoder import causal_mask, default_positions
    from chameleon_jax.model.loss import model_loss

    config, flat, batch = model
    config = config.replace(num_hidden_layers=1)  # one layer: the attention is what is compared
    params = _tree({k: v for k, v in flat.items() if not k.startswith("layers_") or k.startswith("layers_0/")})
    ids, mask = jnp.asarray(batch["input_ids"][0]), jnp.asarray(batch["attention_mask"][0])
    labels = jnp.asarray(batch["labels"][0])

    def logits(m, p):
        return m.apply({"params": p}, ids, default_positions(mask), causal_mask(mask))[0]

    def grads(m):
        return jax.jit(jax.grad(lambda p: model_loss(m, p, ids, labels, mask)[0]))(params)

    whole, chunked = Chameleon(config), Chameleon(config, remat_policy="full", attention_chunk=3)
    ref, out = jax.jit(lambda p: logits(whole, p))(params), jax.jit(lambda p: logits(chunked, p))(params)
    finite = ref > -1e30
    assert float(jnp.abs(out - ref)[finite].max()) <= 1e-6 * float(jnp.abs(ref)[finite].max())
    # gradients: fp32 sums taken in another order (by query block), so 1e-5 of each leaf's largest entry
    for a, b in zip(jax.tree.leaves(grads(chunked)), jax.tree.leaves(grads(whole))):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(b).max()), 1e-30)


def test_trainer_scan_layers_trains_alike_and_checkpoints_interchange(tmp_path):
    """scan_layers: the state holds layers [L, ...]; params() is the per-layer tree; the numbers equal the
    per-layer trainer's; a checkpoint of either layout resumes in the other."""
    from chameleon_jax.training import Trainer
    from train_utils import setup, train_config

    model, proc, data = setup(tmp_path)
    kw = dict(steps=4, batch_size=2, remat="full", weight_decay=0.1, max_grad_norm=0.05)  # decay and clip act
    per = Trainer(train_config(tmp_path / "p", data, **kw), model, proc, log=None)
    scan = Trainer(train_config(tmp_path / "s", data, scan_layers=True, **kw), model, proc, log=None)
    assert "layers" in scan.state["params"] and "layers_0" not in scan.state["params"]
    for t in (per, scan):
        t.run(max_steps=2)
    pa = traverse_util.flatten_dict(jax.device_get(per.params()), sep="/")
    pb = traverse_util.flatten_dict(jax.device_get(scan.params()), sep="/")
    assert sorted(pa) == sorted(pb) and "layers_0/self_attn/q_proj/kernel" in pb
    _close(pb, pa, tol=1e-5)  # Adam steps: fp32 noise of other reduction orders, as in test_train.py
    # the scanned run's checkpoint (step 2) resumes with scan_layers off, and the per-layer one with it on
    resumed = Trainer(train_config(tmp_path / "s", data, **kw), model, proc, log=None)
    assert resumed.step == 2 and "layers_0" in resumed.state["params"]
    back = Trainer(train_config(tmp_path / "p", data, scan_layers=True, **kw), model, proc, log=None)
    assert back.step == 2 and "layers" in back.state["params"]
    for t in (resumed, back, per):
        t.run(max_steps=1)
    final = traverse_util.flatten_dict(jax.device_get(per.params()), sep="/")
    for t in (resumed, back):
        _close(traverse_util.flatten_dict(jax.device_get(t.params()), sep="/"), final, tol=1e-5)  # 3 Adam steps
    for t in (per, scan, resumed, back):
        t.close()


def test_bf16_optimizer_moments():
    """optimizer_dtype=bfloat16: Adam's m and v are stored in bf16 (half the bytes); the updates equal
    float32 Adam's within bf16 rounding of the moments, and the step count stays an integer."""
    from chameleon_jax.training.step import make_optimizer

    params = {"w": jnp.asarray(np.random.default_rng(1).normal(0, 1, (8, 16)), jnp.float32)}
    grads = [{"w": jnp.asarray(np.random.default_rng(2 + i).normal(0, 1, (8, 16)), jnp.float32)} for i in range(3)]
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx = make_optimizer(TrainConfig(demo=True, optimizer_dtype=dtype, learning_rate=1e-2, max_grad_norm=0.0))
        state, p = jax.jit(tx.init)(params), params
        update = jax.jit(lambda g, s, p: (lambda u, s: (jax.tree.map(jnp.add, p, u), s))(*tx.update(g, s, p)))
        for g in grads:
            p, state = update(g, state, p)
        floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.dtype(dtype) for x in floats)
        assert any(x.dtype == jnp.int32 for x in jax.tree.leaves(state))
        out[dtype] = np.asarray(p["w"])
    diff = np.abs(out["bfloat16"] - out["float32"]).max()
    assert 0 < diff < 1e-2 * 3 * 1e-2  # within ~1% of the 3 steps' movement (lr 1e-2 each)
    with pytest.raises(Exception, match="optimizer_dtype"):
        TrainConfig(demo=True, optimizer_dtype="float16")
