"""Weight-only int8 / int4 against fp32 (ours) and transformers (fp32) on one random checkpoint.

All four load the same random checkpoint (benchmarks/common.py). Per batch size: greedy decode
throughput of each, measured in alternating runs (medians and ranges), our decode-step time from
the same compiled loop ``generate`` uses, and the weight bytes each step reads. Quality: 16 prompts
x 64 fp32-greedy tokens fed back (teacher forcing): top-1 agreement of int8 / int4 with fp32 and the
largest logit error relative to each row's logit spread (text tokens). ``--tpu-bytes``: also XLA's
bytes accessed of one 7B decode step compiled for a TPU topology, with and without VMEM prefetching,
at 256 and 2048 cache slots (needs the tpu-aot extra).

    python benchmarks/quant.py                   # hidden 512, 8 layers, vocab 65536 (92M), CPU
    python benchmarks/quant.py --reps 3 --batches 1 --tpu-bytes
    python benchmarks/quant.py --batches --tpu-bytes   # the TPU bytes only
    python benchmarks/quant.py --batches --cpu-7b      # a 7B-shaped int8 decode step on this CPU only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_model_args, build_checkpoint, first_text_id, median_spread, read_bandwidth, timed  # noqa: E402

MODES = (None, "int8", "int4")


def _name(mode) -> str:
    return mode or "fp32"


def quality(models: dict, vocab: int, first_text: int) -> dict:
    """{mode: (top-1 agreement with fp32, mean over rows of max |logit error| / logit spread)}."""
    ref_model = models[None]
    rng = np.random.default_rng(7)
    ids = rng.integers(first_text, vocab, (16, 8))
    ids[:, 0] = 1
    new = np.array(ref_model.generate(ids, max_new_tokens=64))
    placeholder = ref_model.config.image_vocab.image_token_id
    if placeholder is not None:
        new[new == placeholder] = first_text
    full = np.concatenate([ids, new], axis=1)
    ref = ref_model.logits(full)[:, 7:-1]
    text = ref.min(axis=(0, 1)) > -1e30
    ref = ref[..., text]
    spread = ref.max(-1) - ref.min(-1)
    s = np.sort(ref, axis=-1)
    out = {"margin": float(((s[..., -1] - s[..., -2]) / spread).mean())}
    for mode in MODES[1:]:
        got = models[mode].logits(full)[:, 7:-1][..., text]
        out[mode] = (float((got.argmax(-1) == ref.argmax(-1)).mean()), float((np.abs(got - ref).max(-1) / spread).mean()))
    return out


def tpu_bytes(topology: str, mesh: dict, seq: int) -> dict:
    """{(mode, prefetch): PlanResult} of one 7B decode step, with and without VMEM prefetching."""
    import chameleon_jax as cj
    from chameleon_jax.plan import NO_VMEM_PREFETCH, plan

    cfg = cj.load_preset("chameleon-7b")
    out = {}
    for prefetch in (True, False):
        for mode in MODES:
            r = plan(cfg, topology, mesh, task="generate", seq=seq, batch=1, quantize=mode,
                     compiler_options=None if prefetch else NO_VMEM_PREFETCH)
            out[mode, prefetch] = r
            print(f"  7B decode step on {topology} {mesh}, {_name(mode) if mode else 'bf16'}"
                  f"{'' if prefetch else ', no VMEM prefetch'}: params {r.params_bytes / 2**30:.2f} GiB/device, "
                  f"XLA bytes accessed {r.bytes_accessed / 2**30:.2f} GiB (compile {r.compile_s:.0f} s)", flush=True)
    return out


def report_tpu_bytes(topology: str):
    for seq in (256, 2048):
        print(f"\nXLA:TPU cost analysis, one decode step (batch 1, {seq}-slot cache, tensor=8):")
        r = tpu_bytes(topology, {"tensor": 8}, seq)
        for mode in MODES[1:]:
            moved = [r[mode, pf].bytes_accessed / r[None, pf].bytes_accessed for pf in (True, False)]
            print(f"  {mode} / bf16: bytes accessed {moved[0]:.3f} (prefetch copies counted), {moved[1]:.3f} "
                  f"(no VMEM prefetch); params per device {r[mode, True].params_bytes / r[None, True].params_bytes:.3f}")


def step_weight_bytes(params, config) -> int:
    """Weight bytes one decode step reads: every decoder layer and the LM head's text-token columns
    (int4 counted as half a byte)."""
    from chameleon_jax import quant

    n_text = config.vocab_size - len(config.image_vocab.image_token_ids)
    layers = {k: v for k, v in params.items() if k.startswith("layers_")}
    return quant.param_bytes(layers) + quant.param_bytes(params["lm_head"]) * n_text // config.vocab_size


def cpu_7b(steps: int = 8) -> None:
    """Batch-1 greedy decode of a 7B-shaped int8 model on this CPU, ours only: float32 7B (27 GB) does
    not fit this host, and transformers has no int8 CPU path to set beside it. The integers and
    scales are random (made directly, no float kernel ever exists), the embeddings float32."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    import chameleon_jax as cj
    from chameleon_jax import quant
    from chameleon_jax.checkpoint.hf import expected_params

    cfg = cj.load_preset("chameleon-7b").replace(vq_config=None)
    flat = {k: v for k, v in expected_params(cfg, vq_decoder=False).items() if not k.startswith("vqmodel/")}
    abstract = quant.abstract_quantized(flat, "int8", impl="cpu")
    key = jax.random.key(0)

    def filled(i, x):
        k = jax.random.fold_in(key, i)
        if isinstance(x, quant.QArray):
            q = jax.jit(lambda k: jax.random.randint(k, x.q.shape, -127, 128, jnp.int8))(k)
            return x.replace(q=q, scale=jnp.full(x.scale.shape, 0.02 / 64, x.scale.dtype))
        return jax.jit(lambda k: (1.0 if x.ndim == 1 else 0.02) * jax.random.normal(k, x.shape, x.dtype))(k)

    params = traverse_util.unflatten_dict({p: filled(i, x) for i, (p, x) in enumerate(abstract.items())}, sep="/")
    model = cj.api.ChameleonModel(cfg, params)
    weights = step_weight_bytes(params, cfg)
    ids = np.array([[1] + list(range(1000, 1015))])
    gen, pids, pmask, _, settings = model._generation_inputs(
        ids, np.ones_like(ids), None, model._settings(steps, False, 1.0, 0, 1.0, 0, 1.0, None, steps))
    runs = []
    for _ in range(3):
        plan, knobs, state = gen.start(model.params, pids, pmask, None, settings)
        jax.block_until_ready(state)
        t = time.perf_counter()
        jax.block_until_ready(gen.run(model.params, state, knobs, plan, steps))
        runs.append((time.perf_counter() - t) / (steps - 1))
    step = statistics.median(runs[1:])
    print(f"\n7B-shaped int8, batch 1 on this CPU: {weights / 1e9:.2f} GB of int8 weights per step, decode step "
          f"{1000 * step:.0f} ms ({weights / step / 1e9:.1f} GB/s; runs {[round(1000 * r) for r in runs]} ms, the "
          f"first compiles)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=512, layers=8, intermediate=1376, vocab=65536, image_codes=8192, image_resolution=256)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="decode batch sizes (none: skip the CPU part)")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=32, help="new tokens per row")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--tpu-bytes", action="store_true", help="XLA:TPU bytes accessed of a 7B decode step (libtpu)")
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--cpu-7b", action="store_true", help="also time a 7B-shaped int8 model's decode step (~8 GB RAM)")
    args = p.parse_args(argv)

    if not args.batches:
        if args.cpu_7b:
            cpu_7b()
        if args.tpu_bytes:
            report_tpu_bytes(args.topology)
        return 0
    import jax
    import torch
    import transformers

    import chameleon_jax as cj

    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs; read bandwidth "
          f"{read_bandwidth():.1f} GB/s (jitted sum)")
    with tempfile.TemporaryDirectory(prefix="chameleon-bench-") as tmp:
        build_checkpoint(tmp, args)
        models = {mode: cj.load(tmp, dtype="float32", quantize=mode) for mode in MODES}
        hf = None if args.no_hf else transformers.ChameleonForConditionalGeneration.from_pretrained(
            tmp, dtype=torch.float32).eval()
    c = models[None].config
    first_text = first_text_id(args)
    for mode, m in models.items():
        print(f"{_name(mode)}: {step_weight_bytes(m.params, c) / 1e6:.1f} MB of weights read per decode step")

    q = quality(models, c.vocab_size, first_text)
    print(f"\nquality (16 prompts x 64 tokens, teacher forcing; mean top-1/top-2 margin {q['margin']:.4f} of the "
          "logit spread):")
    for mode in MODES[1:]:
        print(f"  {mode}: top-1 agreement with fp32 {q[mode][0]:.3f}, max |logit error| / spread {q[mode][1]:.4f}")

    rng = np.random.default_rng(0)
    for batch in args.batches:
        ids = rng.integers(first_text, c.vocab_size, (batch, args.prompt))
        ids[:, 0] = 1
        mask = np.ones_like(ids)
        times = {mode: [] for mode in MODES}
        steps = {mode: [] for mode in MODES}
        t_hf = []
        compile_s = {}
        for mode, m in models.items():
            compile_s[mode] = timed(lambda: m.generate(ids, mask, max_new_tokens=args.new,
                                                       min_new_tokens=args.new))[0]
        if hf is not None:
            def hf_generate():
                with torch.inference_mode():
                    return hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                       max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
            hf_generate()
        for _ in range(args.reps):
            if hf is not None:
                t_hf.append(timed(hf_generate)[0])
            for mode, m in models.items():
                times[mode].append(timed(lambda: m.generate(ids, mask, max_new_tokens=args.new,
                                                            min_new_tokens=args.new))[0])
                gen, pids, pmask, _, settings = m._generation_inputs(
                    ids, mask, None, m._settings(args.new, False, 1.0, 0, 1.0, 0, 1.0, None, args.new))
                plan, knobs, state = gen.start(m.params, pids, pmask, None, settings)
                jax.block_until_ready(state)
                t = time.perf_counter()
                jax.block_until_ready(gen.run(m.params, state, knobs, plan, args.new))
                steps[mode].append((time.perf_counter() - t) / (args.new - 1))
        tokens = batch * args.new
        print(f"\nbatch {batch}, prompt {args.prompt}, {args.new} new tokens (greedy), medians of {args.reps} "
              "alternating runs")
        fp32 = statistics.median(times[None])
        if t_hf:
            med, lo, hi = median_spread(t_hf)
            print(f"  transformers fp32: {tokens / med:8.1f} tok/s ({1000 * med:.0f} ms/call, "
                  f"range {1000 * lo:.0f}..{1000 * hi:.0f})")
        for mode in MODES:
            med, lo, hi = median_spread(times[mode])
            vs_hf = f", {statistics.median(t_hf) / med:.2f}x transformers" if t_hf else ""
            print(f"  ours {_name(mode):5s}: {tokens / med:8.1f} tok/s ({1000 * med:.0f} ms/call, range "
                  f"{1000 * lo:.0f}..{1000 * hi:.0f}); decode step {1000 * statistics.median(steps[mode]):.2f} ms; "
                  f"{fp32 / med:.2f}x our fp32{vs_hf}; compile {compile_s[mode] - med:.1f} s")
        for mode in MODES[1:]:
            print(f"  decode step {mode} vs fp32: "
                  f"{statistics.median(steps[None]) / statistics.median(steps[mode]):.2f}x")

    if args.cpu_7b:
        cpu_7b()
    if args.tpu_bytes:
        report_tpu_bytes(args.topology)
    return 0


if __name__ == "__main__":
    sys.exit(main())
