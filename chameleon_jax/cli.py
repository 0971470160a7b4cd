"""``chameleon-jax`` console entry point. Each subcommand is a ``_cmd_*`` function + parser."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import ChameleonError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run

    return run(out_dir=args.out_dir, seed=args.seed, preview=args.preview)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint.convert import convert

    kind, notes = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                          model_size=args.model_size, quantize=args.quantize)
    print(f"converted {kind} checkpoint {args.src} -> {args.dst}")
    for note in notes:
        print(note if note.startswith("warning: ") else f"note: {note}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint.convert import export

    if not args.max_shard_gb > 0:
        raise ChameleonError(f"--max-shard-gb: expected a size in GiB > 0, got {args.max_shard_gb}")
    export(args.src, args.dst, overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"exported {args.src} -> {args.dst} (HF safetensors)")
    return 0


def _check_generate_args(args: argparse.Namespace) -> None:
    """What can be checked before the (slow) model load, naming the flag."""
    import math
    import os

    def need(ok: bool, flag: str, want: str, got) -> None:
        if not ok:
            raise ChameleonError(f"{flag}: expected {want}, got {got}")

    image = args.mode == "image"
    if args.temperature is None:
        args.temperature = 0.7 if image else 0.0
    if args.top_p is None:
        args.top_p = 0.9 if image and args.temperature > 0 else 1.0
    if args.mode in ("image", "interleaved"):  # both draw images into PNG files
        want = ("a PNG path for --mode image" if image else
                "a PNG path for --mode interleaved (image i goes to OUT-i.png)")
        need(args.out is not None, "--out", want, None)
        if image:
            need(args.num_images >= 1, "--num-images", "an integer >= 1", args.num_images)
        else:
            need(args.max_images >= 0, "--max-images", "an integer >= 0", args.max_images)
        for flag, v in (("--cfg-text", args.cfg_text), ("--cfg-image", args.cfg_image)):
            need(math.isfinite(v) and v >= 0, flag, "a finite number >= 0 (1 = off)", v)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        need(os.path.isdir(out_dir), "--out", "a file in an existing directory", args.out)
    need(args.max_new_tokens >= 1, "--max-new-tokens", "an integer >= 1", args.max_new_tokens)
    need(math.isfinite(args.temperature), "--temperature", "a finite number >= 0 (0 = greedy)", args.temperature)
    need(args.top_k >= 0, "--top-k", "an integer >= 0 (0 = off)", args.top_k)
    need(0.0 <= args.top_p <= 1.0, "--top-p", "a value in [0, 1] (1 = off)", args.top_p)
    need(math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0, "--repetition-penalty",
         "a number > 0 (1 = off)", args.repetition_penalty)
    need(args.chunk_size >= 1, "--chunk-size", "an integer >= 1", args.chunk_size)
    for image in args.image or []:
        if not os.path.isfile(image):
            raise ChameleonError(f"--image {image}: no such file")
    if args.model is not None and not os.path.isdir(args.model):
        raise ChameleonError(f"--model {args.model}: no such directory")


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import load
    from .processing import ChameleonProcessor

    _check_generate_args(args)
    if args.temperature < 0:
        raise ChameleonError(f"--temperature: expected >= 0 (0 = greedy), got {args.temperature}")
    sampling = args.temperature > 0
    if not sampling and (args.top_k or args.top_p < 1.0):
        raise ChameleonError("--top-k / --top-p only apply when sampling: pass --temperature > 0 as well")
    t0 = time.perf_counter()
    if args.model is None:
        from .demo import checkpoint_dir

        args.model = checkpoint_dir()
        print(f"no --model: using the shipped demo model ({args.model}; it knows the 'shapes' world: "
              "try --prompt '<image>' --image shape.png, or --mode image --prompt 'a red circle on a "
              "white background')", file=sys.stderr)
    model = load(args.model, dtype=args.dtype, quantize=args.quantize)
    proc = ChameleonProcessor.from_pretrained(args.model)
    prompt = args.prompt
    images = list(args.image or [])
    if images and proc.image_token not in prompt:
        prompt = proc.image_token * len(images) + prompt  # images first, then the question
    batch = proc(text=[prompt], images=images or None, return_for_text_completion=args.text_completion)
    t1 = time.perf_counter()
    print(f"loaded in {t1 - t0:.1f}s; prompt: {batch['input_ids'].shape[1]} tokens", file=sys.stderr)
    if args.mode == "image":
        return _generate_images(args, model, batch, sampling, t1)
    if args.mode == "interleaved":
        return _generate_interleaved(args, model, proc, batch, sampling, t1)
    stream = model.generate_stream(
        batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
        max_new_tokens=args.max_new_tokens, do_sample=sampling, temperature=args.temperature or 1.0,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, repetition_penalty=args.repetition_penalty,
        chunk_size=args.chunk_size,
    )
    tokens: list[int] = []
    shown = ""
    first = None
    for chunk in stream:
        first = first or time.perf_counter()
        tokens += chunk[0].tolist()
        text = proc.decode(tokens, skip_special_tokens=True)
        ready = text.rstrip("\ufffd")  # hold back a character whose bytes are not all out yet
        if ready.startswith(shown):
            sys.stdout.write(ready[len(shown):])
            sys.stdout.flush()
            shown = ready
    text = proc.decode(tokens, skip_special_tokens=True)
    sys.stdout.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
    sys.stdout.write("\n")
    t2 = time.perf_counter()
    print(f"{len(tokens)} tokens in {t2 - t1:.2f}s, the first after {first - t1:.2f}s "
          "(both include compiling)", file=sys.stderr)
    return 0


def _save_png(image, path: str) -> None:
    import os

    tmp = f"{path}.tmp-{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)  # a failed write leaves any previous file intact


def _generate_interleaved(args: argparse.Namespace, model, proc, batch, sampling: bool, t1: float) -> int:
    import os

    text = dict(do_sample=sampling, temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty)
    image = dict(guidance_scale_text=args.cfg_text, guidance_scale_image=args.cfg_image)  # Meta's sampling
    (segments,) = model.generate_interleaved(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                                             max_new_tokens=args.max_new_tokens, max_images=args.max_images,
                                             text=text, image=image, seed=args.seed)
    stem, ext = os.path.splitext(args.out)
    n = 0
    for kind, ids in segments:
        if kind == "text":
            sys.stdout.write(proc.decode(ids, skip_special_tokens=True))
        else:
            path = f"{stem}-{n}{ext or '.png'}"
            _save_png(model.decode_images(ids[None])[0], path)
            sys.stdout.write(f"\n[image: {path}]\n")
            n += 1
    sys.stdout.write("\n")
    print(f"{len(segments)} segment(s), {n} image(s) in {time.perf_counter() - t1:.2f}s (includes compiling)",
          file=sys.stderr)
    return 0


def _generate_images(args: argparse.Namespace, model, batch, sampling: bool, t1: float) -> int:
    import os

    import numpy as np

    n = args.num_images
    ids, mask = np.repeat(batch["input_ids"], n, 0), np.repeat(batch["attention_mask"], n, 0)
    pixels = batch.get("pixel_values")
    if pixels is not None and n > 1:
        pixels = np.concatenate([pixels] * n)  # each copy of the prompt takes its own images, in order

    def progress(done: int, total: int) -> None:
        print(f"\rimage tokens {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    codes = model.generate_image(ids, mask, pixels, guidance_scale_text=args.cfg_text,
                                 guidance_scale_image=args.cfg_image, do_sample=sampling,
                                 temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                                 seed=args.seed, progress=progress)
    t2 = time.perf_counter()
    images = model.decode_images(codes)
    stem, ext = os.path.splitext(args.out)
    paths = [args.out] if n == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(n)]
    for image, path in zip(images, paths):
        _save_png(image, path)
        print(path)
    print(f"{n} image(s), {codes.shape[1]} tokens each, in {t2 - t1:.2f}s (includes compiling); decoded in "
          f"{time.perf_counter() - t2:.2f}s", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from .training import TrainConfig, Trainer

    if args.max_steps is not None and args.max_steps < 1:
        raise ChameleonError(f"--max-steps: expected an integer >= 1, got {args.max_steps}")
    tc = TrainConfig.from_json_file(args.config, args.set)
    trainer = Trainer(tc)
    try:
        trainer.run(max_steps=args.max_steps)
    finally:
        trainer.close()
    print(f"stopped at step {trainer.step}/{tc.steps}; checkpoints: "
          f"{os.path.join(tc.output_dir, 'checkpoints')}; metrics: {trainer.metrics_path}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import os

    from .config import ChameleonConfig, load_preset
    from .plan import parse_mesh, plan, plan_image_generation

    if args.model in ("7b", "30b"):
        config = load_preset(f"chameleon-{args.model}")
    elif os.path.isdir(args.model):
        config = ChameleonConfig.from_json_file(os.path.join(args.model, "config.json"))
    else:
        config = load_preset(args.model)
    if args.attention_chunk < 0:
        raise ChameleonError(f"--attention-chunk: expected 0 (off) or an integer >= 1, got {args.attention_chunk}")
    for key in ("seq", "batch"):
        if getattr(args, key) < 1:
            raise ChameleonError(f"--{key}: expected an integer >= 1, got {getattr(args, key)}")
    if args.image:
        if args.task != "generate":
            raise ChameleonError(f"--image: only with --task generate, got --task {args.task}")
        if args.quantize:
            raise ChameleonError("--quantize: not with --image yet (the image loop plans float weights)")
        res = plan_image_generation(config, args.topology, parse_mesh(args.mesh), prompt=args.seq, batch=args.batch,
                                    dtype=args.dtype, scan=args.scan)
    else:
        res = plan(config, args.topology, parse_mesh(args.mesh), task=args.task, seq=args.seq, batch=args.batch,
                   remat=args.remat, dtype=args.dtype, loss_chunk=args.loss_chunk, lora_rank=args.lora_rank,
                   base_dtype=args.base_dtype, scan=args.scan, optimizer_dtype=args.optimizer_dtype,
                   offload_optimizer=args.offload_optimizer, attention_chunk=args.attention_chunk,
                   quantize=args.quantize)
    print(json.dumps(dataclasses.asdict(res)) if args.json else res.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="chameleon-jax", description="Meta's Chameleon in JAX/Flax.")
    p.add_argument("--version", action="version", version=f"chameleon-jax {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="the shipped demo model (no downloads) captions shapes, draws two prompts, completes text",
        description="Loads the tiny Chameleon that ships with the package (trained here on the 'shapes' world: "
        "one colored circle, square or triangle on a white, black or gray 64x64 canvas), captions three freshly "
        "drawn shapes (truth beside each caption), draws two prompts with classifier-free guidance into PNGs, "
        "runs one text completion and prints timings and the next commands to try.",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the shapes to caption and of the drawing (default 0)")
    d.add_argument("--out-dir", default="chameleon-demo", metavar="DIR",
                   help="where the drawn PNGs go (created if missing; default ./chameleon-demo)")
    d.add_argument("--preview", action=argparse.BooleanOptionalAction, default=None,
                   help="show the drawings in the terminal as colored half-blocks (default: when stdout is a "
                   "terminal)")
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
    c.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the decoder's projections and the LM head weight-only quantized (int8: one scale "
                   "per output channel; int4: per channel and group of 128 rows), each quantized as it is read "
                   "(after --dtype); load(DST) then gives the quantized model directly. Embeddings, norms and "
                   "the VQ-VAE stay float. Such a DST cannot be exported back to HF")
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
    g = sub.add_parser(
        "generate",
        help="generate text from a prompt (and images), streamed as it is produced",
        description="Tokenize --prompt (with --image files) with the checkpoint's processor, generate "
        "with a jitted prefill + on-device decode loop and print the text as it streams. Greedy unless "
        "--temperature > 0. Without --model, runs the shipped demo model (trained on the 'shapes' world; no "
        "downloads). Timing goes to stderr, text to stdout. With --mode image it draws images instead "
        "(--out, --num-images, --cfg-text, --cfg-image; sampling with --temperature 0.7 --top-p 0.9 unless "
        "given, as Meta's defaults) and reports progress on stderr.",
    )
    g.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (HF layout or converted) holding the tokenizer files too; "
                   "default: the shipped demo model (chameleon_jax/demo/checkpoint)")
    g.add_argument("--prompt", required=True, metavar="TEXT",
                   help="the prompt; each <image> in it takes the next --image (without any, the images "
                   "go first)")
    g.add_argument("--image", action="append", metavar="FILE",
                   help="an image file; repeat for several, in the order of the <image> placeholders")
    g.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="most tokens to generate; stops earlier at the end-of-sequence token (default 32)")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature; 0 is greedy decoding, > 0 samples (default: 0 in text mode, "
                   "0.7 in image mode)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only among the K most likely tokens (0 = off, default; needs "
                   "--temperature > 0)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P (1 = off; "
                   "default 1 in text mode, 0.9 in image mode; needs --temperature > 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random draws when sampling (default 0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="transformers' repetition penalty on tokens already present (1 = off, default)")
    g.add_argument("--text-completion", action="store_true",
                   help="continue the prompt as plain text: no chat separator token appended (the "
                   "processor's return_for_text_completion)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="params and compute dtype (default float32; bfloat16 for TPU/GPU)")
    g.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only int8 (per channel) or int4 (groups of 128) projections and LM head")
    g.add_argument("--chunk-size", type=int, default=8, metavar="N",
                   help="tokens generated per on-device loop between prints (default 8)")
    g.add_argument("--mode", choices=["text", "image", "interleaved"], default="text",
                   help="text (default): generate text; image: generate images (Meta's image mode with "
                   "classifier-free guidance) and write them as PNG files to --out; interleaved: text until the "
                   "model opens an image, that image (guided, temperature 0.7, top-p 0.9) to FILE-i.png, then "
                   "text again (--temperature/--top-* apply to the text)")
    g.add_argument("--out", metavar="FILE.png", default=None,
                   help="--mode image: where to write the image (required); with --num-images N > 1, "
                   "FILE-0.png .. FILE-<N-1>.png. --mode interleaved: image i goes to FILE-i.png (required)")
    g.add_argument("--max-images", type=int, default=1, metavar="N",
                   help="--mode interleaved: at most N images (default 1); the model's next begin-of-image ends it")
    g.add_argument("--num-images", type=int, default=1, metavar="N",
                   help="--mode image: images to draw for the prompt, in one batch (seeds differ per image; default 1)")
    g.add_argument("--cfg-text", type=float, default=3.0, metavar="S",
                   help="--mode image / interleaved: guidance scale of the text condition (default 3.0; 1 with "
                   "--cfg-image 1 = no guidance)")
    g.add_argument("--cfg-image", type=float, default=1.2, metavar="S",
                   help="--mode image / interleaved: guidance scale of the image condition (default 1.2)")
    g.set_defaults(func=_cmd_generate)
    t = sub.add_parser(
        "train",
        help="fine-tune (full or LoRA) on JSONL image-text data from a JSON config",
        description="Fine-tune a Chameleon checkpoint as the JSON config says (keys: "
        "chameleon_jax.train.TrainConfig; examples: configs/train-tiny.json, configs/train-7b-tpu.json). "
        "Prints a progress line (loss, learning rate, grad norm, tokens/s, data position) every log_every "
        "steps and appends each step's metrics to output_dir/metrics.jsonl. Checkpoints go to "
        "output_dir/checkpoints; if some exist there, training resumes exactly from the latest (params or "
        "LoRA adapters, optimizer state, step, RNG, data position). configs/train-tiny.json (demo: true) "
        "builds a tiny random model, tokenizer and image-text dataset and trains on them.",
    )
    t.add_argument("--config", required=True, help="the training config (JSON); unknown keys are an error")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; VALUE is parsed as JSON (else taken as a string), dotted "
                   "keys reach nested objects: --set learning_rate=1e-4 --set lora.rank=16 "
                   "--set mesh.fsdp=8. Repeatable")
    t.add_argument("--max-steps", type=int, default=None,
                   help="run at most this many steps now, then checkpoint and exit (the next run resumes)")
    t.set_defaults(func=_cmd_train)
    pl = sub.add_parser(
        "plan",
        help="compile a train step or decode step for a TPU slice on abstract params; print per-device memory",
        description="Compile the real train step (task train or lora) or one decode step (task generate) of a "
        "model on abstract params (no weights are read) for a device topology, and print per-device bytes "
        "(params, optimizer state, KV cache, XLA's arguments and temporaries, total) against the chip's HBM, "
        "and the compile time. TPU topologies need the tpu-aot extra (libtpu); run with JAX_PLATFORMS=cpu.",
    )
    pl.add_argument("--model", default="7b", help="7b, 30b (the presets), a checkpoint directory or a config.json")
    pl.add_argument("--topology", required=True, help="v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:2x2 ... or cpu:N")
    pl.add_argument("--mesh", default="fsdp=8", help="mesh axes whose product is the device count: fsdp=8 or "
                    "data=2,fsdp=2,tensor=2")
    pl.add_argument("--task", default="train", choices=["train", "lora", "generate"], help="what to compile")
    pl.add_argument("--seq", type=int, default=4096, help="tokens per row (train), KV-cache length (generate) "
                    "or prompt tokens (generate --image)")
    pl.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    pl.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"],
                    help="rematerialization policy of the decoder layers (train, lora)")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="compute dtype (generate: the params' dtype too); master params stay float32")
    pl.add_argument("--base-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="lora: dtype of the frozen base params")
    pl.add_argument("--loss-chunk", type=int, default=0,
                    help="train/lora: LM head + loss over chunks of this many tokens (0: whole sequence)")
    pl.add_argument("--attention-chunk", type=int, default=0,
                    help="train/lora: attention over query blocks of this many tokens (0: all queries at once)")
    pl.add_argument("--lora-rank", type=int, default=16, help="lora: adapter rank (all projections)")
    pl.add_argument("--scan", action="store_true",
                    help="scanned decoder layers (one nn.scan; params stacked [L, ...]; train/lora: each layer's "
                    "weights all-gathered inside the scan, one layer at a time; generate: the KV cache stacked too, "
                    "as load(..., scan_layers=True) runs it)")
    pl.add_argument("--optimizer-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="train/lora: dtype of the Adam moments (bfloat16 halves the optimizer state)")
    pl.add_argument("--offload-optimizer", action="store_true",
                    help="train/lora: keep the optimizer state in host memory (pinned_host) between steps")
    pl.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="generate: weight-only int8 / int4 projections and LM head (chameleon_jax/quant.py)")
    pl.add_argument("--image", action="store_true",
                    help="generate: image mode's whole decode loop (image_seq_length steps, guidance's 3 cache rows "
                    "per prompt); bytes accessed are per generated token")
    pl.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    pl.set_defaults(func=_cmd_plan)
    return p


def _as_flag(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """An error naming an argument by its Python name (``max_new_tokens: ...``, as the library
    says it) names the command's flag instead (``--max-new-tokens: ...``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            for a in action.choices[command]._actions:
                if a.option_strings and message.startswith(f"{a.dest}:"):
                    return a.option_strings[-1] + message[len(a.dest):]
    return message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ChameleonError as e:
        print(f"chameleon-jax: error: {_as_flag(str(e), parser, args.command)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
