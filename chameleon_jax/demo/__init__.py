"""The embedded default: a tiny Chameleon trained on the "shapes" world, shipped with the package.

``checkpoint_dir()`` is its HF-layout directory (loads with ``cj.load`` and
``ChameleonProcessor.from_pretrained`` like any checkpoint); :func:`caption` and :func:`draw` use it
with the prompt templates it was trained on. The world and its pixel classifier: :mod:`.world`;
how it was trained (two stages, one command each): :mod:`.train_vq`, :mod:`.train_lm`.

Also here: a tiny *random* checkpoint builder (``build_tiny_checkpoint``) for tests and benchmarks.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from flax import linen as nn

from ..checkpoint.hf import save_hf
from ..config import ChameleonConfig, VQConfig
from ..vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN, SEP_TOKEN, image_code_name
from . import world  # noqa: F401  (cj.demo.world: the shapes world and its classifier)

TINY_NUM_CODES = 256


def tiny_vocabulary_map(vocab_size: int = 1024, num_codes: int = TINY_NUM_CODES,
                        shuffle_seed: int | None = None) -> dict[str, int]:
    """Chameleon's layout in miniature: specials, image codes from id 4, boi/eoi/sep/<image>, text.

    ``shuffle_seed``: place the image codes at ids 4.. in a shuffled order (tests use it to catch
    code-order assumptions; the real vocabulary is in order).
    """
    vm = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    codes = np.arange(num_codes)
    if shuffle_seed is not None:
        codes = np.random.default_rng(shuffle_seed).permutation(num_codes)
    for i, code in enumerate(codes):
        vm[image_code_name(int(code))] = 4 + i
    nxt = 4 + num_codes
    for name in (BOI_TOKEN, EOI_TOKEN, SEP_TOKEN, IMAGE_TOKEN):
        vm[name] = nxt
        nxt += 1
    for i in range(nxt, vocab_size):
        vm[f"tok{i}"] = i
    return vm


def tiny_config() -> ChameleonConfig:
    return ChameleonConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        vq_config=VQConfig(
            embed_dim=16,
            num_embeddings=TINY_NUM_CODES,
            latent_channels=16,
            resolution=32,
            base_channels=32,
            channel_multiplier=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(16,),
        ),
        vocabulary_map=tiny_vocabulary_map(),
    )


def build_tiny_checkpoint(directory: str | os.PathLike, seed: int = 0, config: ChameleonConfig | None = None) -> str:
    """Write a random HF-layout checkpoint (config.json + model.safetensors) to ``directory``."""
    from ..model import init_params

    config = config or tiny_config()
    params = nn.unbox(init_params(config, jax.random.key(seed)))
    # Norm params init to 1/0; perturb them so the demo exercises every tensor.
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype)
        if any("norm" in str(getattr(k, "key", "")) for k in path)
        else x,
        params,
    )
    save_hf(params, config, os.fspath(directory))
    return os.fspath(directory)


# ------------------------------------------------------------------ the trained demo model
CHECKPOINT_DIR = os.path.join(os.path.dirname(__file__), "checkpoint")


def checkpoint_dir() -> str:
    """The shipped, trained demo checkpoint (HF layout, VQ-GAN decoder included)."""
    path = CHECKPOINT_DIR
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        from ..errors import ChameleonError

        raise ChameleonError(f"{path}: the demo checkpoint is missing from this install "
                             "(python -m chameleon_jax.demo.train_lm rebuilds it)")
    return path


@functools.lru_cache(maxsize=3)
def load_demo(quantize: str | None = None):
    """(model, processor) of the shipped demo checkpoint, float32 (``quantize``: "int8" / "int4"
    weights, see :func:`chameleon_jax.load`), loaded once per process and setting."""
    from ..api import load
    from ..processing import ChameleonProcessor

    path = checkpoint_dir()
    return load(path, dtype="float32", quantize=quantize), ChameleonProcessor.from_pretrained(path)


CAPTION_PROMPT = "<image>"  # the template the demo model was trained on (the processor adds <sep>)


def caption(images, max_new_tokens: int = 12, *, quantize: str | None = None) -> list[str]:
    """Greedy captions of images (PIL images, file paths or uint8 [H, W, 3] arrays; 64x64 is native,
    others are resized and center-cropped by the processor)."""
    model, proc = load_demo(quantize)
    images = list(images)
    if not images:
        return []
    batch = proc(text=[CAPTION_PROMPT] * len(images), images=images, padding=True)
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                         max_new_tokens=max_new_tokens)
    return [t.strip() for t in proc.batch_decode(new, skip_special_tokens=True)]


def draw(captions, seed: int = 0, *, guidance_scale_text: float = 3.0, guidance_scale_image: float = 1.2,
         do_sample: bool = True, temperature: float = 0.7, top_p: float = 0.9, progress=None,
         quantize: str | None = None) -> list:
    """One 64x64 PIL image per caption, drawn by the demo model in image mode (Meta's 3-stream
    classifier-free guidance; both scales 1.0 turn it off)."""
    model, proc = load_demo(quantize)
    captions = [captions] if isinstance(captions, str) else list(captions)
    if not captions:
        return []
    batch = proc(text=captions, padding=True)
    ids = model.generate_image(batch["input_ids"], batch["attention_mask"], guidance_scale_text=guidance_scale_text,
                               guidance_scale_image=guidance_scale_image, do_sample=do_sample,
                               temperature=temperature, top_p=top_p, seed=seed, progress=progress)
    return model.decode_images(ids)
