"""Training speed: our jitted train step vs transformers forward + backward + AdamW, same model and batch.

One random checkpoint (built with transformers, saved to a temp dir) is loaded by both sides. Each
step is: forward over a [B, T] text batch with labels (transformers' ``labels=`` loss; image-token
logits masked on both sides), backward, global-norm clipping to 1.0, AdamW (lr 1e-4, betas
(0.9, 0.999), eps 1e-8, weight decay 0.01; ours skips norms and biases) over every parameter except
the frozen VQ-VAE. Ours is
``chameleon_jax.training.step.make_train_step`` on one device (fp32 compute, no remat unless --remat);
transformers runs eagerly in fp32 with its default attention (sdpa). Runs alternate, medians are
printed (min..max beside them: the machine may be shared); our compile time (first call minus a
steady one) is reported separately. The first step's losses of both sides are printed as a check.

On XLA:CPU the step is dominated by matmuls; the backward of the decoder's 3-D einsums
("btd,dv->btv": weight gradients contract over batch and time) gets a transposed copy and a
non-YNN dot. Measured on a 2-core Sapphire Rapids VM: reshaping those einsums to 2-D matmuls (in
model/decoder.py's Linear and logits) cuts our step by ~25%.

    python benchmarks/train_step.py          # hidden 256, 4 layers, vocab 8192, B 4, T 256
    python benchmarks/train_step.py --hidden 512 --layers 8 --seq 512 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_model_args, first_text_id, load_both  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=256, layers=4, intermediate=688, vocab=8192, image_codes=1024, image_resolution=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=10, help="timed steps per side (alternating)")
    p.add_argument("--pause", type=float, default=1.0,
                   help="seconds of sleep before each timed step: XLA's and torch's worker threads spin "
                   "for a while after their work and would steal the cores from the other side")
    p.add_argument("--remat", default="none", help="our remat policy: none, full, dots, dots_no_batch")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from jax.sharding import NamedSharding, PartitionSpec as P

    from chameleon_jax.model import Chameleon
    from chameleon_jax.training.config import TrainConfig
    from chameleon_jax.training.step import build_mesh, make_optimizer, make_train_step, state_shardings

    hf, model = load_both(args)
    hf.train()
    n_params = sum(x.size for k, v in model.params.items() if k != "vqmodel" for x in jax.tree.leaves(v))
    rng = np.random.default_rng(0)
    first_text = first_text_id(args)
    ids = rng.integers(first_text, args.vocab, (args.batch, args.seq)).astype(np.int64)
    ids[:, 0] = 1
    mask = np.ones_like(ids)
    tokens = ids.size
    print(f"model: {n_params / 1e6:.1f}M trainable params (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}); batch {args.batch} x {args.seq} = {tokens} tokens per step, fp32")

    # ---- ours
    tc = TrainConfig(model="bench", data="bench", learning_rate=1e-4, warmup_steps=0, end_lr_ratio=1.0,
                     weight_decay=0.01, max_grad_norm=1.0, remat=args.remat, steps=10**6,
                     mesh={"data": 1, "fsdp": 1, "tensor": 1})
    mesh = build_mesh(tc.mesh)
    module = Chameleon(model.config, remat_policy=args.remat)
    params = {k: v for k, v in model.params.items() if k != "vqmodel"}
    tx = make_optimizer(tc)
    replicated = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda _: replicated, params)
    shardings = state_shardings(tx, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                                param_sh, mesh)
    # committed to the state's shardings, like the Trainer's: one compile, not a second on step 2
    state = {"step": jnp.int32(0), "params": jax.tree.map(jnp.array, params), "opt_state": tx.init(params),
             "rng": jax.random.key_data(jax.random.key(0))}
    state = jax.device_put(state, shardings)
    step = make_train_step(module, tx, tc, shardings, {}, mesh)
    batch = {"input_ids": jnp.asarray(ids[None], jnp.int32), "labels": jnp.asarray(ids[None], jnp.int32),
             "attention_mask": jnp.asarray(mask[None], jnp.int32)}

    def ours():
        nonlocal state
        state, m = step(state, {}, batch)
        return float(m["loss"])  # syncs

    # ---- transformers
    trainable = [p for n, p in hf.named_parameters() if "vqmodel" not in n]
    for n, prm in hf.named_parameters():
        prm.requires_grad_("vqmodel" not in n)
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)

    def theirs():
        loss = hf(input_ids=t_ids, attention_mask=t_mask, labels=t_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    loss_ours = ours()
    first = time.perf_counter() - t0
    loss_theirs = theirs()  # warm-up (allocator, thread pools)
    ours(), theirs()
    print(f"first-step loss: ours {loss_ours:.6f}, transformers {loss_theirs:.6f}")
    times_ours, times_theirs = [], []
    for _ in range(args.reps):
        for fn, times in ((ours, times_ours), (theirs, times_theirs)):
            time.sleep(args.pause)  # let the other runtime's spinning worker threads go idle
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    if os.environ.get("BENCH_VERBOSE"):
        print("ours ms", [round(1000 * t) for t in times_ours])
        print("transformers ms", [round(1000 * t) for t in times_theirs])
    mo, mt = statistics.median(times_ours), statistics.median(times_theirs)
    print(f"ours:         {tokens / mo:10,.0f} tokens/s  ({1000 * mo:.0f} ms/step, "
          f"{1000 * min(times_ours):.0f}..{1000 * max(times_ours):.0f}); compile {first - mo:.1f}s")
    print(f"transformers: {tokens / mt:10,.0f} tokens/s  ({1000 * mt:.0f} ms/step, "
          f"{1000 * min(times_theirs):.0f}..{1000 * max(times_theirs):.0f})")
    print(f"ratio (ours / transformers): {mt / mo:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
