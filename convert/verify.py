#!/usr/bin/env python
"""Check a converted Chameleon checkpoint against the Hugging Face reference it came from.

    python convert/verify.py --reference HF_DIR --converted DIR [--prompt TEXT ...] [--image PATH ...]
                             [--max-new-tokens N] [--threshold 1e-3] [--min-agreement 1.0]
                             [--dtype float32]

HF_DIR is a transformers checkpoint directory (config.json, *.safetensors, tokenizer and
processor files), e.g. a local copy of ``facebook/chameleon-7b``. It is loaded with
transformers' ``ChameleonForConditionalGeneration`` and ``ChameleonProcessor``, from local files
only (nothing is downloaded). DIR is what ``chameleon-jax convert`` wrote (or any directory
``chameleon_jax.load`` reads, an HF one included); it is loaded through chameleon-jax's public API.

transformers' processor output is fed to both models. Per prompt the script prints the largest
absolute and relative logit error over the prompt's positions (relative = max |ours - ref| /
max |ref|; image-token columns are left out, both models set them to the dtype's minimum),
greedy agreement over ``--max-new-tokens`` steps, whether the VQ image codes agree, and PASS or
FAIL. When DIR holds tokenizer files, chameleon-jax's processor is checked to give the same
input_ids as transformers'.

Exit status: 0 when every prompt passes (relative error <= --threshold and greedy agreement
>= --min-agreement, and processor ids equal), 1 when one fails, 2 on bad arguments or inputs.
Default prompts: one text prompt and one prompt with an ``<image>`` (a synthetic gradient image
built here, so no file is needed). bfloat16 needs a looser threshold (say 3e-2) and usually
``--min-agreement`` below 1: rounding differences flip near-tied greedy choices.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Sequence

import numpy as np

DEFAULT_PROMPTS = ("The capital of France is", "<image>What do you see in this picture?")
IMAGE_TOKEN = "<image>"
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("highest", "high", "default")


class VerifyError(ValueError):
    """Bad arguments or inputs (missing directories, image counts): exit status 2."""


def synthetic_image(width: int = 96, height: int = 64):
    """A deterministic RGB test picture: horizontal red ramp, vertical green ramp, blue checkers.

    Not square, so the processor's shortest-edge resize and center crop both do something.
    """
    from PIL import Image

    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    yy, xx = np.mgrid[0:height, 0:width]
    checkers = ((yy // 8 + xx // 8) % 2) * 200 + 30
    rgb = np.stack([x, y, checkers], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _check_dirs(reference: str, converted: str) -> None:
    if not os.path.isdir(reference):
        raise VerifyError(f"--reference {reference}: no such directory (expected a transformers Chameleon "
                          "checkpoint directory: config.json, *.safetensors and tokenizer files)")
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(reference, name)):
            raise VerifyError(f"--reference {reference}: no {name} (expected a transformers Chameleon "
                              "checkpoint directory with its tokenizer and processor files)")
    if not os.path.isdir(converted):
        raise VerifyError(f"--converted {converted}: no such directory (expected the output of "
                          "`chameleon-jax convert`, or an HF directory)")
    if not os.path.isfile(os.path.join(converted, "config.json")):
        raise VerifyError(f"--converted {converted}: no config.json (expected the output of "
                          "`chameleon-jax convert`, or an HF directory)")


def _open_images(images) -> list:
    from PIL import Image

    out = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if not os.path.isfile(path):
                raise VerifyError(f"--image {path}: no such file")
            try:
                with Image.open(path) as im:
                    im.load()
                    out.append(im.copy())
            except OSError as e:
                raise VerifyError(f"--image {path}: not an image PIL can read ({e})") from None
        else:
            out.append(item)
    return out


def _assign_images(prompts: Sequence[str], images) -> list[list]:
    """Per prompt, the images its ``<image>`` placeholders take, in order across prompts."""
    counts = [p.count(IMAGE_TOKEN) for p in prompts]
    if images is None:
        return [[synthetic_image() for _ in range(n)] for n in counts]
    images = _open_images(images)
    if len(images) != sum(counts):
        raise VerifyError(f"--image: {len(images)} image(s) given but the prompts hold {sum(counts)} "
                          f"{IMAGE_TOKEN} placeholder(s) (per prompt: {counts}); each placeholder takes one "
                          "image, in order (give no --image to use the built-in synthetic picture)")
    out, i = [], 0
    for n in counts:
        out.append(images[i:i + n])
        i += n
    return out


def _image_token_ids(vocabulary_map: dict) -> np.ndarray:
    """BPE ids of the image-code tokens (``IMGIMG*`` names), whose logits both models suppress."""
    return np.array(sorted(i for name, i in vocabulary_map.items() if name.startswith("IMGIMG")), np.int64)


def _load_reference(reference: str, dtype: str):
    import torch
    import transformers

    torch_dtype = getattr(torch, dtype)
    try:
        processor = transformers.ChameleonProcessor.from_pretrained(reference, local_files_only=True)
        try:
            model = transformers.ChameleonForConditionalGeneration.from_pretrained(
                reference, local_files_only=True, dtype=torch_dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = transformers.ChameleonForConditionalGeneration.from_pretrained(
                reference, local_files_only=True, torch_dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise VerifyError(f"--reference {reference}: transformers cannot load it "
                          f"({type(e).__name__}: {e})") from None
    return processor, model.eval()


def _our_processor(converted: str):
    """chameleon-jax's processor for DIR, or None when DIR holds no tokenizer files."""
    import chameleon_jax as cj

    try:
        return cj.ChameleonProcessor.from_pretrained(converted)
    except cj.ChameleonError:
        return None


def _greedy_reference(model, inputs: dict, max_new_tokens: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                             num_beams=1, repetition_penalty=1.0)
    new = out[0, inputs["input_ids"].shape[1]:].numpy().astype(np.int64)
    return np.concatenate([new, np.full(max_new_tokens - new.size, -1, np.int64)])


def _cut_after_stop(tokens: np.ndarray, stop_ids: set) -> np.ndarray:
    """-1 after the first stop token: transformers ends early (or pads with its own pad id), we pad
    with pad_token_id; what follows the end of a sequence is not compared."""
    tokens = tokens.copy()
    hits = np.flatnonzero(np.isin(tokens, list(stop_ids)))
    if hits.size:
        tokens[hits[0] + 1:] = -1
    return tokens


def _stop_ids(*ids) -> set:
    out = set()
    for i in ids:
        if isinstance(i, (list, tuple)):
            out.update(int(x) for x in i)
        elif i is not None:
            out.add(int(i))
    return out


def _agreement(ref: np.ndarray, ours: np.ndarray) -> tuple[float, int | None]:
    """(fraction of equal tokens, first step where they differ or None)."""
    equal = ref == ours
    diff = np.flatnonzero(~equal)
    return float(equal.mean()) if equal.size else 1.0, (int(diff[0]) if diff.size else None)


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def verify(reference, converted, prompts=None, images=None, max_new_tokens: int = 16, threshold: float = 1e-3,
           dtype: str = "float32", min_agreement: float = 1.0, chat: bool = False,
           check_processor: bool = True, matmul_precision: str = "highest", out=None) -> dict:
    """Compare ``converted`` (chameleon-jax) with ``reference`` (transformers) on a few prompts.

    Args:
      reference: transformers checkpoint directory (with tokenizer and processor files).
      converted: directory ``chameleon_jax.load`` reads (``chameleon-jax convert`` output or HF).
      prompts: list of str; ``<image>`` marks where an image goes. None: :data:`DEFAULT_PROMPTS`
        (the image prompt is dropped, with a note, when the checkpoint has no image tokenizer).
      images: PIL images or file paths, one per ``<image>`` across the prompts in order; None:
        every placeholder takes :func:`synthetic_image`.
      max_new_tokens: greedy steps compared.
      threshold: largest allowed relative logit error (max |ours - ref| / max |ref|).
      dtype: both models' parameter and compute dtype ("float32", "bfloat16", "float16").
      min_agreement: smallest allowed fraction of equal greedy tokens.
      chat: append the chat separator (transformers' default) instead of completing the text.
      check_processor: also check chameleon-jax's processor gives transformers' input_ids.
      matmul_precision: JAX default matmul precision while running ours ("highest" makes TPU/GPU
        float32 matmuls exact float32; "default" measures what the library does unaided).
      out: stream for the report (default stdout).

    Returns a dict: ``ok`` (bool), ``threshold``, ``min_agreement``, ``dtype``, ``notes`` and
    ``prompts``: per prompt ``prompt``, ``n_tokens``, ``n_images``, ``max_abs_err``, ``max_rel_err``,
    ``agreement``, ``first_divergence`` (step or None), ``ref_tokens``, ``our_tokens`` (lists of
    max_new_tokens ids, -1 after the first end-of-sequence token),
    ``image_codes_equal`` (bool or None), ``processor_ids_equal`` (bool or None),
    ``pixel_max_abs_diff`` (float or None) and ``ok``. Raises :class:`VerifyError` on bad input.
    """
    out = out or sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    reference, converted = os.fspath(reference), os.fspath(converted)
    if dtype not in DTYPES:
        raise VerifyError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise VerifyError(f"--max-new-tokens {max_new_tokens!r}: expected an integer >= 1")
    if not 0.0 <= min_agreement <= 1.0:
        raise VerifyError(f"--min-agreement {min_agreement!r}: expected a fraction in [0, 1]")
    if matmul_precision not in PRECISIONS:
        raise VerifyError(f"--matmul-precision {matmul_precision!r}: expected one of {', '.join(PRECISIONS)}")
    if threshold < 0:
        raise VerifyError(f"--threshold {threshold!r}: expected a non-negative number")
    _check_dirs(reference, converted)
    default_prompts = prompts is None
    if default_prompts:
        prompts = list(DEFAULT_PROMPTS)
    else:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise VerifyError("--prompt: no prompts to check")
    per_prompt_images = _assign_images(prompts, images)  # bad image arguments fail before the slow loads

    import jax
    import torch

    import chameleon_jax as cj

    notes: list[str] = []
    t0 = time.perf_counter()
    ref_proc, ref_model = _load_reference(reference, dtype)
    t1 = time.perf_counter()
    try:
        model = cj.load(converted, dtype=dtype)
    except cj.ChameleonError as e:
        raise VerifyError(f"--converted {converted}: chameleon-jax cannot load it: {e}") from None
    t2 = time.perf_counter()
    our_proc = _our_processor(converted) if check_processor else None
    if check_processor and our_proc is None:
        notes.append(f"{converted} holds no tokenizer files: chameleon-jax's processor was not checked")

    if model.config.vq_config is None and any(per_prompt_images):
        if not (default_prompts and images is None):
            raise VerifyError(f"--prompt: a prompt holds {IMAGE_TOKEN} but the converted checkpoint has no "
                              "VQ-VAE (image tokenizer), so it cannot take images")
        keep = [i for i, imgs in enumerate(per_prompt_images) if not imgs]
        prompts, per_prompt_images = [prompts[i] for i in keep], [per_prompt_images[i] for i in keep]
        notes.append("the converted checkpoint has no VQ-VAE (image tokenizer): image prompt skipped")
    text_cols = ~np.isin(np.arange(ref_model.config.vocab_size),
                         _image_token_ids(ref_model.config.vocabulary_map or {}))
    ref_eos = getattr(ref_model.generation_config, "eos_token_id", None)
    stop_ids = _stop_ids(model.config.eos_token_id, ref_eos)

    say(f"reference : {reference} (transformers ChameleonForConditionalGeneration, {dtype}, "
        f"loaded in {t1 - t0:.1f}s)")
    say(f"converted : {converted} (chameleon-jax, {dtype}, loaded in {t2 - t1:.1f}s)")
    say(f"checks    : relative logit error <= {threshold:g}, greedy agreement >= {min_agreement:g} "
        f"over {max_new_tokens} new tokens")
    for note in notes:
        say(f"note      : {note}")

    results = []
    precision = jax.default_matmul_precision(matmul_precision) if matmul_precision != "default" \
        else contextlib.nullcontext()
    for k, (prompt, imgs) in enumerate(zip(prompts, per_prompt_images)):
        kwargs = dict(text=[prompt], return_for_text_completion=not chat)
        if imgs:
            kwargs["images"] = imgs
        ref_in = ref_proc(**kwargs, return_tensors="pt")
        ids = ref_in["input_ids"].numpy()
        mask = ref_in["attention_mask"].numpy()
        pixels = ref_in["pixel_values"].to(torch.float32).numpy() if imgs else None
        if imgs:
            ref_in["pixel_values"] = ref_in["pixel_values"].to(getattr(torch, dtype))
        say()
        say(f"[{k + 1}/{len(prompts)}] {_short(prompt)!r}: {ids.shape[1]} tokens, {len(imgs)} image(s)")

        proc_equal, pix_diff = None, None
        if our_proc is not None:
            mine = our_proc(text=[prompt], images=imgs or None, return_for_text_completion=not chat)
            proc_equal = bool(np.array_equal(mine["input_ids"], ids))
            if imgs:
                same_shape = mine["pixel_values"].shape == pixels.shape
                pix_diff = float(np.abs(mine["pixel_values"] - pixels).max()) if same_shape else float("inf")
            pix = f"; pixel_values max abs diff {pix_diff:.2g}" if pix_diff is not None else ""
            say(f"  processor : chameleon-jax input_ids {'identical to' if proc_equal else 'DIFFER from'} "
                f"transformers'{pix}")

        with torch.no_grad():
            ref_logits = ref_model(**ref_in).logits.float().numpy()
        with precision:
            our_logits = np.asarray(model.logits(ids, mask, pixels), np.float32)
        if our_logits.shape != ref_logits.shape:
            say(f"  logits    : shape {list(our_logits.shape)}, transformers' {list(ref_logits.shape)}")
            abs_err = rel_err = float("inf")
        else:
            real = mask[0].astype(bool)
            r, o = ref_logits[0][real][:, text_cols], our_logits[0][real][:, text_cols]
            abs_err = float(np.abs(o - r).max())
            rel_err = abs_err / max(float(np.abs(r).max()), np.finfo(np.float32).tiny)
        logits_ok = bool(np.isfinite(rel_err) and rel_err <= threshold)
        say(f"  logits    : max abs err {abs_err:.3e}, max rel err {rel_err:.3e} "
            f"({'<=' if logits_ok else '>'} {threshold:g})  {'ok' if logits_ok else 'BAD'}")

        codes_equal = None
        if imgs:
            with torch.no_grad():
                ref_codes = ref_model.model.get_image_tokens(ref_in["pixel_values"]).numpy()
            with precision:
                our_codes = model.image_tokens(pixels)
            codes_equal = bool(np.array_equal(np.asarray(our_codes).reshape(ref_codes.shape), ref_codes))
            same = int((np.asarray(our_codes).reshape(ref_codes.shape) == ref_codes).sum())
            say(f"  VQ codes  : {same}/{ref_codes.size} image tokens equal")

        ref_tokens = _cut_after_stop(_greedy_reference(ref_model, ref_in, max_new_tokens), stop_ids)
        with precision:
            our_tokens = model.generate(ids, mask, pixels, max_new_tokens=max_new_tokens)
        our_tokens = np.asarray(our_tokens[0], np.int64)
        our_tokens = _cut_after_stop(our_tokens, stop_ids)
        agreement, first = _agreement(ref_tokens, our_tokens)
        greedy_ok = agreement >= min_agreement
        where = "no divergence" if first is None else f"first divergence at step {first}"
        say(f"  greedy    : {int(round(agreement * max_new_tokens))}/{max_new_tokens} tokens agree "
            f"({agreement:.1%}), {where}  {'ok' if greedy_ok else 'BAD'}")
        def text(tokens):
            return _short(ref_proc.decode(tokens[tokens >= 0], skip_special_tokens=True))

        say(f"  reference : {text(ref_tokens)!r}")
        if first is not None:
            say(f"  converted : {text(our_tokens)!r}")

        ok = logits_ok and greedy_ok and proc_equal is not False
        say(f"  {'PASS' if ok else 'FAIL'}")
        results.append(dict(
            prompt=prompt, n_tokens=int(ids.shape[1]), n_images=len(imgs), max_abs_err=abs_err,
            max_rel_err=rel_err, agreement=agreement, first_divergence=first, ref_tokens=ref_tokens.tolist(),
            our_tokens=our_tokens.tolist(), image_codes_equal=codes_equal, processor_ids_equal=proc_equal,
            pixel_max_abs_diff=pix_diff, ok=ok,
        ))

    passed = sum(r["ok"] for r in results)
    ok = passed == len(results)
    worst = max(r["max_rel_err"] for r in results)
    say()
    say(f"{'PASS' if ok else 'FAIL'}: {passed}/{len(results)} prompt(s) passed (worst relative logit error "
        f"{worst:.3e}, threshold {threshold:g})")
    return dict(ok=ok, threshold=threshold, min_agreement=min_agreement, dtype=dtype, notes=notes,
                prompts=results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="verify.py",
        description="Compare a converted Chameleon checkpoint (chameleon-jax) with its transformers "
                    "reference: logit errors and greedy-decoding agreement on a few prompts. Exit 0 when "
                    "every prompt passes, 1 when one fails, 2 on bad input.",
    )
    p.add_argument("--reference", required=True, metavar="HF_DIR",
                   help="transformers checkpoint dir (config.json, *.safetensors, tokenizer and processor "
                        "files); read from local files only")
    p.add_argument("--converted", required=True, metavar="DIR",
                   help="`chameleon-jax convert` output (or any dir chameleon_jax.load reads)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt; repeat for several; <image> marks an image (default: a text prompt and an "
                        "image prompt)")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="image file for the next <image> across the prompts, in order; repeat for several "
                        "(default: a built-in synthetic gradient picture for every <image>)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="greedy tokens generated and compared per prompt (default 16)")
    p.add_argument("--threshold", type=float, default=1e-3,
                   help="largest allowed max|ours-ref| / max|ref| over the prompt's logits (default 1e-3)")
    p.add_argument("--min-agreement", type=float, default=1.0, metavar="FRACTION",
                   help="smallest allowed fraction of equal greedy tokens (default 1.0: all)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="parameter and compute dtype of both models (default float32)")
    p.add_argument("--chat", action="store_true",
                   help="append the chat separator <reserved08706> to each prompt (transformers' default) "
                        "instead of plain text completion")
    p.add_argument("--no-processor-check", action="store_true",
                   help="do not check chameleon-jax's processor against transformers'")
    p.add_argument("--matmul-precision", choices=PRECISIONS, default="highest",
                   help="JAX matmul precision while running chameleon-jax (default highest: exact float32 on "
                        "TPU/GPU; no effect on CPU)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from chameleon_jax import ChameleonError
    try:
        result = verify(args.reference, args.converted, prompts=args.prompt, images=args.image,
                        max_new_tokens=args.max_new_tokens, threshold=args.threshold, dtype=args.dtype,
                        min_agreement=args.min_agreement, chat=args.chat,
                        check_processor=not args.no_processor_check, matmul_precision=args.matmul_precision)
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ChameleonError as e:  # a problem with the inputs that chameleon-jax named
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
