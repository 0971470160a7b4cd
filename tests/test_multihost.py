"""Two JAX processes over loopback (4 CPU devices each) load one Orbax checkpoint onto a global mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

import chameleon_jax as cj
from chameleon_jax.checkpoint.convert import convert
from conftest import build_hf_model, child_env, text_ids

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_mesh_equals_one_device(tmp_path):
    build_hf_model(tmp_path / "hf", seed=71, hidden_size=128, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=256)
    convert(str(tmp_path / "hf"), str(tmp_path / "orbax"), progress=False)
    ids = np.array([text_ids(9, s) for s in range(8)])
    np.save(tmp_path / "ids.npy", ids)
    ref = cj.load(tmp_path / "hf").logits(ids)

    port = str(_free_port())
    env = child_env()
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(i), port, str(tmp_path / "orbax"), str(tmp_path)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for i in range(2):
        info = json.loads((tmp_path / f"info{i}.json").read_text())
        assert info["process_count"] == 2 and info["device_count"] == 8
        assert info["mesh_rows_by_process"] == [[0], [1]]
        # each process restored only its own 4 of the 8 shards: no host holds the whole array
        assert info["q_addressable_shards"] == 4 and not info["q_fully_addressable"]
        out = np.load(tmp_path / f"logits{i}.npy")
        assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()
