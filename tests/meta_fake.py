"""Write a fake Meta Chameleon release from a (random) transformers model, for tests.

The inverse of what transformers' converter (and chameleon_jax.checkpoint.meta) does:
q/k projections and q/k norm params back to interleaved-RoPE order, model-parallel shards split
the way Meta's tensor-parallel layers hold them, one q/k LayerNorm per shard, plus Meta's
``params.json`` / ``consolidate_params.json``, a taming-style ``vqgan.ckpt`` (with a random
decoder) and ``vqgan.yaml``, and a ``text_tokenizer.json`` naming the image placeholder
``<reserved08707>``.

    root/models/<name>/{params.json, consolidate_params.json, consolidated[.NN].pth}
    root/tokenizer/{text_tokenizer.json, vqgan.ckpt, vqgan.yaml}
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import yaml

from chameleon_jax.vocab import IMAGE_TOKEN, META_IMAGE_TOKEN


def half_to_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows [h*Dh, ...] (or a [Dh] vector) from rotate_half to Meta's interleaved order."""
    n = w.shape[0] // head_dim
    return w.reshape(n, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def share_norms_per_shard(model, shards: int) -> None:
    """Make each shard's heads share one q/k LayerNorm (row of the shard's first head), as in a
    model with model_parallel_size=shards: Meta holds one LayerNorm per shard."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                per = p.shape[0] // shards
                p.copy_(p[::per].repeat_interleave(per, 0))


def _plain(t: torch.Tensor, dtype) -> torch.Tensor:
    # clone: torch.save writes a view's whole storage.
    return t.detach().to(dtype).contiguous().clone()


def write_meta_release(
    root,
    model,
    *,
    name: str = "7b",
    shards: int = 1,
    fused: bool = False,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    dtype=torch.float32,
    norm_jitter: float = 0.0,
    with_vqgan: bool = True,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write the release of ``model`` (a ChameleonForConditionalGeneration) under ``root``.

    ``fused``: store ``wqkv`` / ``w13`` instead of wq, wk, wv / w1, w3.
    ``norm_jitter``: the per-shard copies of RMSNorm weights differ by zero-mean offsets of this
    size (their mean is the model's weight).
    Returns the decoder tensors written to vqgan.ckpt ({``decoder.*``: float32 array}).
    """
    cfg = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    dim, n_heads = cfg.hidden_size, cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads
    hd = dim // n_heads
    hl, kvl = n_heads // shards, n_kv // shards
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(shards, dtype=torch.float32) - (shards - 1) / 2

    def norm_copy(w, s):
        if norm_jitter and shards > 1:
            return w + norm_jitter * offsets[s] * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1))
        return w

    files: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for s in range(shards):
        out = files[s]
        out["tok_embeddings.weight"] = sd["model.embed_tokens.weight"].chunk(shards, 1)[s]
        out["output.weight"] = sd["lm_head.weight"].chunk(shards, 0)[s]
        out["norm.weight"] = norm_copy(sd["model.norm.weight"], s)
        out["rope.freqs"] = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        for n in range(cfg.num_hidden_layers):
            hf, a, f = f"model.layers.{n}.", f"layers.{n}.attention.", f"layers.{n}.feed_forward."
            wq = half_to_interleaved(sd[hf + "self_attn.q_proj.weight"], hd)[s * hl * hd:(s + 1) * hl * hd]
            wk = half_to_interleaved(sd[hf + "self_attn.k_proj.weight"], hd)[s * kvl * hd:(s + 1) * kvl * hd]
            wv = sd[hf + "self_attn.v_proj.weight"][s * kvl * hd:(s + 1) * kvl * hd]
            if fused:
                out[a + "wqkv.weight"] = torch.cat([wq, wk, wv])
            else:
                out[a + "wq.weight"], out[a + "wk.weight"], out[a + "wv.weight"] = wq, wk, wv
            out[a + "wo.weight"] = sd[hf + "self_attn.o_proj.weight"].chunk(shards, 1)[s]
            for proj, per in (("q", hl), ("k", kvl)):
                for p in ("weight", "bias"):
                    rows = sd[hf + f"self_attn.{proj}_norm.{p}"][s * per:(s + 1) * per]
                    assert torch.equal(rows, rows[:1].expand_as(rows)), "heads of a shard must share q/k norms"
                    out[a + f"{proj}_normalization.{p}"] = half_to_interleaved(rows[0], hd)
            w1 = sd[hf + "mlp.gate_proj.weight"].chunk(shards, 0)[s]
            w3 = sd[hf + "mlp.up_proj.weight"].chunk(shards, 0)[s]
            if fused:
                out[f + "w13.weight"] = torch.cat([w1, w3])
            else:
                out[f + "w1.weight"], out[f + "w3.weight"] = w1, w3
            out[f + "w2.weight"] = sd[hf + "mlp.down_proj.weight"].chunk(shards, 1)[s]
            out[f"layers.{n}.attention_norm.weight"] = norm_copy(sd[hf + "input_layernorm.weight"], s)
            out[f"layers.{n}.ffn_norm.weight"] = norm_copy(sd[hf + "post_attention_layernorm.weight"], s)

    model_dir = os.path.join(root, "models", name)
    os.makedirs(model_dir, exist_ok=True)
    for s, out in enumerate(files):
        fname = "consolidated.pth" if shards == 1 else f"consolidated.{s:02d}.pth"
        torch.save({k: _plain(v, dtype) for k, v in out.items()}, os.path.join(model_dir, fname))
    model_args = {
        "dim": dim, "n_layers": cfg.num_hidden_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
        "vocab_size": cfg.vocab_size, "ffn_dim_multiplier": ffn_dim_multiplier, "multiple_of": multiple_of,
        "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"],
        "qk_normalization": True, "swin_norm": bool(cfg.swin_norm),
    }
    with open(os.path.join(model_dir, "params.json"), "w") as fh:
        json.dump({"model": model_args, "seed": 0, "model_parallel_size": 8}, fh)
    with open(os.path.join(model_dir, "consolidate_params.json"), "w") as fh:
        json.dump({"model_parallel_size": shards}, fh)

    tok_dir = os.path.join(root, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    write_text_tokenizer(os.path.join(tok_dir, "text_tokenizer.json"), cfg.vocabulary_map)
    if not with_vqgan:
        return {}
    vq = cfg.vq_config
    vq_sd = {k[len("model.vqmodel."):]: v for k, v in sd.items() if k.startswith("model.vqmodel.")}
    decoder = random_meta_decoder(vq, gen)
    state = {**vq_sd, **decoder, "loss.logvar": torch.zeros(())}
    ckpt = {"state_dict": {k: _plain(v, torch.float32) for k, v in state.items()}, "epoch": 3, "global_step": 1234}
    torch.save(ckpt, os.path.join(tok_dir, "vqgan.ckpt"))
    ddconfig = {
        "double_z": bool(vq.double_latent), "z_channels": vq.latent_channels, "resolution": vq.resolution,
        "in_channels": vq.in_channels, "out_ch": vq.in_channels, "ch": vq.base_channels,
        "ch_mult": list(vq.channel_multiplier), "num_res_blocks": vq.num_res_blocks,
        "attn_resolutions": list(vq.attn_resolutions or []), "dropout": 0.0,
    }
    doc = {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": vq.embed_dim, "n_embed": vq.num_embeddings, "ddconfig": ddconfig,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0, "codebook_weight": 1.0}},
    }}}
    with open(os.path.join(tok_dir, "vqgan.yaml"), "w") as fh:
        yaml.safe_dump(doc, fh)
    return {k: v.numpy() for k, v in decoder.items()}


def meta_decoder_shapes(vq) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the ``decoder.*`` tensors of a taming VQGAN (Meta's vqgan.ckpt) for an HF
    ``vq_config``, written from the taming Decoder's structure (not from chameleon_jax's modules)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{proj}", c, c, 1)

    mult = list(vq.channel_multiplier)
    ch = vq.base_channels * mult[-1]
    conv("decoder.conv_in", vq.latent_channels, ch, 3)
    resnet("decoder.mid.block_1", ch, ch)
    attn("decoder.mid.attn_1", ch)
    resnet("decoder.mid.block_2", ch, ch)
    res = vq.resolution // 2 ** (len(mult) - 1)
    for i in reversed(range(len(mult))):  # up[i] holds ch_mult[i]; the lowest resolution runs first
        out = vq.base_channels * mult[i]
        for j in range(vq.num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", ch, out)
            ch = out
            if res in (vq.attn_resolutions or []):
                attn(f"decoder.up.{i}.attn.{j}", ch)
        if i:
            conv(f"decoder.up.{i}.upsample.conv", ch, ch, 3)
            res *= 2
    norm("decoder.norm_out", ch)
    conv("decoder.conv_out", ch, vq.in_channels, 3)
    return shapes


def random_meta_decoder(vq, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random, numerically tame decoder: conv weights ~ N(0, 1/fan_in), norm weights near 1."""
    out = {}
    for name, shape in meta_decoder_shapes(vq).items():
        x = torch.randn(shape, generator=gen)
        if len(shape) == 4:
            x = x / float(np.sqrt(shape[1] * shape[2] * shape[3]))
        elif "norm" in name and name.endswith("weight"):
            x = 1.0 + 0.2 * x
        else:
            x = 0.05 * x
        out[name] = x
    return out


def write_text_tokenizer(path, vocabulary_map: dict[str, int]) -> None:
    """A tokenizers BPE JSON whose vocab is ``vocabulary_map`` in Meta's spelling."""
    from tokenizers import AddedToken, Tokenizer, models

    vocab = dict(vocabulary_map)
    vocab[META_IMAGE_TOKEN] = vocab.pop(IMAGE_TOKEN)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    specials = ["<unk>", "<s>", "</s>", "<pad>", META_IMAGE_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials if t in vocab])
    tok.save(str(path))
