"""Text tokenizer + image preprocessing + prompt assembly -> numpy batch, and decoding.

Produces what transformers' ``ChameleonProcessor`` produces (same ids, same pixels) with only
``tokenizers``, numpy and Pillow. Deliberate differences: ``input_ids`` / ``attention_mask`` are
int32 (JAX's default integer); a prompt longer than ``max_length`` is an error, never truncated;
``decode(skip_special_tokens=True)`` also drops IMGIMG image-code tokens (transformers prints their
names); image files given by path are alpha-blended onto white like in-memory images
(transformers converts paths to RGB without blending). No ``clean_up_tokenization_spaces``:
transformers 5 ignores it for BPE tokenizers, and Chameleon's is one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tokenizers import AddedToken, Tokenizer, processors

from . import vocab as cv
from .errors import ChameleonError, read_json
from .image_processing import META_NORMALIZATION, ImageConfig, blend_to_rgb, center_crop  # noqa: F401

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "processor_config.json", "preprocessor_config.json")
META_FILES = ("tokenizer/text_tokenizer.json", "text_tokenizer.json")
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
             "sep_token": cv.SEP_TOKEN}
def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _describe(item, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"images[{index}] ({os.fspath(item)!r})"
    if isinstance(item, Image.Image):
        return f"images[{index}] (PIL {item.mode} image {item.size[0]}x{item.size[1]})"
    return f"images[{index}] ({type(item).__name__})"


def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        return [x for item in images for x in _flatten(item)]
    return [images]


def _find_tokenizer_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise ChameleonError(f"tokenizer path {path} does not exist")
    for p in [path / "tokenizer.json"] + [path / m for m in META_FILES]:
        if p.is_file():
            return p
    raise ChameleonError(f"no tokenizer in {path}: looked for tokenizer.json, {', '.join(META_FILES)}")


def _reraise_panic(e: BaseException, what: str):
    """tokenizers' Rust panics (pyo3 PanicException, a BaseException) -> ChameleonError; others re-raised."""
    if type(e).__name__ != "PanicException":
        raise e
    raise ChameleonError(f"{what} (tokenizers panicked: {e})") from None


def _rename_meta_image_token(tok_json: dict) -> None:
    """Meta's file calls the image placeholder <reserved08707>; transformers' converter renames it."""
    model, added = tok_json.get("model"), tok_json.get("added_tokens")
    vocab = model.get("vocab") if isinstance(model, dict) else None  # malformed files: tokenizers says why
    if isinstance(vocab, dict) and cv.META_IMAGE_TOKEN in vocab and cv.IMAGE_TOKEN not in vocab:
        vocab[cv.IMAGE_TOKEN] = vocab.pop(cv.META_IMAGE_TOKEN)
    for tok in added if isinstance(added, list) else []:
        if isinstance(tok, dict) and tok.get("content") == cv.META_IMAGE_TOKEN:
            tok["content"] = cv.IMAGE_TOKEN


class ChameleonProcessor:
    """Chameleon's processor on ``tokenizers`` + numpy + Pillow.

    ``proc(text, images)`` -> ``{"input_ids": int32 [B, T], "attention_mask": int32 [B, T],
    "pixel_values": float32 [N, 3, H, W]}`` (pixel_values only with images). Each ``<image>`` in the
    text becomes ``boi + image_seq_length x <image> + eoi``; images are consumed in order across the
    batch. Images: PIL images, file paths (str / Path), or uint8 arrays [H, W, 3].
    """

    max_image_pixels: int | None = 89_478_485
    """Refuse larger images (PIL's default limit; None disables). Files are also subject to PIL's
    own ``Image.MAX_IMAGE_PIXELS`` check, which raises at twice that value."""
    max_resized_pixels: int | None = 2**28
    """Refuse images whose shortest-edge resize would exceed this many pixels before the crop
    (extreme aspect ratios: 10000x1 would resize to 5,120,000x512)."""

    def __init__(self, tokenizer: Tokenizer, *, image_config: ImageConfig | None = None,
                 image_seq_length: int = 1024, special_tokens: dict | None = None,
                 boi_token: str = cv.BOI_TOKEN, eoi_token: str = cv.EOI_TOKEN,
                 image_token: str = cv.IMAGE_TOKEN, max_length: int | None = None,
                 num_threads: int | None = None, source: str = "tokenizer"):
        self.tokenizer, self.source = tokenizer, source
        self.image_config = image_config or ImageConfig()
        self._lut = self.image_config.lookup_table()
        self.image_seq_length = int(image_seq_length)
        self.max_length = max_length
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        specials = {**_DEFAULTS, **{k: v for k, v in (special_tokens or {}).items() if v}}
        for name, tok in (("sep", specials["sep_token"]), ("boi", boi_token), ("eoi", eoi_token),
                          ("image", image_token)):
            if tokenizer.token_to_id(tok) is None:
                raise ChameleonError(f"{source}: the {name} token {tok!r} is not in the vocabulary")
        self.special_tokens = {k: v for k, v in specials.items() if tokenizer.token_to_id(v) is not None}
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_token_id, self.eos_token_id = ids.get("bos_token"), ids.get("eos_token")
        self.pad_token_id, self.unk_token_id = ids.get("pad_token"), ids.get("unk_token")
        self.sep_token_id = ids["sep_token"]
        self.boi_token, self.eoi_token, self.image_token = boi_token, eoi_token, image_token
        self.boi_token_id = tokenizer.token_to_id(boi_token)
        self.eoi_token_id = tokenizer.token_to_id(eoi_token)
        self.image_token_id = tokenizer.token_to_id(image_token)
        self.image_vocab = cv.ImageVocab.from_vocabulary_map(tokenizer.get_vocab(with_added_tokens=True))
        self._image_ids = set(self.image_vocab.bpe_to_code) | {
            self.image_token_id, self.boi_token_id, self.eoi_token_id}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, normalization: str = "hf",
                        local_files_only: bool | None = None, revision: str | None = None,
                        **kwargs) -> "ChameleonProcessor":
        """Load an HF dir (tokenizer.json + configs), Meta's release dir (tokenizer/text_tokenizer.json;
        ``<reserved08707>`` becomes ``<image>``, BOS is prepended, as transformers' converter does),
        either JSON file, or a Hugging Face Hub id (as :func:`chameleon_jax.load` resolves it).
        ``normalization="meta"``: Meta's ``x / 127.5 - 1`` instead of HF's ``x * 0.0078 - 1``.
        Other kwargs (max_length, image_seq_length, ...) go to ``__init__``."""
        from .hub import resolve

        tok_file = _find_tokenizer_file(Path(resolve(path, local_files_only=local_files_only, revision=revision)))
        directory, meta = tok_file.parent, tok_file.name == "text_tokenizer.json"
        tok_json = read_json(tok_file, "tokenizer file")
        if meta:
            _rename_meta_image_token(tok_json)
        try:
            tokenizer = Tokenizer.from_str(json.dumps(tok_json))
            tokenizer.encode("a b\n<image> 1")  # a probe: some malformed files load, then panic in use
        except Exception as e:  # tokenizers raises a plain Exception for malformed content
            raise ChameleonError(f"{tok_file}: not a valid tokenizers JSON file ({e})") from e
        except BaseException as e:
            _reraise_panic(e, f"{tok_file}: not a valid tokenizers JSON file")
        tcfg, smap, pcfg, icfg = ({} if meta or not (directory / n).is_file() else read_json(directory / n, n)
                                  for n in HF_FILES[1:])
        specials = {k: _token_str(tcfg.get(k, smap.get(k))) for k in _NAMED}
        extra = tcfg.get("extra_special_tokens", tcfg.get("additional_special_tokens")) or []
        named_extra = extra if isinstance(extra, dict) else {}
        if meta:  # transformers' converter: LlamaTokenizerFast (prepends <s>), pad <pad>, sep <reserved08706>
            specials = dict(_DEFAULTS)
            bos_id = tokenizer.token_to_id("<s>")
            if bos_id is None:
                raise ChameleonError(f"{tok_file}: no <s> token in the vocabulary")
            tokenizer.post_processor = processors.TemplateProcessing(
                single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos_id)])
        else:  # as transformers does after loading: named special tokens become special added tokens
            extra = list(named_extra.values()) if named_extra else list(extra)
            named = [t for t in list(specials.values()) + [_token_str(x) for x in extra] if t]
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
        image_cfg = ImageConfig.from_hf_dict(pcfg.get("image_processor") or icfg, str(directory))
        if normalization not in ("hf", "meta"):
            raise ChameleonError(f"normalization must be 'hf' or 'meta', got {normalization!r}")
        if normalization == "meta":
            image_cfg = replace(image_cfg, **META_NORMALIZATION)
        kwargs.setdefault("image_seq_length", pcfg.get("image_seq_length", 1024))
        kwargs.setdefault("image_token", _token_str(named_extra.get("image_token"))
                          or pcfg.get("image_token") or cv.IMAGE_TOKEN)
        kwargs.setdefault("boi_token", _token_str(named_extra.get("boi_token")) or cv.BOI_TOKEN)
        kwargs.setdefault("eoi_token", _token_str(named_extra.get("eoi_token")) or cv.EOI_TOKEN)
        return cls(tokenizer, image_config=image_cfg, special_tokens=specials, source=str(tok_file), **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the HF layout (read by ``from_pretrained`` and by transformers). Files go to a temporary
        directory first: a new ``directory`` appears with one rename; in an existing one each file is
        replaced atomically. A failed save leaves nothing behind."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            tcfg = {**self.special_tokens, "clean_up_tokenization_spaces": False, "padding_side": "left",
                    "processor_class": "ChameleonProcessor", "tokenizer_class": "PreTrainedTokenizerFast"}
            if self.max_length:
                tcfg["model_max_length"] = int(self.max_length)
            pcfg = {"image_seq_length": self.image_seq_length, "image_token": self.image_token,
                    "processor_class": "ChameleonProcessor"}
            icfg = self.image_config.to_hf_dict()
            for name, obj in zip(HF_FILES[1:], (tcfg, self.special_tokens, pcfg, icfg)):
                text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
                (tmp / name).write_text(text, encoding="utf-8")
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
        """(image, is_file) after the size checks; file pixels are decoded later, in a worker."""
        desc = _describe(item, index)
        if isinstance(item, (str, os.PathLike)):
            try:
                with warnings.catch_warnings():  # max_image_pixels below replaces PIL's warning
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(item)
            except Image.DecompressionBombError as e:
                raise ChameleonError(f"{desc} is a decompression bomb: {e}") from e
            except (OSError, ValueError) as e:
                raise ChameleonError(f"{desc} cannot be opened as an image: {e}") from e
        elif isinstance(item, Image.Image):
            img = item
            try:  # decode lazily opened images here: one object may appear twice in the batch
                img.load()
            except (OSError, ValueError, SyntaxError) as e:
                raise ChameleonError(f"{desc} cannot be decoded as an image: {e}") from e
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape[2:] == (3,):
            img = Image.fromarray(item)
        else:
            raise ChameleonError(f"{desc} is not an image: expected a PIL image, a file path, or a uint8 "
                                 "array [H, W, 3]")
        w, h = img.size
        if self.max_image_pixels is not None and w * h > self.max_image_pixels:
            raise ChameleonError(f"{desc} has {w * h} pixels ({w}x{h}), above max_image_pixels="
                                 f"{self.max_image_pixels} (decompression-bomb guard)")
        if w < 1 or h < 1:
            raise ChameleonError(f"{desc} is empty ({w}x{h})")
        (rh, rw), _ = self.image_config.output_size(w, h)
        if self.max_resized_pixels is not None and rh * rw > self.max_resized_pixels:
            raise ChameleonError(f"{desc} would resize to {rw}x{rh}, above max_resized_pixels="
                                 f"{self.max_resized_pixels}: its aspect ratio is too extreme")
        return img, isinstance(item, (str, os.PathLike))

    def _process_one(self, img: Image.Image, is_file: bool, out: np.ndarray, desc: str) -> None:
        """Write one image's float32 [3, H, W] pixel values into ``out``."""
        cfg = self.image_config
        try:
            if is_file:  # transformers' load_image applies the EXIF orientation to files
                img = ImageOps.exif_transpose(img)
            if cfg.do_convert_rgb:
                img = blend_to_rgb(img)
            elif img.mode != "RGB":
                raise ChameleonError(f"{desc} has mode {img.mode}; with do_convert_rgb off it must be RGB")
            if cfg.do_resize:
                (rh, rw), _ = cfg.output_size(*img.size)
                img = img.resize((rw, rh), resample=cfg.resample)
            arr = np.asarray(img)
        except ChameleonError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # corrupt or truncated files fail at decode time
            raise ChameleonError(f"{desc} cannot be decoded as an image: {e}") from e
        if cfg.do_center_crop:
            arr = center_crop(arr, cfg.crop_height, cfg.crop_width)
        for c in range(3):
            np.take(self._lut[c], arr[:, :, c], out=out[c])

    def preprocess_images(self, images) -> np.ndarray:
        """float32 [N, 3, H, W] pixel values for one image or a (nested) list of them."""
        items = _flatten(images)
        if not items:
            raise ChameleonError("images is empty: pass at least one image")
        opened = [self._open(item, i) for i, item in enumerate(items)]
        shapes = {self.image_config.output_size(*img.size)[1] for img, _ in opened}
        if len(shapes) != 1:
            raise ChameleonError(f"images would have different sizes {sorted(shapes)} (center crop is off)")
        (h, w), = shapes
        out = np.empty((len(items), 3, h, w), np.float32)
        jobs = [(img, is_file, out[i], _describe(items[i], i)) for i, (img, is_file) in enumerate(opened)]
        if len(jobs) == 1 or self.num_threads <= 1:
            for job in jobs:
                self._process_one(*job)
        else:  # Pillow releases the GIL while decoding and resampling
            with ThreadPoolExecutor(min(self.num_threads, len(jobs))) as pool:
                for future in [pool.submit(self._process_one, *job) for job in jobs]:
                    future.result()
        return out

    # ------------------------------------------------------------------ text
    def __call__(self, text=None, images=None, *, padding: bool | str = True, padding_side: str = "left",
                 return_for_text_completion: bool = False,
                 max_length: int | None = None) -> dict[str, np.ndarray]:
        """Tokenize ``text`` (str or list of str) with each ``<image>`` expanded, and preprocess ``images``.

        padding: True / "longest", "max_length" (to ``max_length``), or False (equal lengths needed).
        max_length: defaults to the constructor's; a longer prompt raises ChameleonError.
        """
        if text is None and images is None:
            raise ChameleonError("pass text, images, or both")
        items = [] if images is None else _flatten(images)
        result = {}
        if text is not None:
            prompts = [text] if isinstance(text, str) else text
            if not (isinstance(prompts, (list, tuple)) and prompts
                    and all(isinstance(p, str) for p in prompts)):
                raise ChameleonError(f"text must be a str or a non-empty list of str, got {text!r:.50}")
            counts = [p.count(self.image_token) for p in prompts]
            if sum(counts) != len(items):
                raise ChameleonError(
                    f"the text has {sum(counts)} {self.image_token} placeholder(s) (per prompt: {counts}) "
                    f"but {len(items)} image(s) were passed; each {self.image_token} takes one image, "
                    "in order")
            result.update(self._encode(prompts, padding, padding_side, return_for_text_completion,
                                       max_length))
        if images is not None:
            result["pixel_values"] = self.preprocess_images(items)
        return result

    def _encode(self, prompts, padding, padding_side, completion, max_length) -> dict[str, np.ndarray]:
        if padding_side not in ("left", "right"):
            raise ChameleonError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        max_length = self.max_length if max_length is None else max_length
        # transformers appends the separator, then expands placeholders; the tokenizer sees one string
        expansion = self.boi_token + self.image_token * self.image_seq_length + self.eoi_token
        sep = "" if completion else self.special_tokens["sep_token"]
        texts = [(p + sep).replace(self.image_token, expansion) for p in prompts]
        try:
            ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        except BaseException as e:
            _reraise_panic(e, f"{self.source}: the tokenizer failed on the text; is this tokenizer file valid?")
        lengths = [len(x) for x in ids]
        for i, n in enumerate(lengths):
            if max_length is not None and n > max_length:
                raise ChameleonError(
                    f"prompt {i} is {n} tokens ({prompts[i].count(self.image_token)} image(s) x "
                    f"{self.image_seq_length + 2} tokens each) but max_length is {max_length}; prompts are "
                    "never truncated: shorten it or pass fewer images")
        if padding in (True, "longest"):
            total = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ChameleonError('padding="max_length" needs max_length (call or constructor argument)')
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
            cols = slice(total - len(row), total) if padding_side == "left" else slice(0, len(row))
            input_ids[i, cols] = row
            mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # ------------------------------------------------------------------ decoding
    def _ids(self, ids, skip_special_tokens: bool) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ChameleonError(f"ids must be a 1-D sequence of integers, got shape {arr.shape} "
                                 f"dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ChameleonError(f"ids must be >= 0, got {arr.min()} (strip padding markers before decoding)")
        out = arr.tolist()
        return [i for i in out if i not in self._image_ids] if skip_special_tokens else out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence. ``skip_special_tokens`` drops special tokens and image-token runs
        (IMGIMG code tokens, ``<image>``, boi, eoi)."""
        return self.tokenizer.decode(self._ids(ids, skip_special_tokens), skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of each row of a [B, T] array or list of sequences."""
        ids = np.asarray(ids) if hasattr(ids, "shape") else ids  # jax / torch arrays: convert once
        rows = [self._ids(r, skip_special_tokens) for r in ids]
        return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
