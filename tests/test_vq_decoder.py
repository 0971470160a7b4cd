"""VQ decoder (codes -> pixels) parity with transformers' JanusVQVAEDecoder.

transformers has no Chameleon VQ decoder; Janus's is the same taming architecture with two
differences the tests undo: its ``up`` list runs in forward order (Janus ``up[k]`` is Meta's
``up[n-1-k]``), and it always puts attention blocks in the lowest-resolution level, where
Chameleon's ``attn_resolutions=[]`` has none. Its ``decode`` also L2-normalises the codebook, so
the codebook lookup and ``post_quant_conv`` run here in torch and feed its decoder module directly.
"""

from __future__ import annotations

import re

import flax.linen as fnn
import jax
import numpy as np
import pytest
import torch
from torch import nn

from chameleon_jax.config import VQConfig
from chameleon_jax.errors import ChameleonError
from chameleon_jax.model.vqvae import VQVAE
from conftest import randomize_norms

TOL = 2e-5
SEVEN_B = dict(base_channels=128, channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=2, latent_channels=256,
               embed_dim=256, num_embeddings=8192, resolution=512)


def _torch_decoder(c: VQConfig, janus_attn: bool = False, seed: int = 0):
    """Random Janus decoder with Meta's attention placement (or Janus's own, if ``janus_attn``)."""
    from transformers import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAEAttnBlock, JanusVQVAEDecoder

    torch.manual_seed(seed)
    cfg = JanusVQVAEConfig(embed_dim=c.embed_dim, num_embeddings=c.num_embeddings,
                           latent_channels=c.latent_channels, base_channels=c.base_channels,
                           channel_multiplier=list(c.channel_multiplier), num_res_blocks=c.num_res_blocks,
                           out_channels=c.in_channels, dropout=0.0)
    dec = JanusVQVAEDecoder(cfg)
    if not janus_attn:
        n = len(c.channel_multiplier)
        res = c.resolution // 2 ** (n - 1)
        for k, up in enumerate(dec.up):  # Janus's order: lowest resolution first
            ch = c.base_channels * c.channel_multiplier[n - 1 - k]
            blocks = [JanusVQVAEAttnBlock(ch) for _ in up.block] if res in c.attn_resolutions else []
            up.attn = nn.ModuleList(blocks)
            res *= 2
    extra = nn.ModuleDict(dict(post_quant_conv=nn.Conv2d(c.embed_dim, c.latent_channels, 1),
                               quantize=nn.Embedding(c.num_embeddings, c.embed_dim)))
    randomize_norms(dec, seed)
    with torch.no_grad():
        extra.quantize.weight.normal_()
    return dec.eval(), extra


def _our_params(dec, extra, num_levels: int) -> dict:
    """Janus/torch state dict -> our param tree: Meta's names, Linen paths, HWIO kernels."""
    flat = {"quantize": extra.quantize.weight.detach().numpy()}
    for prefix, module in (("post_quant_conv", extra.post_quant_conv), ("decoder", dec)):
        for name, t in module.state_dict().items():
            x = t.detach().numpy()
            name = re.sub(r"^up\.(\d+)\.", lambda m: f"up.{num_levels - 1 - int(m.group(1))}.", name)
            name = re.sub(r"(up)\.(\d+)\.(block|attn)\.(\d+)", r"\1_\2/\3_\4", name)
            name = re.sub(r"(up)\.(\d+)\.", r"\1_\2/", name).replace(".", "/")
            if name.endswith("weight"):
                name = name[: -len("weight")] + ("kernel" if x.ndim == 4 else "scale")
                x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
            flat[f"{prefix}/{name}".lstrip("/")] = x
    params: dict = {}
    for path, x in flat.items():
        *parents, leaf = path.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return params


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _compare(c: VQConfig, grid: int, batch: int, janus_attn: bool = False, seed: int = 0):
    """Decode the same random codes with ours (fp32) and the torch reference (float64)."""
    dec, extra = _torch_decoder(c, janus_attn, seed)
    params = _our_params(dec, extra, len(c.channel_multiplier))
    codes = np.random.default_rng(seed).integers(0, c.num_embeddings, (batch, grid * grid)).astype(np.int32)
    module = VQVAE(c)
    # every param the module creates comes from torch with the same shape, and nothing is left over
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), codes, method=VQVAE.decode))["params"]
    assert _shapes(fnn.meta.unbox(boxed)) == _shapes(params)
    decode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQVAE.decode))
    ours = np.asarray(decode(params, codes))
    # Through 5 levels of random blocks fp32 rounding alone reaches ~1e-5 (relative): torch's own
    # fp32 run is 0.9-1.1e-5 off its float64 run. So the oracle runs in float64 and TOL is twice that
    # floor; a wrong mapping or formula shows up as 1e-3 or more.
    dec, extra = dec.double(), extra.double()
    with torch.no_grad():
        emb = extra.quantize(torch.tensor(codes, dtype=torch.long)).reshape(batch, grid, grid, c.embed_dim)
        ref = dec(extra.post_quant_conv(emb.permute(0, 3, 1, 2))).numpy()
    side = grid * 2 ** (len(c.channel_multiplier) - 1)
    assert ours.shape == ref.shape == (batch, c.in_channels, side, side), (ours.shape, ref.shape)
    assert ours.dtype == np.float32
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert err <= TOL, f"relative error {err:.2e}"


def test_decoder_small_chameleon_shapes():
    c = VQConfig(base_channels=32, channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=2, latent_channels=32,
                 embed_dim=32, num_embeddings=64, resolution=128)
    _compare(c, grid=8, batch=2)


def test_decoder_attention_at_meta_resolutions():
    """Attention in a middle level (Meta's rule; Janus's lists rebuilt to match) and the mid block."""
    c = VQConfig(base_channels=32, channel_multiplier=(1, 2, 2), num_res_blocks=1, latent_channels=32,
                 embed_dim=16, num_embeddings=64, resolution=32, attn_resolutions=(16,))
    _compare(c, grid=4, batch=2, seed=1)


def test_decoder_matches_unmodified_janus_with_lowest_res_attention():
    """Janus's fixed placement (every block of the lowest level) is Meta's rule for that resolution."""
    c = VQConfig(base_channels=32, channel_multiplier=(1, 1, 2), num_res_blocks=1, latent_channels=32,
                 embed_dim=16, num_embeddings=64, resolution=16, attn_resolutions=(4,))
    _compare(c, grid=4, batch=2, janus_attn=True, seed=2)


def test_decoder_7b_shapes_on_small_grid():
    c = VQConfig(**SEVEN_B)
    _compare(c, grid=4, batch=1, seed=0)


def _count(tree) -> int:
    return sum(int(np.prod(s)) for s in _shapes(tree).values())


def test_decoder_7b_param_counts():
    module = VQVAE(VQConfig(**SEVEN_B))
    key = jax.random.PRNGKey(0)
    codes, pixels = np.zeros((1, 1024), np.int32), np.zeros((1, 3, 512, 512), np.float32)
    dec_side = fnn.meta.unbox(jax.eval_shape(lambda: module.init(key, codes, method=VQVAE.decode))["params"])
    enc_side = fnn.meta.unbox(jax.eval_shape(lambda: module.init(key, pixels))["params"])
    assert _count(dec_side["decoder"]) == 39_294_851  # Meta's decoder
    dec, _ = _torch_decoder(VQConfig(**SEVEN_B))
    assert _count(dec_side["decoder"]) == sum(p.numel() for p in dec.parameters())
    # default init keeps the decoder-less layout of existing checkpoints; together: Meta's VQModel
    assert "decoder" not in enc_side
    assert _count({**enc_side, **dec_side}) == 68_718_467


def test_decode_rejects_non_square_grid():
    c = VQConfig(base_channels=32, channel_multiplier=(1, 2), num_res_blocks=1, latent_channels=32,
                 embed_dim=16, num_embeddings=64, resolution=16)
    with pytest.raises(ChameleonError, match="square"):
        VQVAE(c).init(jax.random.PRNGKey(0), np.zeros((1, 6), np.int32), method=VQVAE.decode)
