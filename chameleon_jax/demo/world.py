"""The "shapes" world the demo model is trained on, and a pixel classifier that reads it back.

The world (a fixed contract; tests and the demo's accuracy figures depend on it):

- RGB 64x64 canvas; background white, black or gray (:data:`BACKGROUNDS`).
- One filled shape: circle, square or triangle (isosceles, apex up) whose square bounding box is
  24 to 48 px on a side, anywhere fully inside the canvas.
- Shape colors: :data:`COLORS`.
- Caption: ``{a|an} {color} {shape} on a {background} background`` ("an" before orange only).

Held-out split: shapes whose side is 34..37 px or whose left edge is at x 6..9 never appear in
training data (:func:`is_held_out`); evaluation draws only those (``split="eval"``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64
MIN_SIDE, MAX_SIDE = 24, 48
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
# Fill ratio of each shape in its bounding box (the classifier's shape cue).
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
HELD_OUT_SIDES = range(34, 38)
HELD_OUT_LEFT = range(6, 10)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    x: int = 0  # left edge of the bounding box
    y: int = 0  # top edge
    side: int = 32

    @property
    def caption(self) -> str:
        return caption_of(self.color, self.shape, self.background)

    @property
    def attributes(self) -> tuple[str, str, str]:
        return self.color, self.shape, self.background


def caption_of(color: str, shape: str, background: str) -> str:
    article = "an" if color == "orange" else "a"
    return f"{article} {color} {shape} on a {background} background"


def all_captions() -> list[str]:
    """The 54 captions, one per (color, shape, background)."""
    return [caption_of(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, BACKGROUNDS)]


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(color, shape, background) of a caption in the world's grammar, else None."""
    words = text.strip().rstrip(".").split()
    if len(words) != 7 or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    article, color, shape, _, _, background, _ = words
    if color not in COLORS or shape not in SHAPES or background not in BACKGROUNDS:
        return None
    if article != ("an" if color == "orange" else "a"):
        return None
    return color, shape, background


def is_held_out(side: int, x: int) -> bool:
    return side in HELD_OUT_SIDES or x in HELD_OUT_LEFT


def render(scene: Scene) -> np.ndarray:
    """uint8 [64, 64, 3]."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    img[shape_mask(scene.shape, scene.x, scene.y, scene.side)] = COLORS[scene.color]
    return img


def shape_mask(shape: str, x: int, y: int, side: int) -> np.ndarray:
    """bool [64, 64]: pixels whose centers lie inside the shape."""
    if not (MIN_SIDE <= side <= MAX_SIDE and 0 <= x and 0 <= y and x + side <= SIZE and y + side <= SIZE):
        raise ValueError(f"shape box x={x} y={y} side={side} is outside the world's limits")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    u, v = (xx - x) / side, (yy - y) / side  # [0, 1] inside the box
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at the top middle, base along the bottom edge
        return inside & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}")


def sample_scene(rng: np.random.Generator, split: str = "train", attributes=None) -> Scene:
    """A random scene; ``split`` "train" avoids the held-out boxes, "eval" draws only those.
    ``attributes``: (color, shape, background) to keep fixed."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if attributes is None:
        attributes = (rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)))
    while True:
        side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        x = int(rng.integers(0, SIZE - side + 1))
        y = int(rng.integers(0, SIZE - side + 1))
        if is_held_out(side, x) == (split == "eval"):
            color, shape, background = (str(a) for a in attributes)
            return Scene(color, shape, background, x, y, side)


def sample(n: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, list[Scene]]:
    """``n`` seeded scenes: (uint8 [n, 64, 64, 3], scenes)."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


# ------------------------------------------------------------------ classifier
def _nearest(pixels: np.ndarray, palette: dict) -> np.ndarray:
    """index into ``palette`` of the nearest color of each pixel [..., 3]."""
    ref = np.asarray(list(palette.values()), np.float32)
    d = ((pixels[..., None, :].astype(np.float32) - ref) ** 2).sum(-1)
    return d.argmin(-1)


def classify(image) -> tuple[str, str, str]:
    """(color, shape, background) read off the pixels of one image (PIL or uint8 [H, W, 3]).

    Background: the nearest background color to the median of the four corner pixels. Color: the
    most frequent nearest named color among the pixels nearer to a shape color than to the
    background. Shape: that color's pixels over the area of their bounding box, nearest of square
    1, circle 0.785, triangle 0.5.
    """
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3].astype(np.float32)
    h, w, _ = img.shape
    corners = np.stack([img[0, 0], img[0, w - 1], img[h - 1, 0], img[h - 1, w - 1]])
    bg_names = list(BACKGROUNDS)
    background = bg_names[int(_nearest(np.median(corners, 0), BACKGROUNDS))]
    # Foreground: nearer to a shape color than to the background color.
    palette = {"bg": BACKGROUNDS[background], **COLORS}
    nearest = _nearest(img, palette)
    fg = nearest > 0
    names = list(COLORS)
    if fg.sum() == 0:
        return names[0], SHAPES[0], background  # nothing drawn: a guess
    counts = np.bincount(nearest[fg] - 1, minlength=len(names))
    k = int(counts.argmax())
    color = names[k]
    mask = nearest == k + 1
    # Bounding box over the rows and columns holding >= 2 such pixels: an isolated stray pixel
    # does not stretch it (rendered shapes: square 1.0, circle 0.78..0.80, triangle 0.53..0.58).
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return color, SHAPES[0], background
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    ratio = mask[y0:y1 + 1, x0:x1 + 1].sum() / ((y1 - y0 + 1) * (x1 - x0 + 1))
    shape = min(FILL, key=lambda s: abs(FILL[s] - ratio))
    return color, shape, background
