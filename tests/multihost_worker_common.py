"""What the two-process training test and its workers share: the run's settings and the step loop."""

from __future__ import annotations

import os
import time

import numpy as np

from chameleon_jax.sharding import to_host
from chameleon_jax.training.config import TrainConfig

STEPS = 3
MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # the batch over data x fsdp = 4 ways; the data axis spans the hosts


def train_config(root) -> TrainConfig:
    root = str(root)
    return TrainConfig.from_dict(dict(
        model=os.path.join(root, "model"), tokenizer=os.path.join(root, "tok"), data=os.path.join(root, "data.jsonl"),
        output_dir=os.path.join(root, "out"), max_length=128, buckets=[128], batch_size=4, grad_accum=2,
        steps=10, learning_rate=3e-3, warmup_steps=1, mesh=MESH, checkpoint_every=100, log_every=1, seed=5,
        length_grouping=2))


def run_steps(trainer, steps: int) -> dict:
    """``steps`` optimizer steps as Trainer.run takes them (loader -> prepare -> step), recording the loss
    and, per step, the dataset indices this process collated and how many images it decoded."""
    losses, rows, images, lengths, seconds = [], [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(trainer.loader)
        rows.append(np.asarray(batch["rows"]).tolist())
        images.append(0 if batch["pixel_values"] is None else int(len(batch["pixel_values"])))
        lengths.append(int(batch["input_ids"].shape[-1]))
        metrics = trainer.train_step(trainer.prepare(batch))
        losses.append(float(to_host(metrics["loss"])))
        seconds.append(time.perf_counter() - t0)
    return {"losses": losses, "rows": rows, "images": images, "lengths": lengths, "seconds": seconds,
            "data_state": trainer.loader.state_dict()}
