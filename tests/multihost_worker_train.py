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
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from multihost_worker_common import STEPS, run_steps, train_config  # noqa: E402

from chameleon_jax.training import Trainer  # noqa: E402
from chameleon_jax.training.data import DataLoader, process_rows  # noqa: E402
from chameleon_jax.training.step import build_mesh  # noqa: E402
from chameleon_jax.sharding import logical_to_spec, to_host  # noqa: E402

trainer = Trainer(train_config(root), log=None)
out = run_steps(trainer, STEPS)
# Other meshes, the global batch assembled from each process's share without a train step: tensor over all
# 8 devices (the batch is replicated, so every host loads every row) and fsdp=8 (each host loads its half).
whole = next(DataLoader(trainer.dataset, trainer.processor, batch_size=8, seed=1, max_length=128, process_index=0,
                        process_count=1))["input_ids"]
for name, mesh in (("tensor8", build_mesh({"tensor": 8})), ("fsdp8", build_mesh({"fsdp": 8}))):
    sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None), whole.shape, mesh))
    rows = process_rows(sharding, whole.shape)
    mine = next(DataLoader(trainer.dataset, trainer.processor, batch_size=8, seed=1, max_length=128, rows=rows))
    assembled = jax.make_array_from_process_local_data(sharding, mine["input_ids"], whole.shape)
    out[f"rows_{name}"] = rows.tolist()
    out[f"assembled_{name}"] = bool(np.array_equal(to_host(assembled), whole))
out.update(process_index=jax.process_index(), process_count=jax.process_count(),
           device_count=jax.device_count(), local_devices=len(jax.local_devices()))
with open(os.path.join(root, f"train{pid}.json"), "w") as f:
    json.dump(out, f)
