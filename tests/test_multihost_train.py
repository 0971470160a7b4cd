"""Multi-host training data: two JAX processes over loopback (4 CPU devices each) train on a global mesh,
each collating only its rows of every batch, with the losses of one process on 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from chameleon_jax.checkpoint.hf import expected_params, save_hf
from chameleon_jax.errors import ChameleonError
from chameleon_jax.processing import ChameleonProcessor
from chameleon_jax.training import Trainer
from chameleon_jax.training.data import DataLoader, read_jsonl
from conftest import child_env
from multihost_worker_common import STEPS, run_steps, train_config
from tokenizer_utils import build_test_tokenizer
from train_utils import IMAGE_TOKENS, tiny_model_config, write_data

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_params(config, seed: int) -> dict:
    """Random params from numpy (compiling a jitted init costs tens of seconds on CPU): N(0, 0.05)
    weights, norm weights around 1 and biases around 0, so every param's gradient matters."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, x in expected_params(config, vq_decoder=False).items():
        base = 1.0 if "norm" in path and path.endswith(("weight", "scale")) else 0.0
        flat[path] = (base + rng.normal(0, 0.05, x.shape)).astype(np.float32)
    return traverse_util.unflatten_dict(flat, sep="/")


def _setup(root, n_examples=16):
    vm = build_test_tokenizer(root / "tok", num_image_codes=64, vocab_size=512, image_seq_length=IMAGE_TOKENS,
                              image_size=8)
    config = tiny_model_config(vm).replace(num_hidden_layers=1)  # one layer: the workers compile less
    save_hf(_random_params(config, seed=3), config, str(root / "model"))
    write_data(root, n_examples, seed=2)


def test_two_processes_train_like_one(tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 CPU devices (JAX_NUM_CPU_DEVICES=8) for the one-process reference")
    _setup(tmp_path)
    port = str(_free_port())
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        # the reference, while the workers run: one process, the same 2x2x2 mesh over its 8 devices
        ref_dir = tmp_path / "ref"
        ref_dir.mkdir()
        for name in ("model", "tok", "images", "data.jsonl"):
            os.symlink(tmp_path / name, ref_dir / name)
        ref = run_steps(Trainer(train_config(ref_dir), log=None), STEPS)
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    got = [json.loads((tmp_path / f"train{i}.json").read_text()) for i in range(2)]
    ds = read_jsonl(str(tmp_path / "data.jsonl"), ChameleonProcessor.from_pretrained(tmp_path / "tok"),
                    max_length=128)
    for i, g in enumerate(got):
        assert (g["process_index"], g["process_count"], g["device_count"], g["local_devices"]) == (i, 2, 8, 4)
        # the global loss of each step: the same on both hosts and as one process computes it
        np.testing.assert_allclose(g["losses"], ref["losses"], rtol=1e-6, atol=0)
        assert g["data_state"] == ref["data_state"] and g["lengths"] == ref["lengths"]
        # this host collated exactly its half of every microbatch (its devices' rows), and decoded the
        # images of those examples only
        for step, rows in enumerate(g["rows"]):
            assert np.array_equal(rows, np.asarray(ref["rows"][step])[:, 2 * i:2 * i + 2])
            assert g["images"][step] == sum(len(ds.examples[r].images) for r in np.ravel(rows))
        # meshes whose batch split is not the data axis: tensor=8 replicates the batch (every host loads all rows),
        # fsdp=8 splits it 4 + 4; either way the global array assembled from the shares is the whole batch
        assert g["rows_tensor8"] == list(range(8)) and g["rows_fsdp8"] == list(range(4 * i, 4 * i + 4))
        assert g["assembled_tensor8"] and g["assembled_fsdp8"]
    # every example of the global batches was read once, by one host
    for step in range(STEPS):
        both = np.concatenate([np.ravel(g["rows"][step]) for g in got])
        assert sorted(both) == sorted(np.ravel(ref["rows"][step])) and len(set(both)) == len(both)
    assert len(set(np.ravel(ref["rows"]))) == 16  # the 3 steps cross an epoch (2 steps of 8 examples each)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh")
    proc = ChameleonProcessor.from_pretrained(
        build_test_tokenizer(root / "tok", num_image_codes=64, vocab_size=512, image_seq_length=IMAGE_TOKENS,
                             image_size=8) and root / "tok")
    return read_jsonl(write_data(root, 12, seed=4), proc, max_length=128), proc


def _loader(data, **kw):
    ds, proc = data
    kw = dict(dict(batch_size=4, grad_accum=2, seed=9, max_length=128, buckets=[64, 128], length_grouping=2), **kw)
    return DataLoader(ds, proc, **kw)


def test_process_shares_partition_the_global_batch_and_resume(data):
    whole = _loader(data, process_index=0, process_count=1)
    parts = [_loader(data, process_index=i, process_count=2) for i in range(2)]
    for _ in range(4):  # 12 examples, 8 per step: crosses epochs
        w, halves = next(whole), [next(p) for p in parts]
        for i, h in enumerate(halves):
            assert np.array_equal(h["rows"], w["rows"][:, 2 * i:2 * i + 2])
            assert np.array_equal(h["input_ids"], w["input_ids"][:, 2 * i:2 * i + 2])
            assert np.array_equal(h["labels"], w["labels"][:, 2 * i:2 * i + 2])
            assert h["input_ids"].shape[-1] == w["input_ids"].shape[-1]  # the bucket of the global step
            assert (h["epoch"], h["index"]) == (w["epoch"], w["index"])
            # the images decoded: those of its own examples only
            assert len(h["pixel_values"]) == sum(len(data[0].examples[r].images) for r in np.ravel(h["rows"]))
        assert sum(len(h["pixel_values"]) for h in halves) == len(w["pixel_values"])
    # resume: process 1's position, restored into a fresh loader (and into a one-process run) continues alike
    state = parts[1].state_dict()
    fresh, single = _loader(data, process_index=1, process_count=2), _loader(data, process_index=0, process_count=1)
    fresh.load_state_dict(state)
    single.load_state_dict(state)
    a, b, w = next(fresh), next(parts[1]), next(single)
    assert np.array_equal(a["rows"], b["rows"]) and np.array_equal(a["input_ids"], b["input_ids"])
    assert np.array_equal(a["rows"], w["rows"][:, 2:])
    # explicit rows (as process_rows gives them for a batch sharding) override the contiguous share
    odd = _loader(data, process_index=0, process_count=2, rows=[1, 3])
    odd.load_state_dict(state)
    assert np.array_equal(next(odd)["rows"], w["rows"][:, [1, 3]])


def test_bad_process_shares(data):
    with pytest.raises(ChameleonError, match="batch_size 3"):
        _loader(data, batch_size=3, process_index=0, process_count=2)
    with pytest.raises(ChameleonError, match="process_index 2"):
        _loader(data, process_index=2, process_count=2)
    with pytest.raises(ChameleonError, match="rows"):
        _loader(data, process_index=0, process_count=1, rows=[2, 1])
    with pytest.raises(ChameleonError, match="rows"):
        _loader(data, process_index=0, process_count=1, rows=[0, 4])
    # defaults: this JAX process's index and count
    d = _loader(data)
    assert (d.process_index, d.process_count) == (jax.process_index(), jax.process_count())
