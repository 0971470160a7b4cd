"""The decoder's building blocks: params with logical axis names (or the QArray stored in a kernel's
place), RoPE, RMSNorm, the per-head qk-LayerNorm, projections as 2-D matmuls, and a blocked argmax.

Shapes as in decoder.py: B batch, T tokens, D hidden, N heads, Dh head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ChameleonConfig
from ..quant import QArray, matmul as quant_matmul

Array = jax.Array


def _param(mod: nn.Module, name: str, shape, axes, init=nn.initializers.normal(0.02)):
    """A parameter carrying logical axis names (mapped to mesh axes by sharding.py)."""
    return mod.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _weight(mod: nn.Module, name: str, shape, axes):
    """A matrix param, or the :class:`~chameleon_jax.quant.QArray` stored in its place (its layout
    differs from ``shape``, so it bypasses the param's shape check)."""
    if mod.has_variable("params", name):
        value = mod.get_variable("params", name)
        if isinstance(value, QArray):
            return value
    return _param(mod, name, shape, axes)


def _cast(x: Array, dtype) -> Array:
    return x if x.dtype == dtype else x.astype(dtype)


def rope_inv_freq(config: ChameleonConfig, positions: Array) -> Array:
    """[Dh/2] inverse frequencies, as transformers computes them (default, linear, dynamic).

    Dynamic NTK scaling depends on the longest position in this call (max(positions) + 1), like
    transformers' forward; unlike transformers it keeps no state between calls.
    """
    dim = config.head_dim
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = jnp.float32(config.rope_theta)
    if config.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        factor = config.rope_factor
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    return inv_freq


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate-half RoPE. x: [B, T, N, Dh]; positions: [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (_cast(scale, self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class HeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with a separate affine per head: params [N, Dh]."""

    num_heads: int
    head_dim: int
    eps: float
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, N, Dh]
        shape = (self.num_heads, self.head_dim)
        scale = _param(self, "scale", shape, self.axes, nn.initializers.ones)
        bias = _param(self, "bias", shape, self.axes, nn.initializers.zeros)
        xf = x.astype(jnp.float32)
        # plain means over the head dim: with jax 0.10's XLA:CPU (YNNPACK reductions) this fwd+bwd runs
        # in half the time of the earlier form, matvecs with a 1/Dh vector (0.84 vs 1.67 ms, [4, 256, 8, 32])
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centered = xf - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


ARGMAX_BLOCK = 128


def argmax_rows(x: Array) -> Array:
    """``jnp.argmax(x, axis=-1)`` of NaN-free [B, V] -> [B] int32, the same index (the first maximum; 0
    for a row of -inf), in two passes: the max of each block of ``ARGMAX_BLOCK`` entries, the first
    block holding the row's max, then the first max inside it. XLA:CPU runs argmax's (value, index)
    reduction unvectorized, ~1 ms for [8, 57344] on one core; the blocked form takes ~0.1 ms (a step of
    batch-8 decode: ~18 ms). NaN must be replaced first (generation's ``choose_tokens`` makes it -inf):
    a fused, vectorized max on XLA:CPU may skip it. Also the VQ-VAE's nearest-code argmin (of minus the
    distances)."""
    b, v = x.shape
    n = -(-v // ARGMAX_BLOCK)
    if n < 2:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    if n * ARGMAX_BLOCK != v:  # -inf padding at the end never wins a tie against a real entry
        x = jnp.pad(x, ((0, 0), (0, n * ARGMAX_BLOCK - v)), constant_values=-jnp.inf)
    blocks = x.reshape(b, n, ARGMAX_BLOCK)
    first = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
    inside = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]
    return (first * ARGMAX_BLOCK + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def matmul_2d(x: Array, w: Array, n_in: int, out_dtype=None) -> Array:
    """Contract x's trailing ``n_in`` dims with w's leading ``n_in`` dims as one 2-D matmul.

    Same result as the einsum; as a plain [N, in] @ [in, out] its backward pass avoids the
    transposed copies XLA's CPU backend makes for the 3-D einsum (~25% of a train step).
    """
    lead, tail = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(lead + tail)


class Linear(nn.Module):
    """An einsum-shaped projection: ``kernel`` of ``shape`` with logical ``axes``, optional bias."""

    spec: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    bias_ndim: int = 0  # 0: no bias; else the bias is the kernel's trailing bias_ndim dims
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.dtype)
        kernel = _weight(self, "kernel", self.shape, self.axes)
        lhs, kern = self.spec.split("->")[0].split(",")
        n_in = sum(ch in lhs for ch in kern)  # leading kernel dims contracted with x's trailing dims
        if isinstance(kernel, QArray):  # weight-only int8/int4 (chameleon_jax/quant.py)
            y = quant_matmul(x, kernel, dt)
        else:
            y = matmul_2d(_cast(x, dt), _cast(kernel, dt), n_in)
        if self.bias_ndim:
            shape, axes = self.shape[-self.bias_ndim :], self.axes[-self.bias_ndim :]
            y = y + _cast(_param(self, "bias", shape, axes, nn.initializers.zeros), dt)
        return y
