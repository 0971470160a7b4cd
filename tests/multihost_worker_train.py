"""One process of the two-process training test; run by test_multihost_train.py, not by pytest.

argv: process id, coordinator port, the test's directory (model/, tok/, data.jsonl; writes
train<pid>.json there)."""

import json
import os
import sys

pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "4"

import jax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from multihost_worker_common import STEPS, run_steps, train_config  # noqa: E402

from chameleon_jax.training import Trainer  # noqa: E402
from chameleon_jax.training.data import process_rows  # noqa: E402
from chameleon_jax.training.step import build_mesh  # noqa: E402
from chameleon_jax.sharding import logical_to_spec  # noqa: E402

trainer = Trainer(train_config(root), log=None)
out = run_steps(trainer, STEPS)
# Rows the batch sharding gives this process on other meshes: tensor over all 8 devices (the batch is
# replicated, so both hosts hold every row) and fsdp=8 (each host holds its half).
for name, mesh in (("tensor8", build_mesh({"tensor": 8})), ("fsdp8", build_mesh({"fsdp": 8}))):
    sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None), (1, 8, 1), mesh))
    out[f"rows_{name}"] = process_rows(sharding, (1, 8, 1)).tolist()
out.update(process_index=jax.process_index(), process_count=jax.process_count(),
           device_count=jax.device_count(), local_devices=len(jax.local_devices()))
with open(os.path.join(root, f"train{pid}.json"), "w") as f:
    json.dump(out, f)
