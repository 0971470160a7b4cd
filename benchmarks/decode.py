"""Decode speed: chameleon-jax ``generate`` vs transformers ``generate`` on one random checkpoint.

Both sides load the same random checkpoint (built with transformers, saved to a temp dir) and run
greedy generation of the same prompts in the same process, alternating runs; medians are printed.
transformers runs with ``min_new_tokens = max_new_tokens`` (and we with the same setting) so both
produce exactly ``max_new_tokens`` tokens per row.

    python benchmarks/decode.py                      # hidden 512, 8 layers, vocab 65536, fp32, CPU
    python benchmarks/decode.py --batches 1 --reps 3 --no-image

Reported per case: tokens/s of each side and the ratio; our ms per token (whole call / tokens),
our prefill and per-step decode times, the bytes of weights one decode step reads (every decoder
layer, the final norm and the LM head; the embedding contributes one row per token) and the
bandwidth that implies; our compile time (first call minus a steady call), measured separately.
Also the host's memory-copy bandwidth (numpy) as a ceiling for the implied GB/s. The machine may
be shared, so look at the spread (min..max) as well as the medians.
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
from common import (  # noqa: E402
    add_model_args, first_text_id, load_both, median_spread, memory_bandwidth, read_bandwidth, timed,
)


def text_prompts(batch: int, length: int, vocab: int, first_text: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(first_text, vocab, (batch, length)).astype(np.int64)
    ids[:, 0] = 1
    return ids, np.ones_like(ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=512, layers=8, intermediate=1376, vocab=65536, image_codes=8192, image_resolution=256)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8],
                   help="batch sizes of the text cases; none: the image-prompt case only")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--reps", type=int, default=7, help="timed runs per side and case (alternating)")
    p.add_argument("--no-image", action="store_true", help="skip the image-prompt prefill case")
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds of sleep before each timed call (the other runtime's threads go idle)")
    p.add_argument("--sample", action="store_true",
                   help="both sides sample (temperature 0.7, top_p 0.9) instead of greedy; outputs not compared")
    args = p.parse_args(argv)
    sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if args.sample else dict(do_sample=False)

    import jax
    import torch

    from chameleon_jax.generation import bucket_length

    hf, model = load_both(args)
    c = model.config
    first_text = first_text_id(args)
    params = model.params
    layer_bytes = sum(
        x.nbytes for k, v in params.items() if k not in ("embed_tokens", "lm_head", "vqmodel")
        for x in jax.tree.leaves(v)
    )
    head = params["embed_tokens"]["embedding"] if c.tie_word_embeddings else params["lm_head"]
    n_text = c.vocab_size - len(c.image_vocab.image_token_ids)
    hf_bytes = layer_bytes + head.nbytes  # transformers multiplies the whole LM head
    step_bytes = layer_bytes + head.nbytes * n_text // c.vocab_size  # we skip the image-token rows
    n_params = sum(x.size for k, v in params.items() if k != "vqmodel" for x in jax.tree.leaves(v))
    print(f"config: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
          f"{c.num_key_value_heads} kv, mlp {c.intermediate_size}, vocab {c.vocab_size}, {c.dtype}; "
          f"{n_params / 1e6:.1f}M decoder params")
    bw = memory_bandwidth()
    rbw = read_bandwidth()
    print(f"host memory bandwidth: {bw:.1f} GB/s numpy copy (1 thread, read+write), {rbw:.1f} GB/s jitted "
          "sum (read only)")
    print(f"weights read per decode step: ours {step_bytes / 1e6:.1f} MB (LM head over the {n_text} text "
          f"tokens), transformers {hf_bytes / 1e6:.1f} MB")

    def hf_generate(ids, mask, new, pixels=None):
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                  min_new_tokens=new, **sampling)
        if pixels is not None:
            kw["pixel_values"] = torch.tensor(pixels)
        with torch.inference_mode():
            return hf.generate(**kw)[:, ids.shape[1]:].numpy()

    def ours(ids, mask, new, pixels=None):
        return model.generate(ids, mask, pixels, max_new_tokens=new, min_new_tokens=new, **sampling)

    for batch in args.batches:
        ids, mask = text_prompts(batch, args.prompt, c.vocab_size, first_text, seed=batch)
        compile_s, _ = timed(lambda: ours(ids, mask, args.new))
        hf_generate(ids, mask, args.new)  # warm-up
        t_hf, t_ours = [], []
        for _ in range(args.reps):
            dt, ref = timed(lambda: hf_generate(ids, mask, args.new), args.pause)
            t_hf.append(dt)
            dt, got = timed(lambda: ours(ids, mask, args.new), args.pause)
            t_ours.append(dt)
        same = bool(np.array_equal(ref, got))
        compile_s -= statistics.median(t_ours)
        # Our prefill and decode loop timed apart (same compiled programs as generate uses).
        gen, pids, pmask, _, settings = model._generation_inputs(
            ids, mask, None, model._settings(args.new, args.sample, sampling.get("temperature", 1.0), 0,
                                             sampling.get("top_p", 1.0), 0, 1.0, None, args.new)
        )
        t_pre, t_dec = [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            plan, knobs, state = gen.start(params, pids, pmask, None, settings)
            jax.block_until_ready(state)
            t_pre.append(time.perf_counter() - t)
            t = time.perf_counter()
            state = jax.block_until_ready(gen.run(params, state, knobs, plan, args.new))
            t_dec.append(time.perf_counter() - t)
        tokens = batch * args.new
        hf_med, hf_lo, hf_hi = median_spread(t_hf)
        our_med, our_lo, our_hi = median_spread(t_ours)
        step = statistics.median(t_dec) / (args.new - 1)
        print(f"\nbatch {batch}, prompt {args.prompt}, {args.new} new tokens "
              + ("(sampled: temperature 0.7, top_p 0.9; outputs not compared)" if args.sample
                 else f"(greedy; outputs identical: {same})"))
        print(f"  transformers: {tokens / hf_med:8.1f} tok/s  ({1000 * hf_med:.0f} ms/call, "
              f"range {1000 * hf_lo:.0f}..{1000 * hf_hi:.0f})")
        print(f"  chameleon-jax: {tokens / our_med:7.1f} tok/s  ({1000 * our_med:.0f} ms/call, "
              f"range {1000 * our_lo:.0f}..{1000 * our_hi:.0f})")
        print(f"  ratio: {hf_med / our_med:.2f}x (medians), {hf_lo / our_lo:.2f}x (fastest runs)")
        gbs = step_bytes / step / 1e9
        print(f"  ours: {1000 * our_med / args.new:.2f} ms/token per call; "
              f"prefill {1000 * statistics.median(t_pre):.1f} ms, decode step {1000 * step:.2f} ms -> "
              f"{gbs:.1f} GB/s of weights ({100 * gbs / rbw:.0f}% of the streaming read bandwidth)")
        print(f"  our compile time (first call - steady call): {compile_s:.2f} s")

    if not args.no_image and c.vq_config is not None:
        from chameleon_jax.vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN

        vm = c.vocabulary_map
        r = c.vq_config.resolution
        image = [vm[BOI_TOKEN]] + [vm[IMAGE_TOKEN]] * c.vq_config.tokens_per_image + [vm[EOI_TOKEN]]
        text, _ = text_prompts(1, args.prompt, c.vocab_size, first_text, seed=99)
        ids = np.array([text[0, :1].tolist() + image + text[0, 1:].tolist()], np.int64)
        mask = np.ones_like(ids)
        pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, r, r)).astype(np.float32)
        compile_s, _ = timed(lambda: ours(ids, mask, 1, pixels))
        hf_generate(ids, mask, 1, pixels)
        t_hf, t_ours = [], []
        for _ in range(args.reps):
            t_hf.append(timed(lambda: hf_generate(ids, mask, 1, pixels), args.pause)[0])
            t_ours.append(timed(lambda: ours(ids, mask, 1, pixels), args.pause)[0])
        hf_med, hf_lo, hf_hi = median_spread(t_hf)
        our_med, our_lo, our_hi = median_spread(t_ours)
        model.image_tokens(pixels)
        vq_hf, vq_ours = [], []
        for _ in range(args.reps):
            with torch.inference_mode():
                vq_hf.append(timed(lambda: hf.model.get_image_tokens(torch.tensor(pixels)), args.pause)[0])
            vq_ours.append(timed(lambda: model.image_tokens(pixels), args.pause)[0])
        print(f"\nimage prompt prefill: 1 image {r}x{r} ({c.vq_config.tokens_per_image} tokens) + "
              f"{args.prompt} text tokens = {ids.shape[1]} tokens, batch 1, 1 new token")
        print(f"  transformers:  {1000 * hf_med:7.1f} ms (range {1000 * hf_lo:.0f}..{1000 * hf_hi:.0f})")
        print(f"  chameleon-jax: {1000 * our_med:7.1f} ms (range {1000 * our_lo:.0f}..{1000 * our_hi:.0f})")
        print(f"  ratio: {hf_med / our_med:.2f}x (medians), {hf_lo / our_lo:.2f}x (fastest runs); "
              f"our compile time {compile_s - our_med:.2f} s")
        print(f"  of which VQ-VAE encoding: transformers {1000 * statistics.median(vq_hf):.1f} ms, "
              f"chameleon-jax {1000 * statistics.median(vq_ours):.1f} ms; our prompt is padded to "
              f"{bucket_length(ids.shape[1])} tokens (length bucket)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
