"""Fine-tuning: overfitting (full and LoRA), exact resume, sharded step, accumulation, LoRA merge."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import chameleon_jax as cj
from chameleon_jax.training import lora as lora_lib
from chameleon_jax.training import Trainer
from train_utils import setup, train_config, write_data


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(dict(tree)), sep="/")


def _leaves(tree):
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-30))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model, proc, data = setup(root)
    return root, model, proc, data


def test_overfit_full(env):
    root, model, proc, data = env
    tc = train_config(root / "full", data, steps=40, batch_size=4, learning_rate=1e-2, warmup_steps=1)
    losses = [h["loss"] for h in Trainer(tc, model, proc, log=None).run()]
    assert losses[-1] < 0.1 * losses[0], losses


def test_overfit_lora_base_unchanged_and_merge(env):
    root, model, proc, data = env
    # A random tiny model's logits are bounded by its final RMSNorm and 0.02-std LM head; a frozen head
    # that small can't reach confident predictions, so give it a trained model's logit scale.
    model = cj.ChameleonModel(model.config, {**model.params, "lm_head": model.params["lm_head"] * 10})
    before = _flat(model.params)
    tc = train_config(root / "lora", data, steps=40, batch_size=4, learning_rate=1e-2, warmup_steps=1,
                      lora={"rank": 8, "alpha": 16, "targets": ["all"]})
    tr = Trainer(tc, model, proc, log=None)
    losses = [h["loss"] for h in tr.run()]
    assert losses[-1] < 0.1 * losses[0], losses
    # only adapters were trained: the frozen base is bit-identical to the model's params
    for path, x in _flat(tr.frozen).items():
        np.testing.assert_array_equal(x, before[path], err_msg=path)
    for path, x in _flat(model.params).items():  # and the caller's params were not donated
        np.testing.assert_array_equal(x, before[path], err_msg=path)
    n_adapter = lora_lib.num_params(tr.state["params"])
    n_opt = sum(x.size for x in jax.tree.leaves(tr.state["opt_state"]) if x.ndim)
    assert n_opt == 2 * n_adapter  # AdamW moments for the adapters only

    # merged inference params: logits equal base+adapters (the training forward) ...
    merged = tr.model(merged=True)
    ids = np.array([[1] + list(range(100, 130))], np.int32)
    base_plus = cj.ChameleonModel(merged.config, {**lora_lib.apply(tr.frozen, tr.state["params"], tr.lora),
                                                  "vqmodel": tr.params()["vqmodel"]})
    np.testing.assert_allclose(merged.logits(ids), base_plus.logits(ids), rtol=1e-5, atol=1e-5)
    # ... and differ from the base model's
    assert np.abs(merged.logits(ids) - model.logits(ids)).max() > 1e-3
    # a merged kernel is W + (alpha/r) a@b, checked against an independent numpy product
    ad = _flat(tr.state["params"])
    w = before["layers_1/mlp/down_proj/kernel"]
    a, b = ad["layers_1/mlp/down_proj/a"], ad["layers_1/mlp/down_proj/b"]
    got = _flat(merged.params)["layers_1/mlp/down_proj/kernel"]
    np.testing.assert_allclose(got, w + 2.0 * a @ b, rtol=1e-5, atol=1e-6)

    # adapter files round-trip; the training checkpoint holds adapters + optimizer state only
    path = lora_lib.save_adapters(str(root / "adapters"), tr.state["params"], tr.lora)
    loaded, lcfg = lora_lib.load_adapters(path)
    assert lcfg == tr.lora
    for k, v in _flat(loaded).items():
        np.testing.assert_array_equal(v, ad[k])
    ckpt = root / "lora" / "out" / "checkpoints" / "40" / "state"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    base_bytes = sum(x.nbytes for x in before.values())
    assert size < base_bytes / 2, (size, base_bytes)


def test_exact_resume(env):
    root, model, proc, data = env
    kw = dict(steps=6, batch_size=1, grad_accum=2, length_grouping=2, checkpoint_every=3, keep_checkpoints=1)
    full = Trainer(train_config(root / "a", data, **kw), model, proc, log=None)
    full.run()
    first = Trainer(train_config(root / "b", data, **kw), model, proc, log=None)
    first.run(max_steps=3)
    assert first.step == 3 and first.loader.state_dict()["epoch"] == 1
    del first
    # a save that died half-way (Orbax writes to a temp dir, renamed when complete) is not resumed from
    partial = root / "b" / "out" / "checkpoints" / "5.orbax-checkpoint-tmp-1700000000" / "state"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("x")
    # a run killed after logging steps past its last checkpoint (and mid-line): the resumed run redoes those
    # steps, and the metrics file must hold each step once (kill test regression, tests/test_kill.py)
    with open(root / "b" / "out" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n" + '{"step": 5, "lo')
    logs = []
    resumed = Trainer(train_config(root / "b", data, **kw), model, proc, log=logs.append)  # fresh objects
    assert resumed.step == 3 and "resumed" in logs[0]
    resumed.run()
    got = _leaves(resumed.state)
    for path, x in _leaves(full.state).items():  # params, optimizer state, step and RNG
        np.testing.assert_array_equal(x, got[path], err_msg=path)
    assert [h["loss"] for h in full.history[3:]] == [h["loss"] for h in resumed.history]
    assert full.loader.state_dict() == resumed.loader.state_dict()
    # metrics JSONL holds every step once across both runs, with the same losses
    lines = [json.loads(x) for x in open(root / "b" / "out" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == [h["loss"] for h in full.history]
    # keep_checkpoints=1: only the last remains; the half-written one was cleaned up
    assert os.listdir(root / "b" / "out" / "checkpoints") == ["6"]


def test_sharded_step_matches_single_device(env):
    assert len(jax.devices()) == 8
    root, model, proc, _ = env
    data = write_data(root / "eight", 8, seed=1)
    single = Trainer(train_config(root / "one", data, batch_size=8), model, proc, log=None)
    mesh = {"data": 2, "fsdp": 4, "tensor": 1}
    sharded = Trainer(train_config(root / "mesh", data, batch_size=8, mesh=mesh), model, proc, log=None)
    # params, grads' optimizer moments: sharded alike over fsdp
    q = sharded.state["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert "fsdp" in str(q.sharding.spec) and len(q.sharding.device_set) == 8
    mu = sharded.state["opt_state"][1][0].mu["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding == q.sharding
    a, b = single.run(max_steps=1)[0], sharded.run(max_steps=1)[0]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    sa, sb = _flat(single.state["params"]), _flat(sharded.state["params"])
    for path in sa:
        assert _rel(sb[path], sa[path]) < 1e-5, path


def test_grad_accum_and_remat_match_one_big_batch(env):
    root, model, proc, data = env
    big = Trainer(train_config(root / "big", data, batch_size=4, grad_accum=1), model, proc, log=None)
    acc = Trainer(train_config(root / "acc", data, batch_size=2, grad_accum=2, remat="full"), model, proc,
                  log=None)
    batch = next(big.loader)
    step_batch = {k: (v.reshape(2, 2, -1) if isinstance(v, np.ndarray) and v.ndim == 3 else v)
                  for k, v in batch.items()}
    ma = big.train_step(big.prepare(batch))
    mb = acc.train_step(acc.prepare(step_batch))
    assert abs(float(ma["loss"]) - float(mb["loss"])) < 1e-5 * float(ma["loss"])
    assert abs(float(ma["grad_norm"]) - float(mb["grad_norm"])) < 1e-4 * float(ma["grad_norm"])
    pa, pb = _flat(big.state["params"]), _flat(acc.state["params"])
    for path in pa:
        assert _rel(pb[path], pa[path]) < 1e-5, path


def test_cli_train_progress_metrics_and_resume_in_a_new_process(env, capsys):
    import subprocess
    import sys

    from chameleon_jax.checkpoint.hf import save_hf
    from chameleon_jax.cli import main

    root, model, proc, data = env
    ckpt = root / "cli-model"
    save_hf(model.params, model.config, str(ckpt),
            extra_files=[str(root / "tok" / f) for f in os.listdir(root / "tok")])
    cfg = root / "cli.json"
    cfg.write_text(json.dumps(train_config(root / "cli", data, model=str(ckpt)).to_dict()))
    common = ["train", "--config", str(cfg), "--set", "steps=3", "--set", "lora.rank=2"]
    assert main(common + ["--set", f"output_dir={root / 'cli-a'}"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out and "loss" in out and "tok/s" in out and "lr" in out
    # interrupted after 1 step, then resumed by another process: the same metrics
    assert main(common + ["--set", f"output_dir={root / 'cli-b'}", "--max-steps", "1"]) == 0
    env_vars = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "chameleon_jax.cli"] + common
                         + ["--set", f"output_dir={root / 'cli-b'}"], capture_output=True, text=True, env=env_vars)
    assert run.returncode == 0, run.stderr
    assert "resumed from" in run.stdout and "step 3/3" in run.stdout
    a = [json.loads(x) for x in open(root / "cli-a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(root / "cli-b" / "metrics.jsonl")]
    assert [r["step"] for r in b] == [1, 2, 3] and all(r["tokens_per_s"] > 0 for r in b)
    assert [(r["loss"], r["grad_norm"], r["epoch"], r["index"]) for r in a] == \
        [(r["loss"], r["grad_norm"], r["epoch"], r["index"]) for r in b]
    assert main(["train", "--config", str(cfg), "--set", "bogus_key=1"]) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_bf16_compute_keeps_fp32_master_params(env):
    from chameleon_jax.model.loss import forward_loss_sums

    root, model, proc, data = env
    tc = train_config(root / "bf16", data, batch_size=4, compute_dtype="bfloat16")
    tr = Trainer(tc, model, proc, log=None)
    batch = tr.prepare(next(tr.loader))
    m = tr.train_step(batch)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(tr.state["params"]))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(tr.state["opt_state"]) if x.ndim)
    # the bf16 loss is close to the fp32 one on the same batch (labels as the step resolved them)
    from chameleon_jax.model.loss import resolve_labels

    fp32 = cj.ChameleonModel(model.config, model.params).module
    b = jax.tree.map(lambda x: x[0], batch)
    labels = resolve_labels(b["labels"], b["input_ids"], model.config, loss_on="text")
    nll, _, n = jax.jit(
        lambda p: forward_loss_sums(fp32, p, b["input_ids"], labels, b["attention_mask"]))(model.params)
    assert abs(float(m["loss"]) - float(nll / n)) < 2e-2 * float(nll / n)
    assert float(m["loss"]) != float(nll / n)  # bf16 matmuls really ran


def test_7b_train_state_shards_evenly_over_fsdp():
    """Abstract (no memory): params, grads' AdamW moments of Chameleon-7B over fsdp=8."""
    from chameleon_jax.checkpoint.hf import expected_params
    from chameleon_jax.sharding import param_shardings
    from chameleon_jax.training.config import TrainConfig
    from chameleon_jax.training.step import build_mesh, make_optimizer, state_shardings

    config = cj.load_preset("chameleon-7b")
    mesh = build_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    shapes = {k: v for k, v in expected_params(config).items() if not k.startswith("vqmodel/")}
    sh = param_shardings(config, mesh)
    abstract = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in shapes.items()})
    tree_sh = traverse_util.unflatten_dict({tuple(k.split("/")): sh[k] for k in shapes})
    tx = make_optimizer(TrainConfig(model="m", data="d", weight_decay=0.1))
    state_sh = state_shardings(tx, abstract, tree_sh, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    per_device, total = 0, 0
    shardings = jax.tree.leaves((state_sh["params"], state_sh["opt_state"]))
    for x, s in zip(jax.tree.leaves((abstract, abstract_opt)), shardings):
        nbytes = int(np.prod(x.shape)) * x.dtype.itemsize
        shards = {tuple((i.start, i.stop) for i in idx) for idx in s.devices_indices_map(x.shape).values()}
        total += nbytes
        per_device += nbytes // len(shards)
    n_params = sum(int(np.prod(v.shape)) for v in shapes.values())
    assert 6.5e9 < n_params < 7.5e9 and 0 <= total - 12 * n_params < 64  # fp32 params, 2 moments, counters
    assert per_device < total / 8 * 1.001, per_device / total  # everything big is split 8 ways


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(env):
    """A checkpoint holding a NaN (in the embedding of a token only one record uses): the step
    whose batch holds that record stops the run, before any checkpoint could hold NaN params."""
    from train_utils import write_records

    root, model, proc, _ = env
    bad_id = proc.tokenizer.encode("zzz", add_special_tokens=False).ids[0]
    data = write_records(root / "nan.jsonl", [{"text": "hello world the cat"}] * 5 + [{"text": "the dog zzz"}])
    emb = np.array(model.params["embed_tokens"]["embedding"])
    emb[bad_id] = np.nan
    poisoned = cj.ChameleonModel(model.config, {**model.params, "embed_tokens": {"embedding": emb}})
    tc = train_config(root / "nan", data, steps=6, batch_size=1, checkpoint_every=2, keep_checkpoints=10,
                      log_every=3)
    tr = Trainer(tc, poisoned, proc, log=None)
    with pytest.raises(cj.ChameleonError, match=r"step (\d+): the loss is nan .*training stopped at this step") as e:
        tr.run()
    step = int(e.value.args[0].split(":")[0].split()[1])
    assert step == 3  # the data order of this seed puts the poisoned record third
    ckpts = root / "nan" / "out" / "checkpoints"
    assert os.listdir(ckpts) == ["2"]  # none holds the NaN step's params
    assert f"last good checkpoint (step 2 in {ckpts})" in str(e.value)
    lines = [json.loads(x) for x in open(root / "nan" / "out" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3] and np.isnan(lines[-1]["loss"])
    assert all(np.isfinite(r["loss"]) for r in lines[:2])
    # the last checkpoint is intact: it restores, and its params hold no NaN beyond the poisoned row
    resumed = Trainer(tc, poisoned, proc, log=None)
    assert resumed.step == 2
    emb3 = np.asarray(resumed.state["params"]["embed_tokens"]["embedding"])
    assert np.isnan(emb3[bad_id]).all() and np.isfinite(np.delete(emb3, bad_id, axis=0)).all()
    rest = {k: v for k, v in _flat(resumed.state["params"]).items() if k != "embed_tokens/embedding"}
    assert all(np.isfinite(v).all() for v in rest.values())
