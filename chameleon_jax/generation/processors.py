"""Logits processors and token choice for the decode loop, and the generate call's settings.

Token choice = composable pure functions on fp32 logits [B, V], applied in transformers' order:
repetition penalty, min-new-tokens EOS suppression, then (sampling only) temperature, top-k,
top-p, and a categorical draw. None of them can produce NaN: temperature subtracts the row max
before dividing, filters always keep the top token, and a row left with no finite logit falls
back to the argmax of its unfiltered logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ChameleonConfig
from ..errors import ChameleonError
from ..model.layers import argmax_rows

Array = jax.Array

# ---------------------------------------------------------------------------------- logits processors


def _finite_max(logits: Array) -> Array:
    """Row max over finite entries, 0 for a row with none. [B, V] -> [B, 1]."""
    m = jnp.max(jnp.where(jnp.isfinite(logits), logits, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def safe_softmax(logits: Array) -> Array:
    """Softmax over the last axis that maps a row of all -inf to all zeros instead of NaN."""
    z = jnp.exp(logits - _finite_max(logits))
    total = jnp.sum(z, axis=-1, keepdims=True)
    return z / jnp.where(total > 0, total, 1.0)


def apply_repetition_penalty(logits: Array, seen: Array, penalty) -> Array:
    """transformers' RepetitionPenaltyLogitsProcessor: for every token already in the sequence,
    negative logits are multiplied by ``penalty`` and the others divided by it. seen: [B, V] bool."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def suppress_tokens(logits: Array, token_ids: Array, active) -> Array:
    """-inf at ``token_ids`` (ids >= V are ignored) where ``active`` ([] or [B] bool) holds.

    With the EOS ids this is transformers' MinNewTokensLengthLogitsProcessor."""
    hit = jnp.zeros(logits.shape[-1], bool).at[token_ids].set(True, mode="drop")
    return jnp.where(hit & jnp.reshape(active, (-1, 1)), -jnp.inf, logits)


def apply_temperature(logits: Array, temperature) -> Array:
    """logits / temperature, shifted so each row's max is 0 first.

    The shift leaves the distribution unchanged and keeps a tiny temperature from overflowing:
    the top token stays at 0 and the rest go to large negatives or -inf, never to +inf or NaN."""
    return (logits - _finite_max(logits)) / temperature


def _float_keys(x: Array) -> Array:
    """float32 -> uint32 with the same order (positive: sign bit set; negative: all bits flipped)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(b >> 31 == 0, b | jnp.uint32(0x80000000), ~b)


def _key_floats(k: Array) -> Array:
    return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


def _last_true(ok, shape) -> Array:
    """Per row, the largest float32 v in [-inf, inf] with ``ok(v)`` true, for ``ok`` [B, 1] -> [B, 1] bool
    monotone (true up to some value, false past it) and true at -inf: an exact bisection over the 2^32
    float keys, 32 rounds of one fused pass over the row each (instead of a sort of the whole row)."""
    lo = jnp.broadcast_to(_float_keys(jnp.float32(-jnp.inf)), shape)
    hi = jnp.broadcast_to(_float_keys(jnp.float32(jnp.inf)), shape)

    def body(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2  # > lo while lo < hi; no overflow: hi - lo < 2^32 - 1
        good = ok(_key_floats(mid)) & (lo < hi)
        return jnp.where(good, mid, lo), jnp.where(good | (lo >= hi), hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return _key_floats(lo)


def apply_top_k(logits: Array, k: int) -> Array:
    """Keep the ``k`` largest logits of each row (ties with the k-th kept), -inf elsewhere.

    The k-th largest value is the largest v with at least k logits >= v (exact, found by bisection:
    XLA:CPU's top_k over 57344 logits took 14 ms at batch 1, 130 ms at batch 8)."""
    k = min(int(k), logits.shape[-1])
    kth = _last_true(lambda v: jnp.sum(logits >= v, axis=-1, keepdims=True) >= k, logits.shape[:-1] + (1,))
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_threshold(logits: Array, top_p) -> Array:
    """Smallest logit kept by nucleus filtering. [B, V] -> [B, 1].

    As transformers' TopPLogitsWarper: a token is kept while the probability mass of the tokens
    above it is below ``top_p``; the top token is always kept (so top_p=0 is greedy). Tokens tied
    with the last kept one are kept too (transformers keeps one of them, as its sort orders
    them), so the result does not depend on sort order. The mass strictly above v only falls as v
    grows, so the threshold is the smallest v where it is below top_p: found by bisection (a sort of
    57344 logits took 18 ms at batch 1 and 130 ms at batch 8 on XLA:CPU), then capped at the row max."""
    probs = safe_softmax(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)
    # the largest v whose mass strictly above reaches top_p; the threshold is the next logit above it
    full = _last_true(lambda v: jnp.sum(jnp.where(logits > v, probs, 0.0), axis=-1, keepdims=True) >= top_p,
                      top.shape)
    above = jnp.min(jnp.where(logits > full, logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.minimum(above, top)


def apply_top_p(logits: Array, top_p) -> Array:
    """Nucleus filtering (:func:`top_p_threshold`): -inf below the threshold."""
    return jnp.where(logits < top_p_threshold(logits, top_p), -jnp.inf, logits)


def sample_from_logits(logits: Array, keys: Array, fallback: Array) -> Array:
    """One categorical draw per row (keys: [B] typed PRNG keys); rows with no finite logit take
    ``fallback`` [B] instead."""
    logits = jnp.where(jnp.isnan(logits), -jnp.inf, logits)
    # jax.random.categorical's own Gumbel-max draw (the same noise, so the same tokens) with its argmax
    # blocked (argmax_rows): a sampled token choice over 57344 logits (temperature only) 3.9 -> 0.9 ms at
    # batch 1, 9.9 -> 3.2 ms at batch 8 on XLA:CPU
    noise = jax.vmap(lambda k: jax.random.gumbel(k, logits.shape[1:], logits.dtype))(keys)
    drawn = argmax_rows(noise + logits)
    ok = jnp.any(jnp.isfinite(logits), axis=-1)
    return jnp.where(ok, drawn, fallback).astype(jnp.int32)


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Mode:
    """The compile-time part of the sampling settings (part of the jit cache key)."""

    do_sample: bool = False
    top_k: int = 0
    use_top_p: bool = False
    use_penalty: bool = False


@dataclass(frozen=True)
class GenerationSettings:
    """Everything a generate call takes besides the batch. ``validate`` raises ChameleonError."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def validate(self, config: ChameleonConfig, prompt_length: int) -> "GenerationSettings":
        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

        def num(name):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
                raise ChameleonError(f"{name}: expected a finite number, got {v!r}")
            if not np.isfinite(v):
                raise ChameleonError(f"{name}: expected a finite number, got {v!r}")
            return float(v)

        n = self.max_new_tokens
        if not is_int(n) or n < 1:
            raise ChameleonError(f"max_new_tokens: expected an integer >= 1, got {n!r}")
        # Dynamic NTK RoPE exists to run past max_position_embeddings; the other kinds may not.
        if prompt_length + n > config.max_position_embeddings and config.rope_type != "dynamic":
            raise ChameleonError(
                f"max_new_tokens: prompt length {prompt_length} + max_new_tokens {n} = {prompt_length + n} "
                f"exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ChameleonError(f"min_new_tokens: expected an integer >= 0, got {self.min_new_tokens!r}")
        temperature, top_p, penalty = num("temperature"), num("top_p"), num("repetition_penalty")
        if temperature < 0:
            raise ChameleonError(f"temperature: expected >= 0 (0 means greedy), got {temperature}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ChameleonError(f"top_k: expected an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 <= top_p <= 1.0:
            raise ChameleonError(f"top_p: expected a value in [0, 1] (1 disables it), got {top_p}")
        if penalty <= 0:
            raise ChameleonError(f"repetition_penalty: expected > 0 (1 disables it), got {penalty}")
        if not is_int(self.seed):
            raise ChameleonError(f"seed: expected an integer, got {self.seed!r}")
        for t in self.stop_token_ids:
            if not is_int(t) or not 0 <= t < config.vocab_size:
                raise ChameleonError(
                    f"stop_token_ids: each id must be an integer in [0, {config.vocab_size}), got {t!r}")
        return dataclasses.replace(
            self, max_new_tokens=int(n), temperature=temperature, top_p=top_p, repetition_penalty=penalty,
            top_k=int(self.top_k), seed=int(self.seed), min_new_tokens=int(self.min_new_tokens),
            stop_token_ids=tuple(int(t) for t in self.stop_token_ids),
        )

    def mode(self, vocab_size: int) -> Mode:
        sampling = bool(self.do_sample) and self.temperature > 0
        if not sampling:
            return Mode(use_penalty=self.repetition_penalty != 1.0)
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return Mode(True, top_k, self.top_p < 1.0, self.repetition_penalty != 1.0)


def choose_tokens(logits: Array, mode: Mode, knobs: dict, step: Array, seen: Array | None) -> Array:
    """Logits [B, V] fp32 of the current step -> next tokens [B] int32 (before EOS bookkeeping)."""
    logits = jnp.where(jnp.isnan(logits), -jnp.inf, logits)  # a NaN is never chosen (argmax would)
    if mode.use_penalty:
        logits = apply_repetition_penalty(logits, seen, knobs["penalty"])
    logits = suppress_tokens(logits, knobs["stop_ids"], step < knobs["min_new"])
    greedy = argmax_rows(logits)
    if not mode.do_sample:
        return greedy
    logits = apply_temperature(logits, knobs["temperature"])
    if mode.top_k:
        logits = apply_top_k(logits, mode.top_k)
    if mode.use_top_p:
        logits = apply_top_p(logits, knobs["top_p"])
    base = jax.random.key(knobs["seed"])
    rows = jnp.arange(logits.shape[0], dtype=jnp.uint32)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(rows)
    return sample_from_logits(logits, keys, greedy)


