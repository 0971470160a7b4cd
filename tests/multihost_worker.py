"""One process of the two-process (multi-host) test; run by test_multihost.py, not by pytest."""

import json
import os
import sys

pid, port, ckpt, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "4"

import jax  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402

import chameleon_jax as cj  # noqa: E402

mesh = cj.make_mesh(data=2, fsdp=2, tensor=2)
model = cj.load(ckpt, mesh=mesh)
q = model.params["layers_0"]["self_attn"]["q_proj"]["kernel"]
ids = np.load(os.path.join(out_dir, "ids.npy"))
np.save(os.path.join(out_dir, f"logits{pid}.npy"), model.logits(ids))
info = {
    "process_count": jax.process_count(),
    "device_count": jax.device_count(),
    # the data axis spans the two processes: each row of the mesh is one host's devices
    "mesh_rows_by_process": [sorted({d.process_index for d in row.reshape(-1)}) for row in mesh.devices],
    "q_addressable_shards": len(q.addressable_shards),
    "q_fully_addressable": q.is_fully_addressable,
}
with open(os.path.join(out_dir, f"info{pid}.json"), "w") as f:
    json.dump(info, f)
