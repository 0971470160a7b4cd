"""Jitted text generation: one prefill of the left-padded batch, then an on-device decode loop.

Shapes: B batch, T prompt length (after bucketing), S cache slots, N new tokens, V vocab.

How a call runs
  1. The host left-pads the prompt to a length bucket (:func:`bucket_length`) so prompts of
     nearby lengths share one compiled program, and sizes the KV cache to
     ``bucket_length(T + max_new_tokens)`` slots.
  2. ``prefill`` (jitted) encodes any images, runs the whole prompt once, fills cache slots
     [0, T), and picks the first new token from the last position's logits only.
  3. ``decode`` (jitted, state donated so the cache is updated in place) runs a
     ``lax.while_loop`` of one-token steps until every row has emitted a stop token or the
     step limit is reached. Nothing returns to the host per token. Streaming calls the same
     compiled ``decode`` with a nearer step limit, once per chunk.

Positions follow transformers' generate: a row's tokens are numbered from its first real token
(``cumsum(mask) - 1``), so left padding changes nothing.

Logits come from :class:`TextHead`: the LM head over text tokens only (image tokens, which
text mode suppresses anyway, are left out of the matmul), computed for the last position only.

Token choice: :mod:`.processors`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ChameleonConfig
from ..model import Chameleon, cache_mask, default_positions, init_cache
from .processors import GenerationSettings, Mode, choose_tokens

Array = jax.Array
_STOP_SLOTS = 8  # stop-token ids are padded to a multiple of this, so adding one rarely recompiles

# ---------------------------------------------------------------------------------- buckets


def bucket_length(n: int, minimum: int = 16) -> int:
    """The padded length used for ``n`` tokens: four buckets per power of two.

    ``n`` rounds up to a multiple of ``max(8, 2**(bit_length(n - 1) - 3))``: 16, 24, ..., 64,
    80, 96, 112, 128, 160, ..., 256, 320, ..., 1024, 1280, ... Past 32 tokens padding wastes under
    25% of the prefill (powers of two waste up to 50%), and a prompt length up to 4096 falls in
    one of about 30 buckets.
    """
    n = max(int(n), minimum)
    step = max(8, 1 << max((n - 1).bit_length() - 3, 0))
    return -(-n // step) * step


# ---------------------------------------------------------------------------------- LM head


class TextHead:
    """The LM head restricted to text tokens, laid out for fast decoding.

    In text mode the model sets every image-token logit to the float32 minimum, so those tokens
    have probability exactly 0 and are never chosen, greedy or sampled, under any processor here.
    Leaving their columns out of the matmul is therefore exact and reads 1/8 fewer bytes (8192 of
    65536 ids in Chameleon's vocabulary). Token choice works on "compact" ids 0..Vt-1;
    ``text_ids`` maps them back.

    The text rows are gathered once per params into ``chunks`` blocks of [Vt/chunks, D] (the
    transposed layout of HF's [D, V] lm_head). On the 2-core CPU benchmark (benchmarks/decode.py)
    this was as fast as [D, V] at batch 1 and faster at batch 8, where XLA:CPU's library path
    for a [8, D] x [D, 65536] product was erratic. The copy costs the memory of the LM head's
    text columns (about 3% of a 7B model) for as long as the generator lives; a new params tree
    replaces it.
    """

    def __init__(self, config: ChameleonConfig, chunks: int = 2):
        v = config.vocab_size
        is_text = np.ones(v, bool)
        image = np.asarray(config.image_vocab.image_token_ids)
        is_text[image[image < v]] = False
        self.config = config
        self.chunks = max(1, int(chunks))
        self.text_ids = np.flatnonzero(is_text).astype(np.int32)  # compact id -> token id
        self.size = int(self.text_ids.size)
        self.to_compact = np.full(v, self.size, np.int32)  # token id -> compact id (image ids -> size)
        self.to_compact[self.text_ids] = np.arange(self.size, dtype=np.int32)
        self._weights = None  # (the lm_head leaf it was built from, the blocks)
        self._build = jax.jit(self._blocks)

    def _blocks(self, params):
        c = self.config
        ids = jnp.asarray(self.text_ids)
        if c.tie_word_embeddings:
            w = jnp.take(params["embed_tokens"]["embedding"], ids, axis=0)  # [Vt, D]
        else:
            w = jnp.take(params["lm_head"], ids, axis=1).T  # [Vt, D]
        w = w.astype(jnp.dtype(c.dtype))
        rows = -(-self.size // self.chunks)
        w = jnp.pad(w, ((0, rows * self.chunks - self.size), (0, 0)))
        return tuple(w[i * rows : (i + 1) * rows] for i in range(self.chunks))

    def weights(self, params) -> tuple:
        """The row blocks for ``params``, built on first use and kept while ``params`` is used."""
        leaf = params["embed_tokens"]["embedding"] if self.config.tie_word_embeddings else params["lm_head"]
        if self._weights is None or self._weights[0] is not leaf:
            self._weights = None  # free the old copy before making the new one
            self._weights = (leaf, self._build(params))
        return self._weights[1]

    def __call__(self, x: Array, blocks) -> Array:
        """Hidden states [B, D] -> text logits [B, Vt] fp32."""
        dt = jnp.dtype(self.config.dtype)
        x = x.astype(dt)
        parts = [jnp.einsum("bd,vd->bv", x, w, preferred_element_type=jnp.float32) for w in blocks]
        return jnp.concatenate(parts, axis=-1)[:, : self.size]


# ---------------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class Plan:
    """Static shapes of one generate call."""

    batch: int
    prompt_bucket: int
    cache_length: int
    max_new_tokens: int
    mode: Mode


class Generator:
    """Jitted prefill and decode loop for one model; compiled programs are cached by jax.jit on
    (batch, prompt bucket, cache length, max_new_tokens, images, mode).

    ``traces`` counts how often each function was traced (= compiled): tests use it.
    ``put`` places the padded batch arrays (e.g. on a mesh); ``head_chunks``: see :class:`TextHead`.
    """

    def __init__(self, module: Chameleon, config: ChameleonConfig, put=None, head_chunks: int = 2):
        self.module = module
        self.config = config
        self.head = TextHead(config, head_chunks)
        self._put = put or (lambda *arrays: arrays)
        self.traces = collections.Counter()
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("plan",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("plan",), donate_argnames=("state",))

    # ---------------------------------------------------------------- host side
    def plan(self, batch: int, prompt_length: int, settings: GenerationSettings) -> Plan:
        bucket = bucket_length(prompt_length)
        return Plan(batch, bucket, bucket_length(bucket + settings.max_new_tokens), settings.max_new_tokens,
                    settings.mode(self.head.size))

    def knobs(self, settings: GenerationSettings) -> dict:
        """The run-time sampling values (jit arguments, so new values never recompile)."""
        c = self.config
        stop = sorted(set(c.eos_token_ids) | set(settings.stop_token_ids))
        # in compact ids; image ids (compact id = size) can never be produced, so they drop out
        stop = sorted({int(self.head.to_compact[t]) for t in stop} - {self.head.size})
        width = max(_STOP_SLOTS, -(-len(stop) // _STOP_SLOTS) * _STOP_SLOTS)
        stop_ids = np.full((width,), self.head.size, np.int32)  # size = no token (dropped / never equal)
        stop_ids[: len(stop)] = stop
        return {
            "temperature": np.float32(settings.temperature if settings.temperature > 0 else 1.0),
            "top_p": np.float32(settings.top_p),
            "penalty": np.float32(settings.repetition_penalty),
            "seed": np.uint32(settings.seed % 2**32),
            "min_new": np.int32(settings.min_new_tokens),
            "stop_ids": stop_ids,  # compact ids
            "pad": np.int32(self.pad_token_id()),
        }

    def pad_token_id(self) -> int:
        c = self.config
        if c.pad_token_id is not None:
            return int(c.pad_token_id)
        return int(c.eos_token_ids[0]) if c.eos_token_ids else 0  # transformers' fallback

    def pad_prompt(self, ids: np.ndarray, mask: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad [B, T] ids / mask to [B, bucket] (pad id, mask 0)."""
        extra = bucket - ids.shape[1]
        if extra == 0:
            return ids, mask
        ids = np.concatenate([np.full((ids.shape[0], extra), self.pad_token_id(), np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((mask.shape[0], extra), np.int32), mask], axis=1)
        return ids, mask

    def start(self, params, ids, mask, pixels, settings: GenerationSettings):
        """Prefill. ids, mask: [B, T] int32 (checked, left-padded); returns (plan, knobs, state)."""
        plan = self.plan(ids.shape[0], ids.shape[1], settings)
        ids, mask = self.pad_prompt(ids, mask, plan.prompt_bucket)
        ids, mask, pixels = self._put(ids, mask, pixels)
        knobs = self.knobs(settings)
        state = self._prefill(params, self.head.weights(params), ids, mask, pixels, knobs, plan=plan)
        return plan, knobs, state

    def run(self, params, state, knobs, plan: Plan, limit: int):
        """Decode until ``limit`` tokens exist per row (or every row stopped)."""
        return self._decode(params, self.head.weights(params), state, knobs, np.int32(limit), plan=plan)

    def generate(self, params, ids, mask, pixels, settings: GenerationSettings) -> np.ndarray:
        plan, knobs, state = self.start(params, ids, mask, pixels, settings)
        state = self.run(params, state, knobs, plan, plan.max_new_tokens)
        return np.asarray(state["tokens"])

    def stream(self, params, ids, mask, pixels, settings: GenerationSettings,
               chunk: int) -> Iterator[np.ndarray]:
        """Yields [B, n] token chunks: the first token alone (right after prefill), then up to
        ``chunk`` tokens at a time, until every row stopped or max_new_tokens are out."""
        plan, knobs, state = self.start(params, ids, mask, pixels, settings)
        emitted = 0
        while True:
            step, done, tokens = jax.device_get((state["step"], state["done"], state["tokens"][:, emitted:]))
            step = int(step)
            if step > emitted:
                yield np.asarray(tokens[:, : step - emitted])
                emitted = step
            if step >= plan.max_new_tokens or bool(np.all(done)):
                return
            state = self.run(params, state, knobs, plan, min(step + chunk, plan.max_new_tokens))

    # ---------------------------------------------------------------- device side
    def _forward(self, params, blocks, ids, positions, mask, pixels, cache, index):
        """The model on [B, T] tokens -> (text logits of the last position [B, Vt] fp32, cache)."""
        hidden, cache = self.module.apply({"params": params}, ids, positions, mask, pixels, cache, index,
                                          method=Chameleon.hidden_states)
        return self.head(hidden[:, -1], blocks), cache

    def _prefill_impl(self, params, blocks, ids, mask, pixels, knobs, *, plan: Plan):
        self.traces["prefill"] += 1
        b, t = ids.shape
        s = plan.cache_length
        cache = init_cache(self.config, b, s)
        kv_valid = jnp.zeros((b, s), bool).at[:, :t].set(mask > 0)
        logits, cache = self._forward(params, blocks, ids, default_positions(mask),
                                      cache_mask(kv_valid, 0, t), pixels, cache, 0)
        seen = None
        if plan.mode.use_penalty:
            # transformers ignores the left padding and penalizes every prompt token after it.
            counted = jnp.cumsum(mask, axis=1) > 0
            compact = jnp.where(counted, jnp.asarray(self.head.to_compact)[ids], self.head.size)
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], ids.shape)
            seen = jnp.zeros((b, self.head.size + 1), bool).at[rows, compact].set(True)[:, :-1]
        tok = choose_tokens(logits, plan.mode, knobs, jnp.int32(0), seen)
        token_ids = jnp.asarray(self.head.text_ids)[tok]
        tokens = jnp.full((b, plan.max_new_tokens), knobs["pad"], jnp.int32).at[:, 0].set(token_ids)
        state = {
            "cache": cache,
            "kv_valid": kv_valid,
            "tokens": tokens,
            "last": token_ids,
            "done": jnp.isin(tok, knobs["stop_ids"]),
            "positions": jnp.sum(mask, axis=1).astype(jnp.int32),  # position of the token fed next
            "slot": jnp.int32(t),  # cache slot of the token fed next
            "step": jnp.int32(1),  # tokens generated so far
        }
        if seen is not None:
            state["seen"] = seen.at[jnp.arange(b), tok].set(True)
        return state

    def _decode_impl(self, params, blocks, state, knobs, limit, *, plan: Plan):
        self.traces["decode"] += 1
        b = plan.batch
        text_ids = jnp.asarray(self.head.text_ids)

        def cond(st):
            return (st["step"] < limit) & ~jnp.all(st["done"])

        def body(st):
            slot, step = st["slot"], st["step"]
            kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], jnp.ones((b, 1), bool), (0, slot))
            logits, cache = self._forward(params, blocks, st["last"][:, None], st["positions"][:, None],
                                          cache_mask(kv_valid, slot, 1), None, st["cache"], slot)
            tok = choose_tokens(logits, plan.mode, knobs, step, st.get("seen"))
            token_ids = jnp.where(st["done"], knobs["pad"], text_ids[tok])
            new = dict(
                st,
                cache=cache,
                kv_valid=kv_valid,
                tokens=jax.lax.dynamic_update_slice(st["tokens"], token_ids[:, None], (0, step)),
                last=token_ids,
                done=st["done"] | jnp.isin(tok, knobs["stop_ids"]),
                positions=st["positions"] + 1,
                slot=slot + 1,
                step=step + 1,
            )
            if "seen" in st:
                new["seen"] = st["seen"].at[jnp.arange(b), tok].set(True)
            return new

        return jax.lax.while_loop(cond, body, state)
