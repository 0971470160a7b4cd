"""Stage 1 of the demo model: train the VQ-VAE image tokenizer on the shapes world.

    python -m chameleon_jax.demo.train_vq [--steps N] [--out chameleon_jax/demo/stages/vq.safetensors]

Chameleon's own encoder / decoder modules (:mod:`chameleon_jax.model.vqvae`) scaled down: 64x64
RGB -> 8x8 grid of codes from a 1024-entry codebook -> 64x64 RGB. The encoder sees the pixels as
the processor gives them (HF normalization, ``x * 0.0078 - 1``); the decoder is trained towards
Meta's ``x / 127.5 - 1`` so that ``decode_images`` (clamp, ``(x + 1) * 127.5``) gives the pixels
back. Loss: MSE + L1 + codebook loss + 0.25 x commitment loss, straight-through gradients; codes unused
for a while are restarted on random encoder outputs of the current batch. Fresh scenes every step
(train split), fixed seed: the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from ..config import VQConfig
from ..model.vqvae import VQVAE
from . import world

STAGES_DIR = os.path.join(os.path.dirname(__file__), "stages")
VQ_PATH = os.path.join(STAGES_DIR, "vq.safetensors")
HF_RESCALE = 0.0078  # the processor's rescale_factor (mean = std = 1)


def demo_vq_config() -> VQConfig:
    return VQConfig(embed_dim=32, num_embeddings=1024, latent_channels=32, resolution=world.SIZE,
                    base_channels=32, channel_multiplier=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=())


def processor_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] as the demo's processor gives them."""
    return (images.astype(np.float32) * np.float32(HF_RESCALE) - 1.0).transpose(0, 3, 1, 2)


def meta_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the decoder's target)."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def _encode_latents(m: VQVAE, x):
    return m.quant_conv(m.encoder(jnp.transpose(x, (0, 2, 3, 1))))


def init_vq_params(cfg: VQConfig, seed: int) -> dict:
    module = VQVAE(cfg)
    x = jnp.zeros((1, 3, cfg.resolution, cfg.resolution), jnp.float32)
    k1, k2 = jax.random.split(jax.random.key(seed))
    enc = module.init(k1, x)["params"]
    dec = module.init(k2, jnp.zeros((1, 1), jnp.int32), method=VQVAE.decode)["params"]
    return nn.unbox({**dec, **enc})


def make_step(cfg: VQConfig, tx, beta: float = 0.25):
    module = VQVAE(cfg)

    def loss_fn(params, x_in, x_target):
        z = module.apply({"params": params}, x_in, method=_encode_latents)  # [N, h, w, E]
        book = params["quantize"]
        flat = z.reshape(-1, z.shape[-1])
        d = (flat**2).sum(1, keepdims=True) + (book**2).sum(1)[None] - 2 * flat @ book.T
        codes = jnp.argmin(d, axis=1)
        q = book[codes].reshape(z.shape)
        codebook = jnp.mean((jax.lax.stop_gradient(z) - q) ** 2)
        commit = jnp.mean((z - jax.lax.stop_gradient(q)) ** 2)
        q_st = z + jax.lax.stop_gradient(q - z)
        recon = module.apply({"params": params}, q_st, method=VQVAE.decode_latents)
        mse = jnp.mean((recon - x_target) ** 2)
        l1 = jnp.mean(jnp.abs(recon - x_target))  # keeps flat-colored edges sharp
        return mse + l1 + codebook + beta * commit, {"mse": mse, "codes": codes, "z": flat}

    @jax.jit
    def step(params, opt_state, x_in, x_target):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x_in, x_target)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return step


def psnr(recon: np.ndarray, target: np.ndarray) -> float:
    """Mean PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((np.clip(recon, -1, 1) - target) ** 2).reshape(len(recon), -1).mean(1)
    return float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-10))))


def train(steps: int = 3000, batch: int = 16, seed: int = 0, lr: float = 1e-3, out: str | None = VQ_PATH,
          log=print) -> dict:
    """Train and (if ``out``) save flat params to a safetensors file. Returns the flat params."""
    cfg = demo_vq_config()
    params = init_vq_params(cfg, seed)
    rng = np.random.default_rng(seed)
    # Codebook from encoder outputs of a first batch: every code starts in use.
    first, _ = world.sample(64, seed=seed + 1)
    z0 = VQVAE(cfg).apply({"params": params}, jnp.asarray(processor_pixels(first)), method=_encode_latents)
    z0 = np.asarray(z0).reshape(-1, cfg.embed_dim)
    params["quantize"] = jnp.asarray(z0[rng.choice(len(z0), cfg.num_embeddings, replace=len(z0) < cfg.num_embeddings)]
                                     + rng.normal(0, 0.01, (cfg.num_embeddings, cfg.embed_dim)).astype(np.float32))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.05)
    tx = optax.adam(sched)
    opt_state = tx.init(params)
    step = make_step(cfg, tx)
    last_used = np.zeros(cfg.num_embeddings, np.int64)
    t0 = time.time()
    for i in range(steps):
        imgs = np.stack([world.render(world.sample_scene(rng)) for _ in range(batch)])
        params, opt_state, loss, aux = step(params, opt_state, jnp.asarray(processor_pixels(imgs)),
                                            jnp.asarray(meta_pixels(imgs)))
        codes = np.asarray(aux["codes"])
        last_used[codes] = i
        if i % 50 == 49 and i < steps * 0.8:
            dead = np.nonzero(i - last_used >= 100)[0]
            if len(dead):
                z = np.asarray(aux["z"])
                book = np.asarray(params["quantize"]).copy()
                book[dead] = z[rng.choice(len(z), len(dead))] + rng.normal(0, 0.01, (len(dead), cfg.embed_dim))
                params["quantize"] = jnp.asarray(book, jnp.float32)
                last_used[dead] = i
        if i % 50 == 0 or i == steps - 1:
            used = int((i - last_used < 100).sum())
            log(f"vq step {i:5d} loss {float(loss):.5f} mse {float(aux['mse']):.5f} codes in use {used} "
                f"({time.time() - t0:.0f} s)")
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    if out:
        from safetensors.numpy import save_file

        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp"
        save_file(flat, tmp, metadata={"steps": str(steps), "batch": str(batch), "seed": str(seed)})
        os.replace(tmp, out)
        log(f"wrote {out}")
    return flat


def load_vq(path: str = VQ_PATH) -> dict:
    """The nested VQ params of a stage-1 file."""
    from safetensors.numpy import load_file

    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in load_file(path).items()})


@functools.lru_cache(maxsize=1)
def _coders():
    module = VQVAE(demo_vq_config())
    return (jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQVAE.encode)),
            jax.jit(lambda p, c: module.apply({"params": p}, c, method=VQVAE.decode)))


def encode_images(params: dict, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """uint8 [N, 64, 64, 3] -> VQ codes int32 [N, 64], through the processor's normalization."""
    enc = _coders()[0]
    return np.concatenate([np.asarray(enc(params, processor_pixels(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def evaluate(params: dict, n: int = 200, seed: int = 1234) -> dict:
    """Held-out reconstruction: mean PSNR and how often the classifier still reads the caption."""
    imgs, scenes = world.sample(n, seed=seed, split="eval")
    codes = encode_images(params, imgs)
    recon = np.asarray(_coders()[1](params, codes))
    out = np.clip((recon + 1) * 127.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    kept = np.mean([world.classify(o) == s.attributes for o, s in zip(out, scenes)])
    return {"psnr": psnr(recon, meta_pixels(imgs)), "caption_kept": float(kept),
            "codes_used": int(len(np.unique(codes)))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=VQ_PATH)
    a = ap.parse_args(argv)
    t0 = time.time()
    flat = train(a.steps, a.batch, a.seed, a.lr, a.out)
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    print(f"trained in {time.time() - t0:.0f} s; held-out: {evaluate(params)}")


if __name__ == "__main__":
    main()
