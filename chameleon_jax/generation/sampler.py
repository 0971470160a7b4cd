"""Jitted generation: one prefill of the left-padded batch, then an on-device decode loop.

Shapes: B prompts, R = B * streams cache rows, T prompt length (after bucketing), S cache slots,
N new tokens, V vocab (of the head in use).

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

Logits come from a :class:`VocabHead`, computed for the last position only: in text mode the LM
head over text tokens only (image tokens, which text mode suppresses anyway, are left out of the
matmul); in image mode over the image tokens only (image mode allows nothing else).

Image mode (:mod:`.image`) runs the same loop with up to three cache rows ("streams") per prompt
for Meta's classifier-free guidance; the rows of a prompt are adjacent ([B, streams] order), so a
batch sharded over devices keeps a prompt's streams on one device.

Token choice: :mod:`.processors`. The loop state is described in docs/design.md ("The decode
loop").
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ChameleonConfig
from ..model import Chameleon, cache_mask, causal_mask, default_positions, init_cache
from ..errors import ChameleonError
from .heads import VocabHead, guide
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


# ---------------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class Plan:
    """Static shapes and rules of one generate call (part of the jit cache key)."""

    batch: int  # prompts
    prompt_bucket: int
    cache_length: int
    max_new_tokens: int
    mode: Mode
    modality: str = "text"  # "text": stop tokens, text head; "image": exactly max_new_tokens image tokens
    streams: int = 1  # cache rows per prompt (3: image mode with guidance)

    @property
    def rows(self) -> int:
        return self.batch * self.streams


class Generator:
    """Jitted prefill and decode loop for one model; compiled programs are cached by jax.jit on
    the :class:`Plan` and the presence of images.

    ``traces`` counts how often each function was traced (= compiled): tests use it.
    ``put`` places the padded batch arrays (e.g. on a mesh); ``head_chunks``: see :class:`VocabHead`.
    """

    def __init__(self, module: Chameleon, config: ChameleonConfig, put=None, head_chunks: int = 2):
        self.module = module
        self.config = config
        self.head_chunks = head_chunks
        self.heads: dict[str, VocabHead] = {}
        self._put = put or (lambda *arrays: arrays)
        self.traces = collections.Counter()
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("plan",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("plan",), donate_argnames=("state",))

    def head(self, modality: str) -> VocabHead:
        if modality not in self.heads:
            self.heads[modality] = (VocabHead.text(self.config, self.head_chunks) if modality == "text"
                                    else VocabHead.image(self.config))
        return self.heads[modality]

    # ---------------------------------------------------------------- host side
    def plan(self, batch: int, prompt_length: int, settings: GenerationSettings, modality: str = "text",
             streams: int = 1) -> Plan:
        bucket = bucket_length(prompt_length)
        return Plan(batch, bucket, bucket_length(bucket + settings.max_new_tokens), settings.max_new_tokens,
                    settings.mode(self.head(modality).size), modality, streams)

    def knobs(self, settings: GenerationSettings, modality: str = "text",
              guidance: tuple[float, float] = (1.0, 1.0)) -> dict:
        """The run-time values (jit arguments, so new values never recompile)."""
        c = self.config
        head = self.head(modality)
        stop = sorted(set(c.eos_token_ids) | set(settings.stop_token_ids)) if modality == "text" else []
        # in compact ids; ids outside the head (compact id = size) can never be produced, so they drop out
        stop = sorted({int(head.to_compact[t]) for t in stop} - {head.size})
        width = max(_STOP_SLOTS, -(-len(stop) // _STOP_SLOTS) * _STOP_SLOTS)
        stop_ids = np.full((width,), head.size, np.int32)  # size = no token (dropped / never equal)
        stop_ids[: len(stop)] = stop
        return {
            "temperature": np.float32(settings.temperature if settings.temperature > 0 else 1.0),
            "top_p": np.float32(settings.top_p),
            "penalty": np.float32(settings.repetition_penalty),
            "seed": np.uint32(settings.seed % 2**32),
            "min_new": np.int32(settings.min_new_tokens),
            "stop_ids": stop_ids,  # compact ids
            "pad": np.int32(self.pad_token_id()),
            "cfg_text": np.float32(guidance[0]),
            "cfg_image": np.float32(guidance[1]),
        }

    def pad_token_id(self) -> int:
        c = self.config
        if c.pad_token_id is not None:
            return int(c.pad_token_id)
        return int(c.eos_token_ids[0]) if c.eos_token_ids else 0  # transformers' fallback

    def pad_prompt(self, ids: np.ndarray, mask: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad [R, T] ids / mask to [R, bucket] (pad id, mask 0)."""
        extra = bucket - ids.shape[1]
        if extra == 0:
            return ids, mask
        ids = np.concatenate([np.full((ids.shape[0], extra), self.pad_token_id(), np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((mask.shape[0], extra), np.int32), mask], axis=1)
        return ids, mask

    def start(self, params, ids, mask, pixels, settings: GenerationSettings, *, modality: str = "text",
              streams: int = 1, image_order=None, guidance=(1.0, 1.0)):
        """Prefill. ids, mask: [R, T] int32 (checked, left-padded; R = prompts * streams);
        ``image_order`` [M] int32: the image (index into ``pixels``) each run of placeholders takes,
        in order (default: each image once, in order). Returns (plan, knobs, state)."""
        plan = self.plan(ids.shape[0] // streams, ids.shape[1], settings, modality, streams)
        knobs = self.knobs(settings, modality, guidance)
        ids, mask = self.pad_prompt(ids, mask, plan.prompt_bucket)
        if pixels is not None and image_order is None:
            image_order = np.arange(pixels.shape[0], dtype=np.int32)
        ids, mask, pixels = self._put(ids, mask, pixels)
        order = None if image_order is None else np.asarray(image_order, np.int32)
        state = self._prefill(params, self.head(modality).weights(params), ids, mask, pixels, order, knobs,
                              plan=plan)
        return plan, knobs, state

    def run(self, params, state, knobs, plan: Plan, limit: int):
        """Decode until ``limit`` tokens exist per prompt (or every prompt stopped)."""
        return self._decode(params, self.head(plan.modality).weights(params), state, knobs, np.int32(limit),
                            plan=plan)

    def generate(self, params, ids, mask, pixels, settings: GenerationSettings, **kw) -> np.ndarray:
        plan, knobs, state = self.start(params, ids, mask, pixels, settings, **kw)
        state = self.run(params, state, knobs, plan, plan.max_new_tokens)
        tokens, bad = jax.device_get((state["tokens"], state["nonfinite"]))
        check_finite(bad)
        return np.asarray(tokens)

    def stream(self, params, ids, mask, pixels, settings: GenerationSettings,
               chunk: int, **kw) -> Iterator[np.ndarray]:
        """Yields [B, n] token chunks: the first token alone (right after prefill), then up to
        ``chunk`` tokens at a time, until every prompt stopped or max_new_tokens are out."""
        plan, knobs, state = self.start(params, ids, mask, pixels, settings, **kw)
        emitted = 0
        while True:
            step, done, bad, tokens = jax.device_get(
                (state["step"], state["done"], state["nonfinite"], state["tokens"][:, emitted:]))
            check_finite(bad)
            step = int(step)
            if step > emitted:
                yield np.asarray(tokens[:, : step - emitted])
                emitted = step
            if step >= plan.max_new_tokens or bool(np.all(done)):
                return
            state = self.run(params, state, knobs, plan, min(step + chunk, plan.max_new_tokens))

    def next_logits(self, params, ids, mask, pixels, *, modality: str = "text", streams: int = 1,
                    image_order=None, guidance=(1.0, 1.0)) -> np.ndarray:
        """The first step's logits over the head's tokens after guidance, [B, Vh] float32 numpy:
        what the loop's first token is chosen from (before temperature and filtering). For tests
        and research; runs the whole prompt without a cache."""
        if pixels is not None and image_order is None:
            image_order = np.arange(pixels.shape[0], dtype=np.int32)
        if "_next" not in self.__dict__:
            self._next = jax.jit(self._next_impl, static_argnames=("modality", "streams"))
        head = self.head(modality)
        ids, mask, pixels = self._put(ids, mask, pixels)
        out = self._next(params, head.weights(params), ids, mask, pixels,
                         None if image_order is None else np.asarray(image_order, np.int32),
                         np.float32(guidance[0]), np.float32(guidance[1]), modality=modality, streams=streams)
        return np.asarray(jax.device_get(out))

    def _next_impl(self, params, blocks, ids, mask, pixels, image_order, s_text, s_image, *, modality, streams):
        ids = self._merge_images(params, ids, pixels, image_order)
        logits, _ = self._forward(params, blocks, ids, default_positions(mask), causal_mask(mask), None, None,
                                  modality, causal=True)
        return guide(logits, streams, s_text, s_image)

    def _merge_images(self, params, ids, pixels, image_order):
        if pixels is None:
            return ids
        image_ids = self.module.apply({"params": params}, pixels, method=Chameleon.image_tokens)
        return self.module.apply({"params": params}, ids, image_ids[image_order], method=Chameleon.merge_image_tokens)

    # ---------------------------------------------------------------- device side
    def _forward(self, params, blocks, ids, positions, mask, cache, index, modality, causal=False):
        """The model on [R, T] tokens -> (logits of the last position [R, Vh] fp32, cache). ``causal``: the
        queries sit at slots 0..T-1 under a causal mask (a prefill, a whole-prompt forward), so attention
        may skip each query block's later keys (``Chameleon.causal_block``); never for a decode step."""
        module = self.module.causal() if causal else self.module
        hidden, cache = module.apply({"params": params}, ids, positions, mask, None, cache, index, ids.shape[1] > 1,
                                     method=Chameleon.hidden_states)
        return self.head(modality)(hidden[:, -1], blocks), cache

    def _choose(self, logits, plan: Plan, knobs, step, seen):
        """Head logits [R, Vh] -> (compact token per prompt [B], non-finite flag per prompt [B])."""
        bad = ~jnp.all(jnp.isfinite(logits).reshape(plan.batch, -1), axis=-1)
        logits = guide(logits, plan.streams, knobs["cfg_text"], knobs["cfg_image"])
        return choose_tokens(logits, plan.mode, knobs, step, seen), bad

    def _prefill_impl(self, params, blocks, ids, mask, pixels, image_order, knobs, *, plan: Plan):
        self.traces["prefill"] += 1
        r, t = ids.shape
        b, s = plan.batch, plan.cache_length
        head = self.head(plan.modality)
        ids = self._merge_images(params, ids, pixels, image_order)
        cache = init_cache(self.config, r, s, stacked=self.module.scan_layers)
        kv_valid = jnp.zeros((r, s), bool).at[:, :t].set(mask > 0)
        logits, cache = self._forward(params, blocks, ids, default_positions(mask),
                                      cache_mask(kv_valid, 0, t), cache, 0, plan.modality, causal=True)
        seen = None
        if plan.mode.use_penalty:
            # transformers' generate skips each row's left padding (RepetitionPenaltyLogitsProcessor's
            # prompt_ignore_length = the padding length), so only real tokens count as seen.
            counted = jnp.cumsum(mask, axis=1) > 0
            compact = jnp.where(counted, jnp.asarray(head.to_compact)[ids], head.size)
            rows = jnp.broadcast_to(jnp.arange(r)[:, None], ids.shape)
            seen = jnp.zeros((r, head.size + 1), bool).at[rows, compact].set(True)[:, :-1]
            seen = seen.reshape(b, plan.streams, -1)[:, 0]
        tok, bad = self._choose(logits, plan, knobs, jnp.int32(0), seen)
        token_ids = jnp.asarray(head.token_ids)[tok]
        tokens = jnp.full((b, plan.max_new_tokens), knobs["pad"], jnp.int32).at[:, 0].set(token_ids)
        state = {
            # per cache row [R, ...]
            "cache": cache,
            "kv_valid": kv_valid,
            "last": jnp.repeat(token_ids, plan.streams),  # the token fed next
            "positions": jnp.sum(mask, axis=1).astype(jnp.int32),  # its position
            # per prompt [B, ...]
            "tokens": tokens,
            "done": self._stopped(tok, knobs, plan) | bad,
            "nonfinite": jnp.where(bad, 0, -1).astype(jnp.int32),  # first step with non-finite logits
            # shared
            "slot": jnp.int32(t),  # cache slot of the token fed next (one for all rows)
            "step": jnp.int32(1),  # tokens generated so far
        }
        if seen is not None:
            state["seen"] = seen.at[jnp.arange(b), tok].set(True)
        return state

    @staticmethod
    def _stopped(tok, knobs, plan: Plan):
        if plan.modality != "text":
            return jnp.zeros(tok.shape, bool)  # image mode: exactly max_new_tokens tokens
        return jnp.isin(tok, knobs["stop_ids"])

    def _decode_impl(self, params, blocks, state, knobs, limit, *, plan: Plan):
        self.traces["decode"] += 1
        r, b = plan.rows, plan.batch
        token_table = jnp.asarray(self.head(plan.modality).token_ids)

        def cond(st):
            return (st["step"] < limit) & ~jnp.all(st["done"]) & ~jnp.any(st["nonfinite"] >= 0)

        def body(st):
            slot, step = st["slot"], st["step"]
            kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], jnp.ones((r, 1), bool), (0, slot))
            logits, cache = self._forward(params, blocks, st["last"][:, None], st["positions"][:, None],
                                          cache_mask(kv_valid, slot, 1), st["cache"], slot, plan.modality)
            tok, bad = self._choose(logits, plan, knobs, step, st.get("seen"))
            token_ids = jnp.where(st["done"], knobs["pad"], token_table[tok])
            new = dict(
                st,
                cache=cache,
                kv_valid=kv_valid,
                tokens=jax.lax.dynamic_update_slice(st["tokens"], token_ids[:, None], (0, step)),
                last=jnp.repeat(token_ids, plan.streams),
                done=st["done"] | self._stopped(tok, knobs, plan) | bad,
                nonfinite=jnp.where((st["nonfinite"] < 0) & bad, step, st["nonfinite"]),
                positions=st["positions"] + 1,
                slot=slot + 1,
                step=step + 1,
            )
            if "seen" in st:
                new["seen"] = st["seen"].at[jnp.arange(b), tok].set(True)
            return new

        return jax.lax.while_loop(cond, body, state)


def check_finite(nonfinite) -> None:
    """Raise ChameleonError when any prompt met non-finite logits (``nonfinite`` [B]: first step or -1)."""
    nonfinite = np.asarray(nonfinite)
    rows = np.flatnonzero(nonfinite >= 0)
    if rows.size:
        step = int(nonfinite[rows].min())
        raise ChameleonError(
            f"generation: the model produced non-finite logits (NaN or inf) at step {step} for row(s) "
            f"{rows.tolist()}; the checkpoint's weights or the inputs hold NaN/inf (check them with "
            "jax.tree.map(lambda x: bool(jnp.isfinite(x).all()), model.params))")
