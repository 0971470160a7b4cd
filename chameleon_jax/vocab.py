"""Image code <-> BPE id mapping and the special tokens of Chameleon's vocabulary.

The VQ-VAE emits codes 0..num_embeddings-1. Each code has a BPE token whose name is ``IMGIMG``
followed by the code's decimal digits written as letters (0 -> A, ..., 9 -> J) and a closing ``Z``:
code 8191 is ``IMGIMGIBJBZ``. This module is the only place that knows that spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import numpy as np

IMAGE_NAME_PREFIX = "IMGIMG"
IMAGE_NAME_SUFFIX = "Z"

# Special token names (HF spelling; Meta's text_tokenizer.json calls the image placeholder
# <reserved08707>, which the processor renames on load).
BOI_TOKEN = "<racm3:break>"
EOI_TOKEN = "<eoss>"
IMAGE_TOKEN = "<image>"
SEP_TOKEN = "<reserved08706>"
META_IMAGE_TOKEN = "<reserved08707>"

_DIGIT_TO_LETTER = {str(d): chr(ord("A") + d) for d in range(10)}
_LETTER_TO_DIGIT = {v: k for k, v in _DIGIT_TO_LETTER.items()}


def image_code_name(code: int) -> str:
    """BPE token name of VQ code ``code`` (e.g. 12 -> ``IMGIMGBCZ``)."""
    if code < 0:
        raise ValueError(f"image code must be >= 0, got {code}")
    return IMAGE_NAME_PREFIX + "".join(_DIGIT_TO_LETTER[c] for c in str(int(code))) + IMAGE_NAME_SUFFIX


def parse_image_code_name(name: str) -> int | None:
    """Inverse of :func:`image_code_name`; None for names that are not image tokens."""
    if not (name.startswith(IMAGE_NAME_PREFIX) and name.endswith(IMAGE_NAME_SUFFIX)):
        return None
    body = name[len(IMAGE_NAME_PREFIX) : -len(IMAGE_NAME_SUFFIX)]
    if not body or any(c not in _LETTER_TO_DIGIT for c in body):
        return None
    return int("".join(_LETTER_TO_DIGIT[c] for c in body))


@dataclass(frozen=True)
class ImageVocab:
    """Image-token tables derived from a vocabulary map (token name -> BPE id).

    Attributes:
      image_token_id: id of the ``<image>`` placeholder (None when the vocabulary has none).
      image_token_ids: sorted BPE ids of every IMGIMG token; the model suppresses these logits
        in text mode, as transformers does.
      code_to_bpe: int32 table [num_codes]; ``code_to_bpe[c]`` is the BPE id of code c. Codes
        absent from the vocabulary map to 0, as transformers' mapping tensor does.
      bpe_to_code: dict BPE id -> code.
    """

    image_token_id: int | None
    image_token_ids: np.ndarray
    code_to_bpe: np.ndarray
    bpe_to_code: Mapping[int, int]

    @classmethod
    def from_vocabulary_map(cls, vocabulary_map: Mapping[str, int] | None) -> "ImageVocab":
        vocabulary_map = vocabulary_map or {}
        bpe_to_code: dict[int, int] = {}
        for name, bpe in vocabulary_map.items():
            code = parse_image_code_name(name)
            if code is not None:
                bpe_to_code[int(bpe)] = code
        size = max(bpe_to_code.values()) + 1 if bpe_to_code else 0
        code_to_bpe = np.zeros((size,), np.int32)
        for bpe, code in bpe_to_code.items():
            code_to_bpe[code] = bpe
        image_token_id = vocabulary_map.get(IMAGE_TOKEN)
        return cls(
            image_token_id=None if image_token_id is None else int(image_token_id),
            image_token_ids=np.array(sorted(bpe_to_code), np.int32),
            code_to_bpe=code_to_bpe,
            bpe_to_code=bpe_to_code,
        )

    def codes_to_bpe(self, codes: np.ndarray) -> np.ndarray:
        """Map VQ codes (any shape) to BPE ids with numpy."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= len(self.code_to_bpe)):
            raise ValueError(
                f"image codes must lie in [0, {len(self.code_to_bpe)}), got range "
                f"[{codes.min()}, {codes.max()}]"
            )
        return self.code_to_bpe[codes]

    @cached_property
    def bpe_to_code_table(self) -> np.ndarray:
        """int32 [largest image BPE id + 1]: the code of each BPE id, -1 for ids that are not image tokens."""
        table = np.full((max(self.bpe_to_code, default=-1) + 1,), -1, np.int32)
        for bpe, code in self.bpe_to_code.items():
            table[bpe] = code
        return table

    def bpe_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Map BPE ids (any shape) of image tokens back to VQ codes; -1 where an id is not one."""
        ids = np.asarray(ids).astype(np.int64)
        table = self.bpe_to_code_table
        inside = (ids >= 0) & (ids < len(table))
        return np.where(inside, table[np.where(inside, ids, 0)] if len(table) else -1, -1).astype(np.int32)

    def is_image_token(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of ids that are IMGIMG tokens."""
        return np.isin(np.asarray(ids), self.image_token_ids)
