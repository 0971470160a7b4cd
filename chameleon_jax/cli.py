"""``chameleon-jax`` console entry point. Each subcommand is a ``_cmd_*`` function + parser."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from .errors import ChameleonError


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from . import load
    from .demo import build_tiny_checkpoint
    from .vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN

    with tempfile.TemporaryDirectory(prefix="chameleon-demo-") as tmp:
        t0 = time.perf_counter()
        path = build_tiny_checkpoint(f"{tmp}/tiny", seed=args.seed)
        t1 = time.perf_counter()
        model = load(path, dtype="float32")
        t2 = time.perf_counter()
        c = model.config
        n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(model.params))
        print(f"built a tiny random checkpoint in {t1 - t0:.2f}s: {path}")
        print(
            f"loaded in {t2 - t1:.2f}s: {n_params:,} params, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, vocab {c.vocab_size}"
        )
        vm = c.vocabulary_map
        names = {v: k for k, v in vm.items()}
        rng = np.random.default_rng(args.seed)
        text = [vm["<s>"]] + rng.integers(vm[IMAGE_TOKEN] + 1, c.vocab_size, 12).tolist()
        per_image = c.vq_config.tokens_per_image
        image = [vm[BOI_TOKEN]] + [vm[IMAGE_TOKEN]] * per_image + [vm[EOI_TOKEN]]
        ids = np.array([text[:6] + image + text[6:]], np.int32)
        r = c.vq_config.resolution
        # A smooth synthetic image in the processor's pixel range [-1, 1).
        yy, xx = np.mgrid[0:r, 0:r] / r
        pixels = np.stack([xx, yy, 1 - xx]).astype(np.float32)[None] * 2 - 1
        t3 = time.perf_counter()
        logits = model.logits(ids, pixel_values=pixels)
        t4 = time.perf_counter()
        logits = model.logits(ids, pixel_values=pixels)
        t5 = time.perf_counter()
        codes = model.image_tokens(pixels)
        print(
            f"prompt: {ids.shape[1]} tokens ({len(text)} text + 1 image of {r}x{r} px -> {per_image} image tokens)"
        )
        print(f"forward: {1000 * (t4 - t3):.0f} ms first call (compile), {1000 * (t5 - t4):.1f} ms steady state")
        print(f"image tokens (first 8 BPE ids): {codes[0, :8].tolist()}")
        last = logits[0, -1]
        top = np.argsort(-last)[: args.top]
        print(f"top {args.top} next tokens:")
        for i in top:
            print(f"  {int(i):5d} {names.get(int(i), '?'):>12s}  logit {last[i]:+.4f}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    kind, notes = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                          model_size=args.model_size)
    print(f"converted {kind} checkpoint {args.src} -> {args.dst}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .convert import export

    export(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"exported {args.src} -> {args.dst} (HF safetensors)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chameleon-jax", description="Meta's Chameleon in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="build a tiny random checkpoint (no downloads), load it and run a forward pass with an image",
        description="Builds a tiny random Chameleon checkpoint in a temp dir, loads it, runs a forward pass "
        "over a prompt holding an image and prints sizes, timings and the top next tokens.",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (default 0)")
    d.add_argument("--top", type=int, default=5, help="how many top next tokens to print (default 5)")
    d.set_defaults(func=_cmd_demo)
    c = sub.add_parser(
        "convert",
        help="HF directory or Meta's original release -> Orbax checkpoint directory",
        description="Convert SRC (an HF Chameleon directory with config.json + *.safetensors, or Meta's original "
        "release: models/<size>/params.json + consolidated*.pth and tokenizer/) into DST: an Orbax checkpoint plus "
        "config.json and the tokenizer files, loadable by chameleon_jax.load(DST) (also onto a mesh). Streams "
        "tensor by tensor; writes into a temp dir beside DST and renames at the end, so a failure leaves no DST.",
    )
    c.add_argument("src", help="source directory (HF layout or Meta release root / models/<size> dir)")
    c.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    c.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="cast params to this dtype (default: keep the source's dtype)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically, at the end)")
    c.add_argument("--model-size", default=None,
                   help="Meta release root holding several models/*: which one to convert (e.g. 7b, 30b)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_convert)
    e = sub.add_parser(
        "export",
        help="Orbax checkpoint directory (from convert) -> HF safetensors directory",
        description="Export a converted (Orbax) checkpoint SRC to an HF directory DST that transformers loads: "
        "safetensors shards (+ index), config.json and the tokenizer files. Params keep their dtype.",
    )
    e.add_argument("src", help="a directory written by `chameleon-jax convert`")
    e.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically, at the end)")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard in GiB (default 5)")
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ChameleonError as e:
        print(f"chameleon-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
