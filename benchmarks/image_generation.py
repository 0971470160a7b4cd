"""Image generation speed, side by side in one run (CPU, fp32, medians of alternating runs).

(a) VQ-GAN decoder (image tokens -> pixels): our ``VQVAE.decode`` vs transformers'
    ``JanusVQVAEDecoder`` (the same architecture, see tests/test_vq_decoder.py) holding identical
    random weights, in Chameleon's decoder shapes (ch 128, ch_mult 1,1,2,2,4, 2 res blocks, 256
    latent; 39.3M params) on a ``--grid`` x ``--grid`` token grid (32 = Chameleon's 512x512).
(b) Image tokens/s of ``generate_image`` (3 streams per prompt, Meta's guidance, greedy) vs
    transformers ``generate`` on the same three streams per prompt with a logits processor that
    mixes each prompt's three rows by the same formula, allows only image tokens and forces the
    chosen token into all three rows (transformers' forward masks image tokens; the benchmark
    lifts that mask so the processor sees them). Both produce the same tokens (checked).
(c) Our image mode vs our own text decode at batch 3 x prompts (as many cache rows per step): decode steps
    per second of each, to show what guidance costs beyond the three rows.

    python benchmarks/image_generation.py                   # decoder grid 32; LM hidden 512, 8 layers
    python benchmarks/image_generation.py --grid 16 --image-resolution 256 --reps 2   # quicker
    python benchmarks/image_generation.py --skip generation --onednn   # XLA:CPU with oneDNN convolutions

Compile times are printed separately (first call minus a steady call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--onednn" in sys.argv:  # XLA:CPU's oneDNN convolutions (must be set before jax starts)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_onednn=true").strip()

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from common import (  # noqa: E402
    add_model_args, apply_memory_flag, first_text_id, load_both, median_spread, read_bandwidth, timed,
)


def bench_decoder(args) -> None:
    import jax
    import torch

    from chameleon_jax.config import VQConfig
    from chameleon_jax.model.vqvae import VQVAE
    from test_vq_decoder import SEVEN_B, _our_params, _torch_decoder  # the tested weight mapping

    vq = VQConfig(**SEVEN_B)
    dec, extra = _torch_decoder(vq, seed=0)
    params = jax.tree.map(jax.numpy.asarray, _our_params(dec, extra, len(vq.channel_multiplier)))
    n = len(params["decoder"]) and sum(x.size for x in jax.tree.leaves(params["decoder"]))
    module = VQVAE(vq)
    ours_fn = jax.jit(lambda p, c: module.apply({"params": p}, c, method=VQVAE.decode))
    g = args.grid
    codes = np.random.default_rng(0).integers(0, vq.num_embeddings, (args.decode_batch, g * g)).astype(np.int32)

    def ours():
        return np.asarray(ours_fn(params, codes))

    def theirs():
        with torch.inference_mode():
            z = extra.quantize(torch.tensor(codes, dtype=torch.long)).reshape(codes.shape[0], g, g, -1)
            return dec(extra.post_quant_conv(z.permute(0, 3, 1, 2))).numpy()

    first, out = timed(ours)
    ref = theirs()
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    t_ours, t_theirs = [], []
    for _ in range(args.reps):
        t_theirs.append(timed(theirs)[0])
        t_ours.append(timed(ours)[0])
    mo, lo_o, hi_o = median_spread(t_ours)
    mt, lo_t, hi_t = median_spread(t_theirs)
    side = out.shape[-1]
    print(f"\n(a) VQ-GAN decoder, {n / 1e6:.1f}M params, {args.decode_batch} x {g}x{g} tokens -> {side}x{side} px "
          f"(max rel diff {err:.1e})")
    print(f"  transformers (Janus decoder): {1000 * mt:8.0f} ms  (range {1000 * lo_t:.0f}..{1000 * hi_t:.0f})")
    print(f"  chameleon-jax:                {1000 * mo:8.0f} ms  (range {1000 * lo_o:.0f}..{1000 * hi_o:.0f})")
    print(f"  ratio: {mt / mo:.2f}x; our compile time {first - mo:.1f} s")


class GuidanceProcessor:
    """transformers LogitsProcessor: rows [3B, V] in (full, image, uncond) groups -> Meta's mix, image
    tokens only, greedy; the chosen token is the only finite logit of all three rows."""

    def __init__(self, image_ids, s_txt, s_img):
        import torch

        self.image_ids = torch.tensor(image_ids)
        self.s_txt, self.s_img = s_txt, s_img

    def __call__(self, input_ids, scores):
        import torch

        v = scores.shape[-1]
        g = scores.reshape(-1, 3, v)
        f, i, u = g[:, 0], g[:, 1], g[:, 2]
        mixed = u + self.s_img * (i - u) + self.s_txt * (f - i)
        allowed = torch.full_like(mixed, float("-inf"))
        allowed[:, self.image_ids] = mixed[:, self.image_ids]
        tok = allowed.argmax(-1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), tok.repeat_interleave(3)] = 0.0
        return out


def bench_generation(args) -> None:
    import jax
    import torch
    import transformers

    from chameleon_jax.generation.image import build_streams

    hf, model = load_both(args)
    c = model.config
    n_tokens = c.vq_config.tokens_per_image
    rng = np.random.default_rng(0)
    first_text = first_text_id(args)
    prompts = np.full((args.batch, args.prompt), 3, np.int64)
    prompts[:] = rng.integers(first_text, c.vocab_size, prompts.shape)
    prompts[:, 0] = 1
    mask = np.ones_like(prompts)
    s_txt, s_img = 3.0, 1.2
    rows, row_mask, _, _ = build_streams(prompts.astype(np.int32), mask.astype(np.int32), c, 3)
    image_ids = c.image_vocab.code_to_bpe[: c.vq_config.num_embeddings]
    hf.model.vocabulary_mapping.__dict__["image_tokens"] = []  # lift the forward's image-token mask
    processors = transformers.LogitsProcessorList([GuidanceProcessor(image_ids, s_txt, s_img)])

    def theirs():
        with torch.inference_mode():
            out = hf.generate(input_ids=torch.tensor(rows, dtype=torch.long),
                              attention_mask=torch.tensor(row_mask, dtype=torch.long), max_new_tokens=n_tokens,
                              min_new_tokens=n_tokens, do_sample=False, logits_processor=processors,
                              pad_token_id=3)
        return out[::3, rows.shape[1]:].numpy()

    def ours():
        return model.generate_image(prompts, mask, guidance_scale_text=s_txt, guidance_scale_image=s_img,
                                    do_sample=False)

    text_prompts = prompts.repeat(3, 0)  # as many cache rows as image mode

    def text3():
        return model.generate(text_prompts, None, max_new_tokens=n_tokens, min_new_tokens=n_tokens)

    print(f"\n(b) image mode: {args.batch} prompt(s) x 3 streams, prompt {args.prompt} tokens, "
          f"{n_tokens} image tokens each, greedy; LM hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"vocab {c.vocab_size}; read bandwidth {read_bandwidth():.1f} GB/s")
    first, got = timed(ours)
    first_text_s = timed(text3)[0]
    ref = theirs()
    same = bool(np.array_equal(got, ref))
    t_ours, t_theirs, t_text = [], [], []
    for _ in range(args.reps):
        t_theirs.append(timed(theirs)[0])
        t_ours.append(timed(ours)[0])
        t_text.append(timed(text3)[0])
    mo, lo_o, hi_o = median_spread(t_ours)
    mt, lo_t, hi_t = median_spread(t_theirs)
    mx = statistics.median(t_text)
    total = args.batch * n_tokens
    print(f"  tokens identical: {same}")
    print(f"  transformers:  {total / mt:8.1f} image tokens/s  ({mt:.2f} s/call, range {lo_t:.2f}..{hi_t:.2f})")
    print(f"  chameleon-jax: {total / mo:8.1f} image tokens/s  ({mo:.2f} s/call, range {lo_o:.2f}..{hi_o:.2f})")
    print(f"  ratio: {mt / mo:.2f}x; our compile time {first - mo:.1f} s")
    print(f"\n(c) our decode steps/s with {3 * args.batch} cache rows: image mode ({args.batch} prompt(s) x 3 "
          f"streams, guidance) {n_tokens / mo:.1f}, text decode at batch {3 * args.batch} {n_tokens / mx:.1f}; "
          f"ratio {mx / mo:.2f}x (text compile {first_text_s - mx:.1f} s)")
    jax.clear_caches()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, hidden=512, layers=8, intermediate=1376, vocab=65536, image_codes=8192, image_resolution=512)
    p.add_argument("--grid", type=int, default=32, help="decoder benchmark: token grid side (32 = 512x512 px)")
    p.add_argument("--decode-batch", type=int, default=1, help="decoder benchmark: images per call")
    p.add_argument("--batch", type=int, default=1, help="image mode: prompts per call")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--reps", type=int, default=3, help="timed runs per side (alternating)")
    p.add_argument("--skip", choices=["decoder", "generation"], default=None)
    p.add_argument("--onednn", action="store_true",
                   help="run XLA:CPU with --xla_cpu_use_onednn=true (oneDNN convolutions; faster decoder on x86)")
    args = p.parse_args(argv)
    apply_memory_flag(args)
    if args.skip != "decoder":
        bench_decoder(args)
    if args.skip != "generation":
        bench_generation(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
