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
from .decoder import Chameleon, causal_mask, default_positions, head_logits

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


def _target_sums(logits, targets):
    valid = targets != IGNORE_INDEX
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - picked, 0.0)
    z = jnp.where(valid, lse * lse, 0.0)
    return nll.sum(), z.sum(), valid.sum()


def chunked_loss_sums(config, hidden, head, labels, chunk: int, suppress_image_tokens: bool = True):
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
        return _target_sums(head_logits(config, h, head, suppress_image_tokens), tg)

    def body(carry, xs):
        nll, z, count = one(*xs)
        return (carry[0] + nll, carry[1] + z, carry[2] + count), None

    init = (jnp.float32(0), jnp.float32(0), jnp.int32(0))
    (nll, z, count), _ = jax.lax.scan(body, init, (hs, ts))
    return nll, z, count


def forward_loss_sums(module, params, input_ids, labels, attention_mask, positions=None, *,
                      image_targets=False, loss_chunk: int = 0):
    """Forward over image-merged ``input_ids`` with already resolved labels -> loss_sums.

    ``loss_chunk`` > 0: the LM head and loss run over sequence chunks of that many positions
    (:func:`chunked_loss_sums`), so the whole [B, T, V] logits never exist; 0: one pass.
    """
    if positions is None:
        positions = default_positions(attention_mask)
    mask = causal_mask(attention_mask)
    if loss_chunk:
        variables = {"params": params}
        hidden, _ = module.apply(variables, input_ids, positions, mask, method=Chameleon.hidden_states)
        head = module.apply(variables, method=Chameleon.head_weight)
        return chunked_loss_sums(module.config, hidden, head, labels, loss_chunk, not image_targets)
    logits, _ = module.apply(
        {"params": params}, input_ids, positions, mask,
        suppress_image_tokens=not image_targets,
    )
    return loss_sums(logits, labels)


def model_loss(module, params, input_ids, labels, attention_mask, positions=None, pixel_values=None, *,
               loss_mask=None, loss_on: str = "all", image_targets: bool = False, z_loss: float = 0.0,
               loss_chunk: int = 0):
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
                                      image_targets=image_targets, loss_chunk=loss_chunk)
    n = jnp.maximum(count, 1).astype(jnp.float32)
    return (nll + z_loss * z) / n, {"nll": nll / n, "z": z / n, "count": count}

