"""Text tokenizer + image preprocessing + prompt assembly -> numpy batch, and decoding.

Produces what transformers' ``ChameleonProcessor`` produces (same ids, same pixels), using only
``tokenizers``, numpy and Pillow. Differences, all deliberate: ``input_ids`` / ``attention_mask``
are int32 (JAX's default integer); a prompt longer than ``max_length`` is an error, never
truncated; ``decode(skip_special_tokens=True)`` also drops IMGIMG image-code tokens (transformers
prints their names); image files given by path are alpha-blended onto white like in-memory
images (transformers converts paths to RGB without blending).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tokenizers import AddedToken, Tokenizer, processors

from . import vocab as cv
from .errors import ChameleonError

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "processor_config.json", "preprocessor_config.json")
META_FILES = ("tokenizer/text_tokenizer.json", "text_tokenizer.json")
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                     "sep_token": cv.SEP_TOKEN}


@dataclass(frozen=True)
class ImageConfig:
    """Image preprocessing settings (HF ``preprocessor_config.json`` fields, flattened).

    ``shortest_edge`` set: resize so the short side has that length (long side ``int(s*long/short)``);
    otherwise resize to ``resize_height`` x ``resize_width``. Then center-crop (zero-padding if the
    crop is larger), ``x * rescale_factor``, ``(x - mean) / std``, all as transformers does it.
    """

    shortest_edge: int | None = 512
    resize_height: int | None = None
    resize_width: int | None = None
    crop_height: int = 512
    crop_width: int = 512
    resample: int = int(Image.Resampling.LANCZOS)
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 0.0078
    image_mean: tuple[float, float, float] = (1.0, 1.0, 1.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "image processor config") -> "ImageConfig":
        try:
            size, crop = d.get("size") or {"shortest_edge": 512}, d.get("crop_size") or {"height": 512, "width": 512}
            if isinstance(size, int):
                size = {"shortest_edge": size}
            if isinstance(crop, int):
                crop = {"height": crop, "width": crop}
            if not (size.get("shortest_edge") or (size.get("height") and size.get("width"))):
                raise ChameleonError(f"{source}: 'size' must hold shortest_edge or height and width, got {size}")
            kw = {k: d[k] for k in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize",
                                    "rescale_factor", "resample") if d.get(k) is not None}

            def triple(v):
                return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

            for k in ("image_mean", "image_std"):
                if d.get(k) is not None:
                    kw[k] = triple(d[k])
            return cls(shortest_edge=size.get("shortest_edge"), resize_height=size.get("height"),
                       resize_width=size.get("width"), crop_height=int(crop["height"]),
                       crop_width=int(crop["width"]), **kw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, ChameleonError):
                raise
            raise ChameleonError(f"{source}: malformed image settings ({e!r})") from e

    def to_hf_dict(self) -> dict:
        size = ({"shortest_edge": self.shortest_edge} if self.shortest_edge
                else {"height": self.resize_height, "width": self.resize_width})
        d = {k: v for k, v in asdict(self).items()
             if k not in ("shortest_edge", "resize_height", "resize_width", "crop_height", "crop_width")}
        d.update(size=size, crop_size={"height": self.crop_height, "width": self.crop_width},
                 image_mean=list(self.image_mean), image_std=list(self.image_std),
                 image_processor_type="ChameleonImageProcessor", processor_class="ChameleonProcessor")
        return d

    def lookup_table(self) -> np.ndarray:
        """float32 [3, 256]: the processed value of each uint8 level per channel, computed with the
        same float64-rescale, float32-normalize steps as transformers so results are bit-identical."""
        x = np.arange(256, dtype=np.uint8)
        x = (x.astype(np.float32) * np.float32(self.rescale_factor) + np.float32(1e-6)).astype(np.float32) if self.do_rescale else x.astype(np.float32)
        if not self.do_normalize:
            return np.stack([x] * 3)
        mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
        return np.stack([(x - mean[c]) / std[c] for c in range(3)])

    def output_size(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((resized_h, resized_w), (out_h, out_w)) for an input of the given size."""
        h, w = height, width
        if self.do_resize and self.shortest_edge:
            s = int(self.shortest_edge)
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            h, w = (new_long, s) if w <= h else (s, new_long)
        elif self.do_resize:
            h, w = int(self.resize_height), int(self.resize_width)
        return (h, w), ((self.crop_height, self.crop_width) if self.do_center_crop else (h, w))


META_NORMALIZATION = {"rescale_factor": 1 / 127.5, "image_mean": (1.0, 1.0, 1.0), "image_std": (1.0, 1.0, 1.0),
                      "do_rescale": True, "do_normalize": True}


def blend_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparency (alpha band or a ``transparency`` entry, e.g. P/L/RGB PNGs
    with tRNS) is composited onto opaque white, as transformers does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Center crop of an [H, W, C] array; zero-pads (like transformers) when the crop is larger."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + crop_h, left:left + crop_w]
    nh, nw = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((nh, nw) + arr.shape[2:], arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return padded[max(0, top):min(nh, top + crop_h), max(0, left):min(nw, left + crop_w)]


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChameleonError(f"cannot read {path}: {e}") from e


def _describe(item, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"images[{index}] ({os.fspath(item)!r})"
    if isinstance(item, Image.Image):
        return f"images[{index}] (PIL {item.mode} image {item.size[0]}x{item.size[1]})"
    return f"images[{index}] ({type(item).__name__})"


class ChameleonProcessor:
    """Chameleon's processor on ``tokenizers`` + numpy + Pillow.

    ``proc(text, images)`` returns ``{"input_ids": int32 [B, T], "attention_mask": int32 [B, T],
    "pixel_values": float32 [N, 3, H, W]}`` (pixel_values only when images are given). Each
    ``<image>`` in the text becomes ``boi + image_seq_length * <image> + eoi``; images are consumed
    in order across the batch.
    """

    max_image_pixels: int | None = 89_478_485
    """Refuse images with more pixels than this (PIL's own default; None disables). Files are also
    subject to PIL's ``Image.MAX_IMAGE_PIXELS``, which PIL enforces at twice its value."""
    max_resized_pixels: int | None = 2**28
    """Refuse images whose shortest-edge resize would exceed this many pixels before cropping
    (extreme aspect ratios: a 10000x1 image would resize to 5,120,000x512)."""

    def __init__(self, tokenizer: Tokenizer, *, image_config: ImageConfig | None = None,
                 image_seq_length: int = 1024, special_tokens: dict | None = None,
                 boi_token: str = cv.BOI_TOKEN, eoi_token: str = cv.EOI_TOKEN, image_token: str = cv.IMAGE_TOKEN,
                 max_length: int | None = None, clean_up_tokenization_spaces: bool = False,
                 num_threads: int | None = None, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self._lut = self.image_config.lookup_table()
        self.image_seq_length = int(image_seq_length)
        self.max_length = max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        specials = {**_DEFAULT_SPECIALS, **{k: v for k, v in (special_tokens or {}).items() if v}}
        self.special_tokens = {k: v for k, v in specials.items() if tokenizer.token_to_id(v) is not None}
        self.boi_token, self.eoi_token, self.image_token = boi_token, eoi_token, image_token
        for name, tok in (("boi", boi_token), ("eoi", eoi_token), ("image", image_token),
                          ("sep", specials["sep_token"])):
            if tokenizer.token_to_id(tok) is None:
                raise ChameleonError(f"{source}: the {name} token {tok!r} is not in the vocabulary")
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_token_id, self.eos_token_id = ids.get("bos_token"), ids.get("eos_token")
        self.pad_token_id, self.unk_token_id = ids.get("pad_token"), ids.get("unk_token")
        self.sep_token_id = ids["sep_token"]
        self.boi_token_id, self.eoi_token_id = tokenizer.token_to_id(boi_token), tokenizer.token_to_id(eoi_token)
        self.image_token_id = tokenizer.token_to_id(image_token)
        self.image_vocab = cv.ImageVocab.from_vocabulary_map(tokenizer.get_vocab(with_added_tokens=True))
        self._drop_on_skip = set(self.image_vocab.bpe_to_code) | {self.image_token_id, self.boi_token_id,
                                                                 self.eoi_token_id}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, normalization: str = "hf", **kwargs) -> "ChameleonProcessor":
        """Load from an HF dir (tokenizer.json + configs), Meta's release dir (tokenizer/text_tokenizer.json,
        ``<reserved08707>`` renamed to ``<image>``), or either JSON file directly. ``normalization="meta"``
        uses Meta's ``x / 127.5 - 1`` instead of HF's ``x * 0.0078 - 1``. Other kwargs go to ``__init__``."""
        path = Path(path)
        if path.is_file():
            directory, tok_file = path.parent, path
        elif path.is_dir():
            directory = path
            candidates = [path / "tokenizer.json"] + [path / m for m in META_FILES]
            tok_file = next((p for p in candidates if p.is_file()), None)
            if tok_file is None:
                raise ChameleonError(f"no tokenizer in {path}: looked for tokenizer.json, " + ", ".join(META_FILES))
        else:
            raise ChameleonError(f"tokenizer path {path} does not exist")
        meta = tok_file.name == "text_tokenizer.json"
        tok_json = _read_json(tok_file)
        if meta:
            _rename_meta_image_token(tok_json)
        try:
            tokenizer = Tokenizer.from_str(json.dumps(tok_json))
        except Exception as e:  # tokenizers raises its own Exception type for bad JSON content
            raise ChameleonError(f"{tok_file}: not a valid tokenizers JSON ({e})") from e

        def optional(name):
            p = directory / name
            return _read_json(p) if (not meta and p.is_file()) else {}

        tcfg, smap, pcfg, icfg = (optional(n) for n in HF_FILES[1:])
        specials = {k: _token_str(tcfg.get(k, smap.get(k))) for k in _NAMED_SPECIALS}
        extra = tcfg.get("extra_special_tokens", tcfg.get("additional_special_tokens")) or []
        named_extra = extra if isinstance(extra, dict) else {}
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        if meta:  # transformers' converter: LlamaTokenizerFast(add_bos_token=True), pad <pad>, sep <reserved08706>
            specials = dict(_DEFAULT_SPECIALS)
            bos_id = tokenizer.token_to_id(specials["bos_token"])
            tokenizer.post_processor = processors.TemplateProcessing(
                single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos_id)])
        else:  # transformers adds the named special tokens as special added tokens after loading
            named = [t for t in (list(specials.values()) + [_token_str(x) for x in extra]) if t]
            if named:
                tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
        image_cfg = ImageConfig.from_hf_dict(pcfg.get("image_processor") or icfg, str(directory))
        if normalization == "meta":
            image_cfg = replace(image_cfg, **META_NORMALIZATION)
        elif normalization != "hf":
            raise ChameleonError(f"normalization must be 'hf' or 'meta', got {normalization!r}")
        kwargs.setdefault("image_seq_length", pcfg.get("image_seq_length", 1024))
        kwargs.setdefault("image_token", _token_str(named_extra.get("image_token")) or pcfg.get("image_token")
                          or cv.IMAGE_TOKEN)
        kwargs.setdefault("boi_token", _token_str(named_extra.get("boi_token")) or cv.BOI_TOKEN)
        kwargs.setdefault("eoi_token", _token_str(named_extra.get("eoi_token")) or cv.EOI_TOKEN)
        kwargs.setdefault("clean_up_tokenization_spaces", bool(tcfg.get("clean_up_tokenization_spaces", False))
                          and (tok_json.get("model", {}).get("type") != "BPE" or bool(tcfg.get(
                              "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))))
        return cls(tokenizer, image_config=image_cfg, special_tokens=specials, source=str(tok_file), **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the HF layout (readable by ``from_pretrained`` and by transformers). Files are written to
        a temporary directory first; a new ``directory`` appears by one rename, an existing one gets each
        file replaced atomically. A failed save leaves nothing behind."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            tcfg = {**self.special_tokens, "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                    "padding_side": "left", "processor_class": "ChameleonProcessor",
                    "tokenizer_class": "PreTrainedTokenizerFast"}
            if self.max_length:
                tcfg["model_max_length"] = int(self.max_length)
            files = {"tokenizer_config.json": tcfg, "special_tokens_map.json": self.special_tokens,
                     "processor_config.json": {"image_seq_length": self.image_seq_length,
                                               "image_token": self.image_token,
                                               "processor_class": "ChameleonProcessor"},
                     "preprocessor_config.json": self.image_config.to_hf_dict()}
            for name, obj in files.items():
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            if not directory.exists():
                os.rename(tmp, directory)
            else:
                for name in HF_FILES:
                    os.replace(tmp / name, directory / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    # ------------------------------------------------------------------ images
    def _open(self, item, index: int) -> tuple[Image.Image, bool]:
        """(image, from_file) with size checks done; file pixels are decoded later, in a worker."""
        if isinstance(item, (str, os.PathLike)):
            try:
                with warnings.catch_warnings():  # our own pixel limit below replaces PIL's warning
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(item)
            except Image.DecompressionBombError as e:
                raise ChameleonError(f"{_describe(item, index)} is a decompression bomb: {e}") from e
            except (OSError, ValueError) as e:
                raise ChameleonError(f"{_describe(item, index)} cannot be opened as an image: {e}") from e
            from_file = True
        elif isinstance(item, Image.Image):
            img, from_file = item, False
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 3 and item.shape[2] == 3:
            img, from_file = Image.fromarray(item), False
        else:
            raise ChameleonError(f"{_describe(item, index)} is not an image: expected a PIL image, a file path, "
                                 "or a uint8 numpy array [H, W, 3]")
        w, h = img.size
        if self.max_image_pixels is not None and w * h > self.max_image_pixels:
            raise ChameleonError(f"{_describe(item, index)} has {w * h} pixels ({w}x{h}), above max_image_pixels="
                                 f"{self.max_image_pixels} (decompression-bomb guard)")
        if min(w, h) < 1:
            raise ChameleonError(f"{_describe(item, index)} is empty ({w}x{h})")
        (rh, rw), _ = self.image_config.output_size(w, h)
        if self.max_resized_pixels is not None and rh * rw > self.max_resized_pixels:
            raise ChameleonError(f"{_describe(item, index)} ({w}x{h}) would resize to {rw}x{rh}, above "
                                 f"max_resized_pixels={self.max_resized_pixels}; its aspect ratio is too extreme")
        return img, from_file

    def _process_one(self, img: Image.Image, from_file: bool, out: np.ndarray, desc: str) -> None:
        cfg = self.image_config
        try:
            if from_file:
                img = ImageOps.exif_transpose(img)
            if cfg.do_convert_rgb:
                img = blend_to_rgb(img)
            elif img.mode != "RGB":
                raise ChameleonError(f"{desc} has mode {img.mode}; do_convert_rgb is off, so it must be RGB")
            (rh, rw), _ = cfg.output_size(*img.size)
            if cfg.do_resize:
                img = img.resize((rw, rh), resample=cfg.resample)
            arr = np.asarray(img)
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files fail at decode time
            if isinstance(e, ChameleonError):
                raise
            raise ChameleonError(f"{desc} cannot be decoded as an image: {e}") from e
        if cfg.do_center_crop:
            arr = center_crop(arr, cfg.crop_height, cfg.crop_width)
        for c in range(3):
            np.take(self._lut[c], arr[:, :, c], out=out[c])

    def preprocess_images(self, images) -> np.ndarray:
        """float32 [N, 3, H, W] pixel values for a PIL image, path, uint8 [H, W, 3] array, or a (nested) list."""
        items = _flatten_images(images)
        if not items:
            raise ChameleonError("images is empty: pass at least one image")
        opened = [self._open(item, i) for i, item in enumerate(items)]
        shapes = {self.image_config.output_size(*img.size)[1] for img, _ in opened}
        if len(shapes) != 1:
            raise ChameleonError(f"images would have different sizes {sorted(shapes)} (center crop is off)")
        (h, w), = shapes
        out = np.empty((len(items), 3, h, w), np.float32)
        jobs = [(img, ff, out[i], _describe(items[i], i)) for i, (img, ff) in enumerate(opened)]
        if len(jobs) == 1 or self.num_threads <= 1:
            for job in jobs:
                self._process_one(*job)
        else:  # Pillow releases the GIL while decoding and resampling
            with ThreadPoolExecutor(min(self.num_threads, len(jobs))) as pool:
                for f in [pool.submit(self._process_one, *job) for job in jobs]:
                    f.result()
        return out

    # ------------------------------------------------------------------ text
    def __call__(self, text=None, images=None, *, padding: bool | str = True, padding_side: str = "left",
                 return_for_text_completion: bool = False, max_length: int | None = None) -> dict[str, np.ndarray]:
        """Tokenize ``text`` (str or list of str) with its ``<image>`` placeholders expanded, and preprocess
        ``images`` (flat list consumed in order across the batch). ``padding``: True/"longest",
        "max_length" (pad to ``max_length``), or False (all prompts must have the same length)."""
        if text is None and images is None:
            raise ChameleonError("pass text, images, or both")
        result = {}
        if images is not None:
            items = _flatten_images(images)
        if text is not None:
            prompts = [text] if isinstance(text, str) else text
            if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ChameleonError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
            counts = [p.count(self.image_token) for p in prompts]
            n_images = 0 if images is None else len(items)
            if sum(counts) != n_images:
                raise ChameleonError(
                    f"the text has {sum(counts)} {self.image_token} placeholder(s) (per prompt: {counts}) but "
                    f"{n_images} image(s) were passed; each {self.image_token} takes one image, in order")
            result.update(self._encode(prompts, padding, padding_side, return_for_text_completion, max_length))
        if images is not None:
            result["pixel_values"] = self.preprocess_images(items)
        return result

    def _encode(self, prompts, padding, padding_side, completion, max_length) -> dict[str, np.ndarray]:
        if padding_side not in ("left", "right"):
            raise ChameleonError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        max_length = max_length if max_length is not None else self.max_length
        expansion = self.boi_token + self.image_token * self.image_seq_length + self.eoi_token
        sep = "" if completion else self.special_tokens["sep_token"]
        texts = [(p + sep).replace(self.image_token, expansion) for p in prompts]
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        lengths = [len(x) for x in ids]
        if max_length is not None:
            for i, n in enumerate(lengths):
                if n > max_length:
                    n_img = prompts[i].count(self.image_token)
                    raise ChameleonError(
                        f"prompt {i} is {n} tokens ({n_img} image(s) x {self.image_seq_length + 2} tokens) but "
                        f"max_length is {max_length}; shorten it (prompts are never truncated)")
        if padding in (True, "longest"):
            total = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ChameleonError('padding="max_length" needs max_length (call argument or constructor)')
            total = max_length
        elif padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise ChameleonError(f"padding=False but the prompts have different lengths {lengths}")
            total = lengths[0]
        else:
            raise ChameleonError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        if total > min(lengths) and self.pad_token_id is None:
            raise ChameleonError("padding is needed but the tokenizer has no pad_token")
        input_ids = np.full((len(ids), total), self.pad_token_id or 0, np.int32)
        mask = np.zeros((len(ids), total), np.int32)
        for i, row in enumerate(ids):
            sl = slice(total - len(row), total) if padding_side == "left" else slice(0, len(row))
            input_ids[i, sl] = row
            mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def _clean(self, ids, skip_special_tokens: bool) -> list[int]:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ChameleonError(f"ids must be a 1-D sequence of integers, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.tolist()
        return [i for i in ids if i not in self._drop_on_skip] if skip_special_tokens else ids

    def _finish(self, text: str) -> str:
        if not self.clean_up_tokenization_spaces:
            return text
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(a, b)
        return text

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence. With ``skip_special_tokens`` special tokens and image-token runs
        (IMGIMG code tokens, ``<image>``, boi/eoi) are dropped."""
        return self._finish(self.tokenizer.decode(self._clean(ids, skip_special_tokens), skip_special_tokens))

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """``decode`` for each row of a [B, T] array or a list of sequences."""
        rows = [self._clean(r, skip_special_tokens) for r in ids]
        return [self._finish(t) for t in self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)]


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [x for item in images for x in _flatten_images(item)]
    return [images]


def _rename_meta_image_token(tok_json: dict) -> None:
    """Meta's file names the image placeholder ``<reserved08707>``; transformers' converter renames it."""
    vocab = tok_json.get("model", {}).get("vocab")
    if isinstance(vocab, dict) and cv.META_IMAGE_TOKEN in vocab and cv.IMAGE_TOKEN not in vocab:
        vocab[cv.IMAGE_TOKEN] = vocab.pop(cv.META_IMAGE_TOKEN)
    for tok in tok_json.get("added_tokens", []):
        if tok.get("content") == cv.META_IMAGE_TOKEN:
            tok["content"] = cv.IMAGE_TOKEN
