"""The causal-LM loss with transformers' ``labels=`` convention (used by ``model.loss`` and training).

:func:`resolve_labels`, :func:`loss_sums`, :func:`model_loss`: labels shifted inside, -100 ignored,
mean over the remaining tokens, plus a loss-mask choice (``loss_on``), optional z-loss, and
``image_targets``: by default image-token logits are masked exactly as transformers' forward masks
them; with ``image_targets=True`` they are not, and ``<image>`` placeholder labels become the real
image tokens (trainable targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ChameleonError
from ..quant import QArray
from .decoder import Chameleon, causal_mask, default_positions, head_logits, matmul_2d

IGNORE_INDEX = -100
LOSS_ON = ("all", "text", "image")


# ------------------------------------------------------------------ loss
def _image_table(vocab, vocab_size: int) -> np.ndarray:
    """bool [V]: ids that are image tokens (IMGIMG codes and the <image> placeholder)."""
    table = np.zeros((vocab_size,), bool)
    ids = vocab.image_token_ids
    table[ids[ids < vocab_size]] = True
    if vocab.image_token_id is not None and vocab.image_token_id < vocab_size:
        table[vocab.image_token_id] = True
    return table


def resolve_labels(labels, input_ids, config, *, image_targets: bool = False, loss_on: str = "all"):
    """Labels as the loss uses them (same shape, unshifted).

    ``input_ids`` holds the real image tokens (placeholders already replaced). With
    ``image_targets`` a label equal to the ``<image>`` placeholder becomes the image token at that
    position. ``loss_on``: "all" keeps every label, "text" ignores image-token labels (codes and
    placeholders), "image" keeps only those. The image delimiters (boi, eoi) count as text: the
    model still learns where an image starts and ends.
    """
    if loss_on not in LOSS_ON:
        raise ChameleonError(f"loss_on: expected one of {list(LOSS_ON)}, got {loss_on!r}")
    vocab = config.image_vocab
    if image_targets and vocab.image_token_id is not None:
        labels = jnp.where(labels == vocab.image_token_id, input_ids, labels)
    if loss_on != "all":
        table = jnp.asarray(_image_table(vocab, config.vocab_size))
        is_image = table[jnp.clip(labels, 0, config.vocab_size - 1)]
        is_image &= labels >= 0
        labels = jnp.where(is_image if loss_on == "text" else ~is_image, IGNORE_INDEX, labels)
    return labels


def shifted_targets(labels):
    """labels [B, T] -> the target of each position [B, T] (next label; -100 at the end)."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


def loss_sums(logits, labels):
    """(sum of token NLL, sum of logsumexp^2, number of targets) over non-ignored shifted labels.

    logits [B, T, V] fp32; labels [B, T] unshifted (position t's logits predict labels[t + 1]).
    """
    return _target_sums(logits, shifted_targets(labels))


def _target_sums(logits, targets, column=None):
    """``column``: an int table [V] from target id to its logits column, -1 for ids whose logit is
    the fp32 min (suppressed columns left out of ``logits``); None: the id is the column."""
    valid = targets != IGNORE_INDEX
    lse = jax.nn.logsumexp(logits, axis=-1)
    index = jnp.where(valid, targets, 0)
    if column is not None:
        index = jnp.asarray(column)[jnp.clip(index, 0, column.shape[0] - 1)]
    picked = jnp.take_along_axis(logits, jnp.maximum(index, 0)[..., None], axis=-1)[..., 0]
    if column is not None:
        picked = jnp.where(index < 0, jnp.finfo(jnp.float32).min, picked)
    nll = jnp.where(valid, lse - picked, 0.0)
    z = jnp.where(valid, lse * lse, 0.0)
    return nll.sum(), z.sum(), valid.sum()


def _text_runs(config) -> list[tuple[int, int]]:
    """The [start, stop) runs of vocabulary columns that are not suppressed image tokens."""
    keep = np.ones((config.vocab_size,), bool)
    ids = config.image_vocab.image_token_ids
    keep[ids[ids < config.vocab_size]] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def text_columns_ok(config, tree) -> bool:
    """Whether :func:`head_sums` may slice the LM head by vocabulary columns: not when the head is split
    over devices along the vocabulary (tensor parallel), where the unaligned slice would reshard it.
    ``tree``: the params (arrays) or their shardings; the head is its lm_head, or the embeddings when tied."""
    head = tree.get("embed_tokens", {}).get("embedding") if config.tie_word_embeddings else tree.get("lm_head")
    head_sharding = getattr(head, "sharding", head)
    if head_sharding is None or not hasattr(head_sharding, "shard_shape"):
        return True
    d, v = config.hidden_size, config.vocab_size
    if config.tie_word_embeddings:  # the embeddings [V, D], transposed
        return head_sharding.shard_shape((v, d))[0] == v
    return head_sharding.shard_shape((d, v))[1] == v


def head_sums(config, hidden, head, targets, suppress_image_tokens: bool = True, text_columns: bool = True):
    """:func:`loss_sums` of ``hidden`` [..., D] through the LM head ``head`` [D, V] against shifted
    ``targets`` [...].

    With suppressed image tokens and ``text_columns`` their columns are left out of the matmul instead
    of set to the fp32 min afterwards: exp of the fp32 min is 0 in the logsumexp and no gradient
    reaches them either way, so the numbers are those of :func:`head_logits` + :func:`loss_sums` (a
    target that is an image token still scores the fp32 min), for 1/8 fewer head FLOPs (Chameleon's
    8192 of 65536) and no [.., V] select in the forward and backward pass (a CPU train step ~5%
    faster). ``text_columns=False`` (:func:`text_columns_ok`): the full head and the select.
    """
    runs = _text_runs(config) if suppress_image_tokens and text_columns else [(0, config.vocab_size)]
    if isinstance(head, QArray) or runs == [(0, config.vocab_size)]:
        return _target_sums(head_logits(config, hidden, head, suppress_image_tokens), targets)
    w = jnp.concatenate([head[:, a:b] for a, b in runs], axis=1) if len(runs) > 1 else head[:, runs[0][0]:runs[0][1]]
    logits = matmul_2d(hidden if hidden.dtype == w.dtype else hidden.astype(w.dtype), w, 1, jnp.float32)
    column = np.full((config.vocab_size,), -1, np.int32)
    column[np.concatenate([np.arange(a, b) for a, b in runs])] = np.arange(w.shape[1])
    return _target_sums(logits, targets, column)


def chunked_loss_sums(config, hidden, head, labels, chunk: int, suppress_image_tokens: bool = True,
                      text_columns: bool = True):
    """:func:`loss_sums` from final hidden states, the LM head applied ``chunk`` positions at a time.

    hidden [B, T, D]; head [D, V]; labels [B, T] unshifted. The [B, chunk, V] fp32 logits of one
    chunk exist at a time, in the forward pass and (recomputed under ``jax.checkpoint``) in the
    backward pass, instead of [B, T, V]. T need not divide by ``chunk`` (the tail is padded).
    """
    if chunk < 1:
        raise ChameleonError(f"loss_chunk: expected an integer >= 1, got {chunk!r}")
    targets = shifted_targets(labels)
    b, t, d = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, chunk, D]
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, tg):
        return head_sums(config, h, head, tg, suppress_image_tokens, text_columns)

    def body(carry, xs):
        nll, z, count = one(*xs)
        return (carry[0] + nll, carry[1] + z, carry[2] + count), None

    init = (jnp.float32(0), jnp.float32(0), jnp.int32(0))
    (nll, z, count), _ = jax.lax.scan(body, init, (hs, ts))
    return nll, z, count


def forward_loss_sums(module, params, input_ids, labels, attention_mask, positions=None, *,
                      image_targets=False, loss_chunk: int = 0, text_columns: bool = True):
    """Forward over image-merged ``input_ids`` with already resolved labels -> loss_sums.

    ``loss_chunk`` > 0: the LM head and loss run over sequence chunks of that many positions
    (:func:`chunked_loss_sums`), so the whole [B, T, V] logits never exist; 0: one pass.
    """
    if positions is None:
        positions = default_positions(attention_mask)
    mask = causal_mask(attention_mask)
    module = module.causal()  # the mask is causal_mask's
    variables = {"params": params}
    hidden, _ = module.apply(variables, input_ids, positions, mask, method=Chameleon.hidden_states)
    head = module.apply(variables, method=Chameleon.head_weight)
    if loss_chunk:
        return chunked_loss_sums(module.config, hidden, head, labels, loss_chunk, not image_targets, text_columns)
    return head_sums(module.config, hidden, head, shifted_targets(labels), not image_targets, text_columns)


def model_loss(module, params, input_ids, labels, attention_mask, positions=None, pixel_values=None, *,
               loss_mask=None, loss_on: str = "all", image_targets: bool = False, z_loss: float = 0.0,
               loss_chunk: int = 0, text_columns: bool = True):
    """Mean loss over non-ignored tokens (+ ``z_loss * mean(logsumexp^2)``), and its parts.

    ``input_ids`` hold ``<image>`` placeholders; ``pixel_values`` (with ``params`` holding the
    VQ-VAE) become the image tokens, under stop_gradient. ``loss_mask`` [B, T]: 0 drops that label.
    ``loss_chunk`` > 0 computes the head and loss over sequence chunks (same value, less memory).
    Returns (loss, {"nll": mean CE, "z": mean lse^2, "count": targets}). Traceable (jit / grad).
    """
    merged = input_ids
    if pixel_values is not None:
        image_ids = module.apply({"params": params}, pixel_values, method=Chameleon.image_tokens)
        image_ids = jax.lax.stop_gradient(image_ids)
        merged = module.apply({"params": params}, input_ids, image_ids, method=Chameleon.merge_image_tokens)
    labels = resolve_labels(labels, merged, module.config, image_targets=image_targets, loss_on=loss_on)
    if loss_mask is not None:
        labels = jnp.where(loss_mask > 0, labels, IGNORE_INDEX)
    nll, z, count = forward_loss_sums(module, params, merged, labels, attention_mask, positions,
                                      image_targets=image_targets, loss_chunk=loss_chunk,
                                      text_columns=text_columns)
    n = jnp.maximum(count, 1).astype(jnp.float32)
    return (nll + z_loss * z) / n, {"nll": nll / n, "z": z / n, "count": count}

