"""Weight-only int8 / int4 quantization of the decoder's projections and the LM head, for inference.

A quantized kernel is a :class:`QArray` in the param tree where the float kernel was: ``q`` holds
the integers as [groups, rows per group, outputs], ``scale`` float32 scales [groups, outputs]; with a
mesh both take the kernel's mesh axes (:func:`q_specs`).

- int8: one scale per output channel, ``w ~ q * scale``, q in [-127, 127].
- int4: one scale per output channel and per group of ``group`` consecutive input rows (the
  contracted dims flattened), q in [-7, 7], stored as ``jnp.int4`` (half a byte per weight on
  TPU/GPU).

Quantized: every ``layers_*`` projection kernel (q/k/v/o, gate/up/down) and ``lm_head``. Kept in
float: embeddings (a lookup reads one row per token), norms, biases, the VQ-VAE.

Matmul implementations (``QArray.impl``, fixed when the array is made, from the device it is made
for): ``"xla"`` dequantizes in the matmul's operand and leaves fusion to XLA (TPU and GPU fuse the
convert into the dot, so the weight bytes read are the integer bytes). ``"cpu"`` (XLA:CPU, which does
not fuse that convert): with one scale per output channel (int8, and int4 kernels of one group) the
activations become two int8 rows each (:func:`split_rows`: the rounded value and its residual, error
<= max|x| / 64516) and one int8 x int8 -> int32 matmul reads the weights as they are; 92M benchmark
model, batch-1 decode step 1.97x fp32's speed (benchmarks/quant.py). Past ``SPLIT_ROWS`` rows (a
prefill) and for grouped int4, a scan over blocks of contracted rows converts one block at a time.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .errors import ChameleonError

Array = jax.Array
MODES = ("int8", "int4")
GROUP = {"int8": 0, "int4": 128}  # contracted rows per scale (0: one scale per output channel)
_QMAX = {"int8": 127, "int4": 7}
_TARGET = re.compile(r"^(layers_\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel|lm_head)$")


@struct.dataclass
class QArray:
    """A quantized kernel of ``shape`` (its first ``n_in`` dims contracted, K their product; N the
    product of the rest), in the layout the matmul reads without a reshape of the integers:

    - ``q`` [G, g, N] int8 / int4: K split into G groups of g consecutive rows (G = 1: per channel);
    - ``scale`` [G, N]: one per group and output channel, float32 (:func:`scale_dtype`: int4 scales of a
      16-bit float kernel take its dtype, the one the matmul multiplies them in).

    (TPU tiles int4 in memory, so reshaping a [K, N] int4 array is a real copy that XLA does not
    fuse into the dot; a [G, g, N] array contracts over (G, g) directly.)
    """

    q: Array
    scale: Array
    mode: str = struct.field(pytree_node=False, default="int8")
    shape: tuple = struct.field(pytree_node=False, default=())
    n_in: int = struct.field(pytree_node=False, default=1)
    impl: str = struct.field(pytree_node=False, default="xla")

    @property
    def group(self) -> int:
        return int(self.q.shape[1])

    @property
    def nbytes(self) -> int:
        bits = 8 if self.mode == "int8" else 4
        return math.prod(self.q.shape) * bits // 8 + math.prod(self.scale.shape) * jnp.dtype(self.scale.dtype).itemsize

    def dequantize(self, dtype=jnp.float32) -> Array:
        """The float kernel ``q * scale`` in the kernel's shape."""
        return (self.q.astype(dtype) * self.scale.astype(dtype)[:, None]).reshape(self.shape)


def check_mode(mode) -> str | None:
    if mode is None or mode == "none":
        return None
    if mode not in MODES:
        raise ChameleonError(f"quantize: {mode!r} is not supported; expected one of {list(MODES)} (or None)")
    return mode


def is_target(path: str) -> bool:
    """Whether the param at flat ``path`` (``a/b/c``) is quantized."""
    return bool(_TARGET.match(path))


def contracted_dims(path: str) -> int:
    """Leading kernel dims contracted with the input: o_proj [H, Dh, D] contracts two."""
    return 2 if "/o_proj/" in path else 1


def group_size(mode: str, k: int, group: int | None = None) -> int:
    """Contracted rows per scale: ``group`` (default GROUP[mode]; 0 = all K) cut to a divisor of K."""
    g = GROUP[mode] if group is None else group
    return k if g <= 0 or g >= k else math.gcd(k, g)


def _impl_for(platform: str | None) -> str:
    return "cpu" if platform == "cpu" else "xla"


def scale_dtype(mode: str, from_dtype):
    """The dtype of the scales of a ``from_dtype`` kernel quantized with ``mode``: int4 scales of a 16-bit
    float kernel are stored in that dtype. The grouped matmul multiplies them into the weights in the
    compute dtype anyway, and in float32 they would be a real share of the bytes a decode step reads
    (7B on 8 chips: the down_proj's 86 groups do not split 8 ways, so each chip holds all its scales;
    XLA:TPU bytes per step 0.351x bf16 with float32 scales, 0.293x with bf16 ones, VMEM prefetch off).
    int8's one scale per output channel multiplies the float32 output: float32."""
    dt = jnp.dtype(from_dtype)
    return dt if mode == "int4" and jnp.issubdtype(dt, jnp.floating) and dt.itemsize == 2 else jnp.dtype(jnp.float32)


def _quantize(w: Array, mode: str, n_in: int, group: int):
    shape = w.shape
    k = math.prod(shape[:n_in])
    qmax = _QMAX[mode]
    wg = w.astype(jnp.float32).reshape(k // group, group, -1)
    amax = jnp.max(jnp.abs(wg), axis=1)
    # the integers are rounded against the scale as stored, so q * scale is the nearest grid point
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype(mode, w.dtype))
    q = jnp.clip(jnp.round(wg / scale.astype(jnp.float32)[:, None]), -qmax, qmax).astype(q_dtype(mode))
    return q, scale


@functools.lru_cache(maxsize=64)
def _quantizer(out_shardings):
    return jax.jit(_quantize, static_argnums=(1, 2, 3), out_shardings=out_shardings)


def quantize(w, mode: str, n_in: int = 1, *, group: int | None = None, impl: str | None = None,
             sharding=None) -> QArray:
    """Quantize one float kernel (numpy or jax array). ``sharding``: the kernel's NamedSharding;
    the result is placed to match it (:func:`q_specs`). ``impl`` defaults to the one for the
    platform the result lands on."""
    mode = check_mode(mode)
    shape = tuple(int(d) for d in w.shape)
    if len(shape) <= n_in:
        raise ChameleonError(f"quantize: a kernel of shape {shape} has no output dims past its {n_in} input dim(s)")
    k = math.prod(shape[:n_in])
    g = group_size(mode, k, group)
    out_shardings = None
    if sharding is not None:
        out_shardings = q_shardings(sharding, n_in, (k // g, g, math.prod(shape[n_in:])))
    q, scale = _quantizer(out_shardings)(w, mode, n_in, g)
    return from_stored(q, scale, mode, shape, n_in, impl)


def stored_layout(path: str, shape, mode: str, group: int | None = None) -> tuple[int, tuple, tuple]:
    """(n_in, q shape [G, g, N], scale shape [G, N]) of the kernel at ``path`` of ``shape`` quantized
    with ``mode`` and ``group`` (default GROUP[mode]): what a quantized checkpoint stores."""
    n_in = contracted_dims(path)
    shape = tuple(int(d) for d in shape)
    k, n = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    g = group_size(mode, k, group)
    return n_in, (k // g, g, n), (k // g, n)


def q_dtype(mode: str):
    return jnp.int8 if mode == "int8" else jnp.int4


def from_stored(q, scale, mode: str, shape, n_in: int, impl: str | None = None) -> QArray:
    """A QArray around stored (restored) ``q`` and ``scale`` arrays; ``impl`` defaults to the one for
    the platform ``q`` lives on, as :func:`quantize` picks it."""
    if impl is None:
        impl = _impl_for(next(iter(q.devices())).platform)
    return QArray(q, scale, mode, tuple(int(d) for d in shape), int(n_in), impl)


def q_shardings(sharding, n_in: int, q_shape) -> tuple:
    """NamedShardings of (q, scale) for a kernel placed like the NamedSharding ``sharding``."""
    from jax.sharding import NamedSharding

    groups, g, n = q_shape
    qs, ss = q_specs(sharding.spec, sharding.mesh, n_in, groups, g, n)
    return NamedSharding(sharding.mesh, qs), NamedSharding(sharding.mesh, ss)


def q_specs(kernel_spec, mesh, n_in: int, groups: int, group: int, n: int):
    """PartitionSpecs of (q [G, g, N], scale [G, N]) from the kernel's: the mesh axes of the kernel's
    first contracted dim go to G, or to g when they do not divide G (e.g. G = 1, or 86 groups of the
    7B down_proj on 8 chips; the scales are then replicated over G), its first output dim's to N.
    An axis whose size does not divide its dim is dropped (replicated), as sharding.RULES does."""
    from jax.sharding import PartitionSpec as P

    parts = tuple(kernel_spec) + (None,) * (n_in + 1)

    def fit(axes, dim):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return axes if names and dim % math.prod(mesh.shape[a] for a in names) == 0 else None

    s_in, s_out = parts[0], fit(parts[n_in], n)
    if fit(s_in, groups) is not None:
        return P(s_in, None, s_out), P(s_in, s_out)
    return P(None, fit(s_in, group), s_out), P(None, s_out)


def quantize_flat(flat: dict, mode: str, shardings: dict | None = None) -> dict:
    """Quantize the target leaves of a flat {path: array} tree (others unchanged); each original
    leaf is dropped as soon as its quantized copy exists."""
    mode = check_mode(mode)
    if mode is None:
        return flat
    if any(p.startswith("layers/") for p in flat):
        raise ChameleonError("quantize: params with stacked (scanned) layers; unstack them first (unstack_layers)")
    out = {}
    for path in list(flat):
        w = flat.pop(path)
        out[path] = quantize_leaf(path, w, mode, shardings.get(path) if shardings else None) if is_target(path) else w
    return out


def quantize_leaf(path: str, w, mode: str, sharding=None):
    """Quantize the target param at ``path`` (a float array) into its QArray, placed like ``sharding``."""
    return quantize(w, mode, contracted_dims(path), sharding=sharding)


def abstract_quantized(flat: dict, mode: str, impl: str = "xla") -> dict:
    """Shape-only quantized tree of a flat {path: jax.ShapeDtypeStruct} tree (for AOT compiles and
    the planner); shardings follow the kernels' ones when they have them."""
    from jax.sharding import NamedSharding

    mode = check_mode(mode)
    out = {}
    for path, x in flat.items():
        if mode is None or not is_target(path):
            out[path] = x
            continue
        n_in, q_shape, s_shape = stored_layout(path, x.shape, mode)
        sh = getattr(x, "sharding", None)
        q_sh, s_sh = q_shardings(sh, n_in, q_shape) if isinstance(sh, NamedSharding) else (None, None)
        out[path] = QArray(jax.ShapeDtypeStruct(q_shape, q_dtype(mode), sharding=q_sh),
                           jax.ShapeDtypeStruct(s_shape, scale_dtype(mode, x.dtype), sharding=s_sh), mode,
                           tuple(x.shape), n_in, impl)
    return out


# ------------------------------------------------------------------ matmul
def matmul(x: Array, w: QArray, dtype, out_dtype=None) -> Array:
    """``x``'s trailing ``w.n_in`` dims contracted with the kernel's leading ones: x @ dequantize(w)."""
    lead, tail = x.shape[: x.ndim - w.n_in], w.shape[w.n_in:]
    groups, g, n = w.q.shape
    x3 = x.reshape(-1, groups, g).astype(dtype)
    if w.impl == "cpu" and groups == 1 and x3.shape[0] <= SPLIT_ROWS:
        y = _int8_dot(x3.reshape(x3.shape[0], g), w)
    elif w.impl == "cpu":
        y = _blocked(x3, w, dtype)
    elif groups == 1:  # one scale per output channel: scale the output
        y = jnp.einsum("rgk,gkn->rn", x3, w.q.astype(dtype), preferred_element_type=jnp.float32) * w.scale[0]
    else:
        wd = w.q.astype(dtype) * w.scale.astype(dtype)[:, None]
        y = jnp.einsum("rgk,gkn->rn", x3, wd, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype).reshape(lead + tail)


LO = 254  # the second integer row holds the first row's rounding residual times this
# Contracted rows per block of the CPU int8 product (the largest divisor of K up to this): XLA:CPU's int8
# library product slows down for long K, e.g. [2, 4096] x [4096, 11008] 7.4 ms whole, 2.9 ms as 8 blocks
# of 512 rows (fp32 matvec: 7.3 ms); [2, 1376] x [1376, 512] 3.4 -> 2.9 ms per 60 as 4 blocks.
K_BLOCK = 512
# Up to this many rows (decode steps) the CPU int8 matmul is the integer product of split rows; past it
# (prefill) the rows double the work of a compute-bound product, and converting blocks of ``CONVERT_BLOCK``
# weight rows to float inside a scan is faster: [320, 512] x [512, 1376] per 30 kernels 133 -> 69 ms (fp32
# 58 ms), 7B-sized [320, 4096] x [4096, 11008] 292 -> 122 ms (fp32 111 ms); at 16 rows the split product is
# as fast as fp32 or faster (7B-sized: 15 vs 22 ms), at 64 the converted blocks win.
SPLIT_ROWS = 32
CONVERT_BLOCK = 256


def split_rows(x: Array) -> tuple[Array, Array]:
    """[R, K] float -> (int8 [2R, K], scale [R, 1] float32) with x ~ scale * (hi + lo / LO): ``hi`` =
    round(x / scale) with scale = max|x| / 127 per row, ``lo`` = round(residual * LO). The error is at
    most scale / (2 LO) = max|x| / 64516 per entry (finer than bfloat16's 2^-9 relative), far below
    the int8 weights' own max|w| / 254."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    u = x / scale
    hi = jnp.round(u)
    lo = jnp.round((u - hi) * LO)
    return jnp.concatenate([hi, lo], axis=0).astype(jnp.int8), scale


def _int8_product(x2: Array, w: QArray) -> Array:
    """x2 [R, K] @ (q [K, N] as int8) -> [R, N] float32, before the output scales (see :func:`_int8_dot`)."""
    r = x2.shape[0]
    _, k, n = w.q.shape
    xq, sx = split_rows(x2)
    bk = _largest_divisor(k, K_BLOCK)
    if bk == k:
        acc = jnp.dot(xq, w.q[0], preferred_element_type=jnp.int32)
    else:  # blocks of contracted rows as a batched product, their int32 partial sums added (exact)
        acc = jnp.einsum("rgk,gkn->grn", xq.reshape(2 * r, k // bk, bk), w.q[0].reshape(k // bk, bk, n),
                         preferred_element_type=jnp.int32).sum(0)
    acc = acc.astype(jnp.float32)
    return (acc[:r] + acc[r:] * (1.0 / LO)) * sx


@jax.custom_vjp
def _int8_dot(x2: Array, w: QArray) -> Array:
    """XLA:CPU int8 path (one scale per output channel): the activations as two int8 rows each
    (:func:`split_rows`) against the int8 weights in one integer matmul, int32 accumulators. XLA:CPU
    has no fused int8 -> float dot, but its library runs int8 x int8 -> int32 products at up to 2.7x
    the float32 matvec's speed (one weight byte read instead of four), for two rows or more; a single
    row would take a slow path, so the second (residual) row is also what makes it fast at batch 1.
    |acc| <= K * 127 * 127 fits int32 for K < 133,000. Long K runs in blocks of up to ``K_BLOCK`` rows.
    Differentiable as x @ dequantize(w) (the rounding in split_rows has no gradient of its own)."""
    return _int8_product(x2, w) * w.scale[0]


def _int8_dot_fwd(x2, w):
    t = _int8_product(x2, w)
    return t * w.scale[0], (t, w)


def _int8_dot_bwd(res, g):
    t, w = res
    scale = w.scale[0].astype(jnp.float32)
    dx = jnp.einsum("rn,kn->rk", g * scale, w.q[0].astype(jnp.float32))
    dw = w.replace(q=np.zeros(w.q.shape, jax.dtypes.float0),
                   scale=jnp.sum(g * t, axis=0)[None].astype(w.scale.dtype))
    return dx, dw


_int8_dot.defvjp(_int8_dot_fwd, _int8_dot_bwd)


def _largest_divisor(k: int, most: int) -> int:
    """The largest divisor of ``k`` up to ``most``; ``k`` itself (one block) when that divisor is under
    most / 8 (a K with no useful divisor, e.g. a prime: many tiny blocks would be far slower)."""
    d = max(d for d in range(1, min(k, most) + 1) if k % d == 0)
    return d if d >= most // 8 else k


def _blocked(x3: Array, w: QArray, dtype) -> Array:
    """XLA:CPU float path: a scan over blocks of contracted rows, each block of q converted while it
    is in cache and its scales applied to the block's product: int4's groups, or (one scale per output
    channel, many rows) blocks of up to ``CONVERT_BLOCK`` rows scaled once at the end. XLA:CPU does
    not fuse the convert into the dot, and converting a whole kernel per call costs a fresh float copy
    of it (int8 [15360, 1376] -> float32: 22 ms, as long as writing any new 84 MB buffer here)."""
    groups, g, n = w.q.shape
    r = x3.shape[0]
    if groups == 1:
        bs = _largest_divisor(g, CONVERT_BLOCK)
        xb, qb = x3.reshape(r, g // bs, bs).transpose(1, 0, 2), w.q.reshape(g // bs, bs, n)
        scales = jnp.ones((g // bs, 1), jnp.float32)
    else:
        xb, qb, scales = x3.transpose(1, 0, 2), w.q, w.scale

    def body(acc, blk):
        xx, qq, ss = blk
        return acc + jnp.dot(xx, qq.astype(dtype), preferred_element_type=jnp.float32) * ss, None

    y, _ = jax.lax.scan(body, jnp.zeros((r, n), jnp.float32), (xb, qb, scales))
    return y * w.scale[0] if groups == 1 else y


def take_columns(w: QArray, ids) -> QArray:
    """The output columns ``ids`` of a QArray with one output dim (a vocabulary subset of the LM head)."""
    ids = jnp.asarray(ids)
    return w.replace(q=jnp.take(w.q, ids, axis=2), scale=jnp.take(w.scale, ids, axis=1),
                     shape=w.shape[:w.n_in] + (int(ids.shape[0]),))


def pad_columns(w: QArray, extra: int) -> QArray:
    if not extra:
        return w
    return w.replace(q=jnp.pad(w.q, ((0, 0), (0, 0), (0, extra))),
                     scale=jnp.pad(w.scale, ((0, 0), (0, extra)), constant_values=1.0),
                     shape=w.shape[:w.n_in] + (w.shape[-1] + extra,))


def split_columns(w: QArray, parts: int) -> tuple[QArray, ...]:
    n = w.shape[-1] // parts
    return tuple(w.replace(q=w.q[:, :, i * n:(i + 1) * n], scale=w.scale[:, i * n:(i + 1) * n],
                           shape=w.shape[:w.n_in] + (n,)) for i in range(parts))


def param_bytes(params) -> int:
    """Bytes the params occupy (int4 counted as half a byte)."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        total += leaf.nbytes if isinstance(leaf, QArray) else int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total
