"""Image preprocessing settings and steps shared by the processor (transformers' ChameleonImageProcessor
numbers: RGB onto white, resize of the short side, center crop, rescale, normalize)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import ChameleonError

_FLAGS = ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize",
          "rescale_factor", "resample")


@dataclass(frozen=True)
class ImageConfig:
    """Image settings (the fields of HF's ``preprocessor_config.json``, flattened).

    Steps, as transformers does them: RGB (transparency onto white), resize so the short side is
    ``shortest_edge`` (long side ``int(s * long / short)``), center crop (zero-padded if larger than
    the image), ``x * rescale_factor`` in float64 -> float32, ``(x - mean) / std`` in float32.
    """

    shortest_edge: int = 512
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
    def from_hf_dict(cls, d: dict, source: str) -> "ImageConfig":
        size, crop = d.get("size", 512), d.get("crop_size", 512)
        size = size if isinstance(size, dict) else {"shortest_edge": size}
        crop = crop if isinstance(crop, dict) else {"height": crop, "width": crop}
        try:
            kw = {k: d[k] for k in _FLAGS if d.get(k) is not None}
            for k in ("image_mean", "image_std"):
                if d.get(k) is not None:
                    v = d[k] if isinstance(d[k], (list, tuple)) else [d[k]] * 3
                    kw[k] = tuple(float(x) for x in v)
            return cls(shortest_edge=int(size["shortest_edge"]), crop_height=int(crop["height"]),
                       crop_width=int(crop["width"]), **kw)
        except (KeyError, TypeError, ValueError) as e:
            raise ChameleonError(f"{source}: image settings need size.shortest_edge and crop_size.height/"
                                 f"width (the only resize Chameleon uses); got size={size}, crop_size={crop} "
                                 f"({e!r})") from e

    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k in _FLAGS}
        return {**d, "size": {"shortest_edge": self.shortest_edge},
                "crop_size": {"height": self.crop_height, "width": self.crop_width},
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "image_processor_type": "ChameleonImageProcessor", "processor_class": "ChameleonProcessor"}

    def lookup_table(self) -> np.ndarray:
        """float32 [3, 256]: the output for each uint8 level per channel, bit-identical to transformers."""
        x = np.arange(256, dtype=np.float64)
        x = (x * self.rescale_factor).astype(np.float32) if self.do_rescale else x.astype(np.float32)
        if not self.do_normalize:
            return np.stack([x] * 3)
        mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
        return np.stack([(x - mean[c]) / std[c] for c in range(3)])

    def output_size(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((resized_h, resized_w), (out_h, out_w)) for an input of the given size."""
        h, w = height, width
        if self.do_resize:
            s = self.shortest_edge
            new_long = int(s * max(h, w) / min(h, w))
            h, w = (new_long, s) if w <= h else (s, new_long)
        return (h, w), ((self.crop_height, self.crop_width) if self.do_center_crop else (h, w))


META_NORMALIZATION = dict(rescale_factor=1 / 127.5, image_mean=(1.0,) * 3, image_std=(1.0,) * 3,
                          do_rescale=True, do_normalize=True)


def blend_to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of ``image``: transparency (an alpha band, or a ``transparency`` entry as in P/L/RGB
    PNGs with tRNS) is composited onto opaque white, as transformers does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Center crop of an [H, W, C] array; zero-pads (as transformers does) when the crop is larger."""
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


