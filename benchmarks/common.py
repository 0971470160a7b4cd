"""The random-model setup shared by the side-by-side benchmarks (decode.py, train_step.py, ...).

One recipe: a random transformers ``ChameleonForConditionalGeneration`` of the size the flags give,
saved to a temp dir and loaded by both sides (so both hold identical weights), plus timing and
machine-bandwidth helpers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from chameleon_jax.demo import tiny_vocabulary_map


def add_model_args(p: argparse.ArgumentParser, *, hidden: int, layers: int, intermediate: int, vocab: int,
                   image_codes: int, image_resolution: int) -> None:
    """The flags that size the random checkpoint (defaults differ per benchmark)."""
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=0, help="0: same as --heads (MHA)")
    p.add_argument("--intermediate", type=int, default=intermediate)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--image-codes", type=int, default=image_codes,
                   help="image codes (ids 4..); suppressed in text mode")
    p.add_argument("--image-resolution", type=int, default=image_resolution,
                   help="VQ input size; 5 levels, so (res/16)^2 image tokens")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="chameleon_jax.reuse_freed_memory() first (glibc settings, process-wide: both sides "
                   "run under them; benchmarks/host_memory.py compares)")


def build_checkpoint(directory: str, args) -> None:
    """A random HF checkpoint sized by :func:`add_model_args`' flags (seed 0)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.ChameleonConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=4096,
        vocabulary_map=tiny_vocabulary_map(args.vocab, args.image_codes),
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        vq_config=dict(
            embed_dim=64,
            num_embeddings=args.image_codes,
            latent_channels=64,
            resolution=args.image_resolution,
            base_channels=64,
            channel_multiplier=[1, 1, 2, 2, 4],
            num_res_blocks=1,
            attn_resolutions=[],
        ),
    )
    transformers.ChameleonForConditionalGeneration(config).eval().save_pretrained(directory)


def apply_memory_flag(args) -> None:
    """--reuse-freed-memory: ``cj.reuse_freed_memory()``, before JAX starts (an error if it cannot)."""
    import chameleon_jax as cj

    if args.reuse_freed_memory and not cj.reuse_freed_memory():
        raise SystemExit("--reuse-freed-memory: the glibc settings could not be applied (not glibc, or JAX "
                         "already started)")


def load_both(args):
    """(transformers model in fp32, chameleon-jax model in fp32) on the same random weights; prints
    the versions and the machine first."""
    import chameleon_jax as cj

    apply_memory_flag(args)
    import jax
    import torch
    import transformers

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="chameleon-bench-") as tmp:
        build_checkpoint(tmp, args)
        hf = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        model = cj.load(tmp, dtype="float32")
    return hf, model


def first_text_id(args) -> int:
    """The first id past the image codes and the special tokens of ``tiny_vocabulary_map``."""
    return 4 + args.image_codes + 4


def median_spread(xs):
    return statistics.median(xs), min(xs), max(xs)


def timed(fn, pause: float = 0.0):
    """(seconds, result) of ``fn()``, after ``pause`` seconds of sleep: torch's and XLA's worker threads
    spin for a while after their work and would steal the cores from whatever runs next."""
    if pause:
        time.sleep(pause)
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def memory_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a plain numpy copy (bytes read + bytes written) of an array much larger than L2."""
    src = np.ones(mb * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def read_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a jitted sum over an array much larger than L2 (reads only, all cores): roughly
    what streaming weights from memory can reach."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t)
    del x
    return mb * 2**20 / statistics.median(times) / 1e9
