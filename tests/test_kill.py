"""Kill harness: SIGKILL `convert`, `export` and `train` at the k-th write point (chameleon_jax/checkpoint/killpoint.py)
in a subprocess. convert/export: after each kill the old DST is unchanged, and the rerun succeeds and leaves no
temp dirs. train: the last complete checkpoint restores and the resumed run ends bit-exactly where an
uninterrupted run does (losses, params, optimizer state, metrics.jsonl), leaving no temp dirs.

Default tier: 3 kill points per operation (train: 1); ``-m slow`` (or CHAMELEON_JAX_KILL_POINTS=N): 20 or N.
The batch job named in the issue does not exist, so it has no campaign.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from chameleon_jax.checkpoint.convert import convert
from conftest import build_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    env.update(env_extra)
    code = "import sys; from chameleon_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def _stable(snap):
    groups = sorted({n.split("/")[1] for n in snap if n.startswith("params/")})
    return groups, {n: b for n, b in snap.items() if not n.startswith("params/")}


def _points(n, total):
    """``n`` kill points spread over 1..total (all of them when total <= n)."""
    if total <= n:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (n - 1)) for i in range(n)})


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill") / "hf"
    build_hf_model(d, seed=5, num_hidden_layers=1)
    (d / "tokenizer.json").write_text("{}")
    return d


def kill_campaign(args, dst, n_points, tmp_path):
    """Returns (kill points tried, survived)."""
    count = str(tmp_path / "count.txt")
    r = _run(args, {"CHAMELEON_JAX_KILL_COUNT": count})
    assert r.returncode == 0, r.stderr
    total = len(open(count).read().splitlines())
    assert total >= 5
    before = _snapshot(dst)  # the old DST (a previous complete run)
    survived = 0
    pts = _points(n_points, total)
    for k in pts:
        r = _run(args, {"CHAMELEON_JAX_KILL_AT": str(k)})
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr)
        # killed before or after the final renames: DST is the old one or the complete new one (same bytes
        # but for timestamps inside orbax metadata); never partial, never absent after the next run
        rerun = _run(args, {})
        assert rerun.returncode == 0, (k, rerun.stderr)
        parent = os.path.dirname(dst)
        leftovers = [n for n in os.listdir(parent) if ".chameleon-" in n]
        assert leftovers == [], (k, leftovers)
        # Orbax names its data files at random: compare everything else byte for byte, and the groups
        after = _snapshot(dst)
        assert _stable(after) == _stable(before), k
        survived += 1
    print(f"kill campaign {args[0]}: {survived}/{len(pts)} kill points survived (of {total} points)")
    return len(pts), survived


def _n(default):
    return int(os.environ.get("CHAMELEON_JAX_KILL_POINTS", default))


@pytest.mark.parametrize("tier", [pytest.param(3, id="default"), pytest.param(20, id="full", marks=pytest.mark.slow)])
def test_kill_convert(src, tmp_path, tier):
    dst = str(tmp_path / "out")
    convert(str(src), dst, progress=False)
    tried, survived = kill_campaign(["convert", str(src), dst, "--overwrite", "--quiet"], dst, _n(tier), tmp_path)
    assert survived == tried


@pytest.mark.parametrize("tier", [pytest.param(3, id="default"), pytest.param(20, id="full", marks=pytest.mark.slow)])
def test_kill_export(src, tmp_path, tier):
    conv = str(tmp_path / "conv")
    convert(str(src), conv, progress=False)
    dst = str(tmp_path / "hf-out")
    r = _run(["export", conv, dst], {})
    assert r.returncode == 0, r.stderr
    tried, survived = kill_campaign(["export", conv, dst, "--overwrite"], dst, _n(tier), tmp_path)
    assert survived == tried


# ------------------------------------------------------------------ training checkpoints
@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """A tiny random model saved in HF layout, its tokenizer, 4 text records, and a config that saves a
    checkpoint every step (keeping 2, so old ones are deleted too) and logs every step."""
    from fuzz import random_checkpoint
    from tokenizer_utils import build_test_tokenizer
    from train_utils import tiny_model_config, train_config, write_records

    root = tmp_path_factory.mktemp("killtrain")
    vm = build_test_tokenizer(root / "tok", num_image_codes=64, vocab_size=512, image_seq_length=16, image_size=8)
    random_checkpoint(str(root / "model"), tiny_model_config(vm), seed=3)
    data = write_records(root / "data.jsonl", [{"text": t} for t in (
        "hello world the cat is here .", "a dog and a cat", "the color of the picture is one", "hello dog")])
    tc = train_config(root, data, model=str(root / "model"), tokenizer=str(root / "tok"), steps=3,
                      batch_size=1, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    return root, tc.to_dict()


def _train_env(root):
    # the parent's device count (the same compiled step), and one compilation cache for all the train runs
    return {"JAX_NUM_CPU_DEVICES": os.environ.get("JAX_NUM_CPU_DEVICES", "1"),
            "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _train_config(d, out):
    from chameleon_jax.training import TrainConfig

    return TrainConfig.from_dict(dict(d, output_dir=str(out)))


def _train_leaves(trainer):
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(trainer.state))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


@pytest.fixture(scope="module")
def train_reference(train_setup):
    """One uninterrupted `train` run (a subprocess, like the killed ones; it also fills their compilation
    cache): its final state (restored from its last checkpoint), its losses and its kill point labels."""
    from chameleon_jax.training import Trainer

    root, d = train_setup
    cfg, out, count = root / "ref.json", root / "ref" / "out", root / "count.txt"
    cfg.write_text(json.dumps(dict(d, output_dir=str(out))))
    r = _run(["train", "--config", str(cfg)], {"CHAMELEON_JAX_KILL_COUNT": str(count), **_train_env(root)})
    assert r.returncode == 0, r.stderr[-3000:]
    labels = [line.split(" ", 1)[1] for line in count.read_text().splitlines()]
    tr = Trainer(_train_config(d, out), log=None)
    assert tr.step == d["steps"]
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")]
    assert len(losses) == d["steps"]
    return _train_leaves(tr), losses, labels


def _complete_before(labels, k):
    """The step of the last checkpoint complete when the k-th point killed the run (0: none). The
    "renamed to <step>" point comes after the rename: killed there, that checkpoint is complete."""
    done = [int(n) for n in (lb.rsplit(" ", 1)[1] for lb in labels[:k] if lb.startswith("trainer: orbax renamed to "))
            if n.isdigit()]  # a step directory's rename, not one of its items' (state, meta)
    return done[-1] if done else 0


# Each killed run is a fresh process (import, load, compile: ~6 s of CPU with a warm compilation cache), so
# the default tier kills one point, half-way (inside a checkpoint save); the full tier 20 from the first
# point to the last.
@pytest.mark.parametrize("tier", [pytest.param(1, id="default"), pytest.param(20, id="full", marks=pytest.mark.slow)])
def test_kill_train(train_setup, train_reference, tmp_path, tier):
    from chameleon_jax.training import Trainer

    root, d = train_setup
    ref_state, ref_losses, labels = train_reference
    total = len(labels)
    assert _complete_before(labels, total + 1) == d["steps"], labels
    n = _n(tier)
    pts = _points(n, total) if n >= 3 else [round((i + 1) * total / (n + 1)) for i in range(n)]
    survived = 0
    for k in pts:
        out = tmp_path / f"run{k}" / "out"
        cfg = tmp_path / f"run{k}.json"
        cfg.write_text(json.dumps(dict(d, output_dir=str(out))))
        r = _run(["train", "--config", str(cfg)], {"CHAMELEON_JAX_KILL_AT": str(k), **_train_env(root)})
        assert r.returncode == -signal.SIGKILL, (k, labels[k - 1], r.returncode, r.stderr[-3000:])
        logs = []
        tr = Trainer(_train_config(d, out), log=logs.append)  # the rerun: resumes from the last complete one
        want = _complete_before(labels, k)
        assert tr.step == want, (k, labels[k - 1], tr.step, want)
        assert (want == 0) != any("resumed" in m for m in logs), (k, logs)
        tr.run()
        tr.close()
        assert [h["loss"] for h in tr.history] == ref_losses[want:], (k, labels[k - 1])
        got = _train_leaves(tr)
        assert got.keys() == ref_state.keys()
        for path, x in ref_state.items():  # params, optimizer state, step, RNG: bit for bit
            np.testing.assert_array_equal(got[path], x, err_msg=f"kill point {k} ({labels[k - 1]}): {path}")
        # metrics.jsonl: every step once, with the uninterrupted run's losses
        recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert [(r["step"], r["loss"]) for r in recs] == list(enumerate(ref_losses, 1)), (k, labels[k - 1])
        ckpts = sorted(os.listdir(out / "checkpoints"))
        assert ckpts == [str(d["steps"] - 1), str(d["steps"])], (k, ckpts)  # no temp dirs, keep_checkpoints=2
        assert [n for n in os.listdir(out) if ".chameleon-" in n or "tmp" in n] == [], k
        survived += 1
    print(f"kill campaign train: {survived}/{len(pts)} kill points survived (of {total} points)")
    assert survived == len(pts)
