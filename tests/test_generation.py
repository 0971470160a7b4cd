"""Generation: greedy parity with transformers' generate, sampling semantics and statistics,
compile caching, NaN safety, streaming and bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import chameleon_jax as cj
from chameleon_jax import ChameleonError
from chameleon_jax.generation.processors import (
    Mode,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax_rows,
    choose_tokens,
    safe_softmax,
    sample_from_logits,
)
from chameleon_jax.generation.sampler import bucket_length
from conftest import build_hf_model, image_placeholders, left_pad, random_pixels, text_ids

PAD, EOS = 3, 2
NEW = 32


def hf_generate(hf, ids, mask, pixels=None, new=NEW, **kw):
    """transformers' new tokens, right-padded with pad to ``new`` columns (it stops when all rows did)."""
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                do_sample=False, pad_token_id=PAD, **kw)
    if pixels is not None:
        args["pixel_values"] = torch.tensor(pixels)
    with torch.no_grad():
        out = hf.generate(**args)[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=PAD)


def batch_of_three(hf_config):
    """Three left-padded prompts of different lengths; the middle one holds an image."""
    with_image = text_ids(4, seed=12) + image_placeholders(hf_config, 1) + text_ids(5, seed=13)[1:]
    rows = [text_ids(9, seed=11), with_image, text_ids(17, seed=14)]
    ids, mask = left_pad(rows)
    return ids, mask, random_pixels(1, seed=15)


def early_stop_token(out, row=0, step=6):
    """A token that ``row`` first emits at ``step``: used as an extra stop id to force an early EOS."""
    for s in range(step, out.shape[1] - 4):
        t = int(out[row, s])
        if t not in out[row, :s] and t not in (EOS, PAD):
            return t, s
    raise AssertionError("no usable stop token in this output")


@pytest.fixture(scope="module")
def mha(tmp_path_factory):
    d = tmp_path_factory.mktemp("mha")
    hf = build_hf_model(d, seed=21)
    return hf, cj.load(d)


# ------------------------------------------------------------------------ parity with transformers


def test_long_prompt_prefill_matches_transformers(mha):
    """A prompt past CAUSAL_BLOCK (the prefill's attention runs per query block against the keys up to
    the block's end; its last layer computes the last position only), left-padded: greedy tokens and
    next-token logits equal transformers'."""
    from chameleon_jax.model.attention import CAUSAL_BLOCK

    hf, model = mha
    ids, mask = left_pad([text_ids(CAUSAL_BLOCK + 40, seed=5), text_ids(CAUSAL_BLOCK + 7, seed=6)])
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=4), hf_generate(hf, ids, mask, new=4))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1].numpy()
    got = model.logits(ids, mask)[:, -1]
    text = ref > -1e30  # image-token columns sit at the fp32 min on both sides
    assert np.array_equal(got > -1e30, text)
    assert float(np.abs(got - ref)[text].max()) <= 1e-4 * float(np.abs(ref[text]).max())


@pytest.mark.parametrize("name", ["mha", "gqa_swin_tied"])
def test_greedy_matches_transformers_with_early_eos(tmp_path, mha, name):
    if name == "mha":
        hf, model = mha
    else:
        hf = build_hf_model(tmp_path, seed=22, num_key_value_heads=2, swin_norm=True,
                            tie_word_embeddings=True)
        model = cj.load(tmp_path)
    ids, mask, pixels = batch_of_three(hf.config)
    free = model.generate(ids, mask, pixels, max_new_tokens=NEW)
    np.testing.assert_array_equal(free, hf_generate(hf, ids, mask, pixels))

    stop, at = early_stop_token(free)
    ours = model.generate(ids, mask, pixels, max_new_tokens=NEW, stop_token_ids=[stop])
    ref = hf_generate(hf, ids, mask, pixels, eos_token_id=[EOS, stop])
    np.testing.assert_array_equal(ours, ref)
    assert ours[0, at] == stop and np.all(ours[0, at + 1:] == PAD)  # row 0 stopped early, pad after
    np.testing.assert_array_equal(ours[0, :at], free[0, :at])


def test_repetition_penalty_and_min_new_tokens_match_transformers(mha):
    hf, model = mha
    ids, mask, pixels = batch_of_three(hf.config)
    free = model.generate(ids, mask, pixels, max_new_tokens=NEW)
    stop, at = early_stop_token(free, step=2)
    kw = dict(max_new_tokens=NEW, repetition_penalty=2.0, stop_token_ids=[stop], min_new_tokens=at + 4)
    ours = model.generate(ids, mask, pixels, **kw)
    ref = hf_generate(hf, ids, mask, pixels, repetition_penalty=2.0, eos_token_id=[EOS, stop],
                      min_new_tokens=at + 4)
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(ours, free)  # the penalty did change something
    assert stop not in ours[:, : at + 4]


# ------------------------------------------------------------------------ sampling through the model


def test_repetition_penalty_ignores_left_padding_like_transformers(tmp_path):
    """transformers' generate passes each row's padding length as RepetitionPenaltyLogitsProcessor's
    prompt_ignore_length, so pad ids in input_ids do not count as seen (checked on transformers 5.24;
    issue 11 assumed otherwise). Make the pad token the favourite so a difference would show: its
    lm_head row is 10x the row of the token greedy picks first."""
    hf = build_hf_model(tmp_path, seed=31)
    ids, mask, _ = batch_of_three(hf.config)
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # row 0 left-padded, row 1 (the longest) not
    first = hf_generate(hf, ids, mask, new=1)[:, 0]
    with torch.no_grad():
        hf.lm_head.weight[PAD] = 10 * hf.lm_head.weight[int(first[0])]
    hf.save_pretrained(str(tmp_path))
    model = cj.load(tmp_path)
    ref = hf_generate(hf, ids, mask, new=8, repetition_penalty=100.0)
    ours = model.generate(ids, mask, max_new_tokens=8, repetition_penalty=100.0)
    np.testing.assert_array_equal(ours, ref)
    assert ref[0, 0] == PAD  # the pads of row 0's input_ids were not penalized


def _nan_model(tmp_path, token):
    """A checkpoint whose embedding row of ``token`` is NaN (written to its safetensors)."""
    hf = build_hf_model(tmp_path, seed=33)
    with torch.no_grad():
        hf.model.embed_tokens.weight[token] = float("nan")
    hf.save_pretrained(str(tmp_path))
    return hf, cj.load(tmp_path)


def test_non_finite_logits_raise_naming_step_and_rows(tmp_path):
    bad = 200
    hf, model = _nan_model(tmp_path, bad)
    rows = [text_ids(6, seed=1), text_ids(5, seed=2)[:-1] + [bad], text_ids(7, seed=3)]
    rows = [[t if t != bad else 201 for t in r] for r in rows[:1]] + rows[1:]
    ids, mask = left_pad(rows)
    with pytest.raises(ChameleonError, match=r"non-finite logits \(NaN or inf\) at step 0 for row\(s\) \[1\]"):
        model.generate(ids, mask, max_new_tokens=4)
    with pytest.raises(ChameleonError, match=r"at step 0 for row\(s\) \[1\]"):
        list(model.generate_stream(ids, mask, max_new_tokens=4))
    with pytest.raises(ChameleonError, match=r"at step 0 for row\(s\) \[1\]"):
        model.generate_image(ids, mask, do_sample=False)
    # a NaN met later: row 0 generates the bad token itself at some step > 0
    ok = model.generate(ids[[0, 2]], mask[[0, 2]], max_new_tokens=3)
    assert ok.shape == (2, 3)


def test_top_k_1_is_greedy_and_seeds_reproduce(mha):
    _, model = mha
    ids, mask = left_pad([text_ids(7, seed=31), text_ids(12, seed=32)])
    greedy = model.generate(ids, mask, max_new_tokens=16)
    np.testing.assert_array_equal(
        model.generate(ids, mask, max_new_tokens=16, do_sample=True, top_k=1, temperature=1.7, seed=4),
        greedy)
    a = model.generate(ids, mask, max_new_tokens=16, do_sample=True, seed=5)
    b = model.generate(ids, mask, max_new_tokens=16, do_sample=True, seed=5)
    c = model.generate(ids, mask, max_new_tokens=16, do_sample=True, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, greedy)
    assert not np.array_equal(a[0], a[1])  # rows draw independently


def test_degenerate_settings_are_greedy(mha):
    _, model = mha
    ids, mask = left_pad([text_ids(7, seed=33), text_ids(10, seed=34)])
    greedy = model.generate(ids, mask, max_new_tokens=12)
    for kw in (dict(temperature=0.0), dict(temperature=1e-30), dict(top_p=0.0), dict(top_k=1, top_p=0.0)):
        got = model.generate(ids, mask, max_new_tokens=12, do_sample=True, **kw)
        np.testing.assert_array_equal(got, greedy, str(kw))


def test_stream_chunks_concatenate_to_generate(mha):
    _, model = mha
    ids, mask = left_pad([text_ids(7, seed=35), text_ids(11, seed=36)])
    full = model.generate(ids, mask, max_new_tokens=20)
    chunks = list(model.generate_stream(ids, mask, max_new_tokens=20, chunk_size=6))
    assert [c.shape[1] for c in chunks] == [1, 6, 6, 6, 1]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), full)
    # once every row has stopped (by step 5 here) the stream ends; generate's output is pad from there
    stops = [int(full[0, 3]), int(full[1, 5])]
    full = model.generate(ids, mask, max_new_tokens=20, stop_token_ids=stops)
    got = np.concatenate(list(model.generate_stream(ids, mask, max_new_tokens=20, stop_token_ids=stops,
                                                    chunk_size=3)), axis=1)
    n = got.shape[1]
    assert n <= 6 and np.all(full[:, n:] == PAD)
    np.testing.assert_array_equal(got, full[:, :n])


# ------------------------------------------------------------------------ compile caching


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 24, 25, 64, 65, 100, 290, 1059)] == [
        16, 16, 24, 24, 32, 64, 80, 112, 320, 1280]
    for n in range(1, 3000):
        b = bucket_length(n)
        assert b >= n and b % 8 == 0 and bucket_length(b) == b
        assert n <= 32 or (b - n) / n < 0.25


def test_prompt_lengths_in_one_bucket_compile_once(mha):
    _, loaded = mha
    model = cj.ChameleonModel(loaded.config, loaded.params)  # fresh compile cache
    a = model.generate(np.array([text_ids(18, seed=41)]), max_new_tokens=8)
    b = model.generate(np.array([text_ids(21, seed=42)]), max_new_tokens=8)
    traces = model._generator.traces
    assert traces == {"prefill": 1, "decode": 1}, traces
    assert a.shape == b.shape == (1, 8)
    model.generate(np.array([text_ids(21, seed=43)]), max_new_tokens=8)  # same bucket again: cached
    assert traces == {"prefill": 1, "decode": 1}, traces
    model.generate(np.array([text_ids(30, seed=44)]), max_new_tokens=8)  # next bucket: a new prefill
    assert traces["prefill"] == 2, traces
    model.generate(np.array([text_ids(21, seed=45)]), max_new_tokens=8, temperature=0.5, top_p=0.9,
                   do_sample=True, seed=3)  # a new sampling mode compiles; its values do not
    n = dict(traces)
    model.generate(np.array([text_ids(20, seed=46)]), max_new_tokens=8, temperature=0.9, top_p=0.5,
                   do_sample=True, seed=4)
    assert traces == n, traces


# ------------------------------------------------------------------------ processors vs transformers


def test_processors_match_transformers_warpers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4, 50)).astype(np.float32)
    t = torch.tensor(logits)
    for k in (1, 3, 10):
        ours = np.asarray(apply_top_k(logits, k))
        ref = TopKLogitsWarper(k)(None, t.clone()).numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    for p in (0.0, 0.3, 0.7, 0.95):
        ours = np.asarray(apply_top_p(logits, p))
        ref = TopPLogitsWarper(p)(None, t.clone()).numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), f"top_p={p}")
        kept = np.asarray(apply_top_p(apply_top_k(logits, 10), p))
        ref = TopPLogitsWarper(p)(None, TopKLogitsWarper(10)(None, t.clone())).numpy()
        np.testing.assert_array_equal(np.isfinite(kept), np.isfinite(ref), f"top_k=10 top_p={p}")
    prev = rng.integers(0, 50, (4, 7))
    seen = np.zeros((4, 50), bool)
    np.put_along_axis(seen, prev, True, axis=1)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(prev), t.clone()).numpy()
    np.testing.assert_allclose(np.asarray(apply_repetition_penalty(logits, seen, 1.7)), ref, rtol=1e-6)


def test_top_k_and_top_p_by_bisection_follow_their_rules_on_wide_tied_rows():
    """The thresholds are found by bisection over float32 values (no sort): the kept sets are exactly the
    rules' on rows with many ties, -inf entries and a vocabulary-sized width."""
    rng = np.random.default_rng(5)
    logits = (np.round(rng.normal(0, 3, (6, 3000))) / 2).astype(np.float32)  # ~25 distinct values: ties
    logits[0, ::3] = -np.inf
    logits[1, :] = -np.inf
    logits[1, 7] = 1.0
    for k in (1, 7, 100, 2999):
        kth = np.sort(logits, axis=-1)[:, -k][:, None]
        np.testing.assert_array_equal(np.isfinite(np.asarray(apply_top_k(logits, k))),
                                      (logits >= kth) & np.isfinite(logits), f"top_k={k}")
    z = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True)
    above = np.stack([(probs[r][None, :] * (logits[r][None, :] > logits[r][:, None])).sum(-1) for r in range(6)])
    for top_p in (0.0, 0.05, 0.5, 0.9, 0.99):
        want = ((above < top_p) | (logits == logits.max(-1, keepdims=True))) & np.isfinite(logits)
        got = np.isfinite(np.asarray(apply_top_p(logits, top_p)))
        clear = np.abs(above - top_p) > 1e-5  # not on the boundary up to float32 rounding of the sums
        np.testing.assert_array_equal(got[clear], want[clear], f"top_p={top_p}")


def test_draws_are_jax_categorical_draws():
    """sample_from_logits adds jax.random.categorical's Gumbel noise itself (for the blocked argmax): the
    same token for the same key, -inf entries and all."""
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 2, (5, 1000)).astype(np.float32)
    logits[0, :900] = -np.inf
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(np.arange(5))
    for step in range(20):
        ks = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        want = np.asarray(jax.vmap(jax.random.categorical)(ks, logits))
        np.testing.assert_array_equal(np.asarray(sample_from_logits(logits, ks, np.zeros(5, np.int32))), want)


# ------------------------------------------------------------------------ statistics of draws

LOGITS = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -3.0], np.float32)
DRAWS = 20000


def reference_probs(temperature=1.0, top_k=0, top_p=1.0):
    """The exact distribution, computed as transformers defines it (independently of our code)."""
    z = LOGITS.astype(np.float64) / temperature
    keep = np.ones(z.size, bool)
    if top_k:
        keep &= z >= np.sort(z)[-top_k]
    z = np.where(keep, z, -np.inf)
    if top_p < 1:
        order = np.argsort(z)  # ascending, as TopPLogitsWarper
        p = np.exp(z[order] - z.max())
        p /= p.sum()
        remove = np.cumsum(p) <= 1 - top_p
        remove[-1] = False
        keep[order[remove]] = False
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return p / p.sum()


def empirical(mode: Mode, temperature=1.0, top_p=1.0, seed=0):
    logits = np.broadcast_to(LOGITS, (DRAWS, LOGITS.size))
    knobs = dict(temperature=np.float32(temperature), top_p=np.float32(top_p), penalty=np.float32(1.0),
                 seed=np.uint32(seed), min_new=np.int32(0), stop_ids=np.full((8,), LOGITS.size, np.int32))
    tokens = np.asarray(choose_tokens(logits, mode, knobs, np.int32(0), None))
    return np.bincount(tokens, minlength=LOGITS.size) / DRAWS


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.85)],
)
def test_sampling_distribution(temperature, top_k, top_p):
    mode = Mode(do_sample=True, top_k=top_k, use_top_p=top_p < 1)
    freq = empirical(mode, temperature, top_p, seed=7)
    want = reference_probs(temperature, top_k, top_p)
    tv = 0.5 * np.abs(freq - want).sum()
    assert tv < 0.02, (freq, want)
    assert np.all(freq[want == 0] == 0)  # filtered tokens are never drawn
    if (temperature, top_k, top_p) != (1.0, 0, 1.0):  # the test tells the settings apart
        assert 0.5 * np.abs(freq - reference_probs()).sum() > 0.04


def test_min_new_tokens_suppresses_stop_ids_exactly_that_long():
    logits = np.array([[0.0, 3.0, 1.0, 2.0]], np.float32)  # token 1 (a stop id) is the argmax
    stop_ids = np.array([1, 4, 4, 4, 4, 4, 4, 4], np.int32)  # 4 = no token
    knobs = dict(temperature=np.float32(1.0), top_p=np.float32(1.0), penalty=np.float32(1.0),
                 seed=np.uint32(0), min_new=np.int32(5), stop_ids=stop_ids)
    for step, want in ((0, 3), (4, 3), (5, 1), (9, 1)):
        assert int(choose_tokens(logits, Mode(), knobs, np.int32(step), None)[0]) == want, step


@pytest.mark.parametrize("width", [5, 128, 300, 1024])
def test_blocked_argmax_equals_argmax(width):
    rng = np.random.default_rng(width)
    x = rng.integers(-3, 4, (9, width)).astype(np.float32)  # many ties, within and across blocks
    x[1] = -np.inf                                           # no finite entry: index 0
    x[2, width // 3] = x[2, -1] = 7.0                        # the first of two maxima
    x[3, -1] = 9.0                                           # the max in the last (partial) block
    x[4, :] = 2.0                                            # all tied: index 0
    x[5, 0] = np.inf
    x[6, width // 2:] = np.inf                               # first +inf
    got = np.asarray(jax.jit(argmax_rows)(x))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))  # numpy: the first max


def test_top_p_boundary_follows_transformers():
    # probabilities 1/2, 1/4, 5/32, 3/32 (exact in float32); transformers drops a token once the
    # mass above it reaches top_p, so top_p=0.75 keeps two tokens and 0.7501 keeps three.
    logits = np.log(np.array([[0.5, 0.25, 0.15625, 0.09375]], np.float32))
    for top_p, kept in ((0.5, 1), (0.75, 2), (0.7501, 3), (0.9, 3), (0.9063, 4)):
        assert np.isfinite(np.asarray(apply_top_p(logits, top_p))).sum() == kept, top_p
    # tokens tied at the cut are all kept (transformers keeps one of them, as its sort orders them)
    tied = np.log(np.array([[0.5, 0.25, 0.125, 0.125]], np.float32))
    assert np.isfinite(np.asarray(apply_top_p(tied, 0.7501))).sum() == 4


# ------------------------------------------------------------------------ NaN safety


def test_processors_never_make_nan():
    lo = np.finfo(np.float32).min
    logits = np.array([
        [-np.inf] * 6,                       # fully masked row
        [lo] * 6,                            # every token suppressed like image tokens
        [lo, 3.0, lo, 2.0, lo, lo],          # suppressed tokens next to live ones
    ], np.float32)
    for temperature in (1e-30, 1e-6, 0.5, 1.0, 100.0):
        scaled = np.asarray(apply_temperature(logits, temperature))
        assert not np.any(np.isposinf(scaled))
        assert not np.any(np.isnan(scaled))
        assert np.all(scaled.max(axis=1)[1:] == 0)
        for top_p in (0.0, 0.5, 1.0):
            filtered = apply_top_p(apply_top_k(scaled, 3), top_p)
            probs = np.asarray(safe_softmax(filtered))
            assert not np.any(np.isnan(probs)), (temperature, top_p)
            keys = jax.random.split(jax.random.key(0), 3)
            tok = np.asarray(sample_from_logits(filtered, keys, np.array([4, 1, 1], np.int32)))
            assert tok[0] == 4  # nothing finite: the fallback
            assert tok[2] == 1 or (tok[2] == 3 and top_p > 0 and temperature >= 0.5)
            assert np.all((tok >= 0) & (tok < 6))
    probs = np.asarray(safe_softmax(np.full((2, 5), -np.inf, np.float32)))
    assert np.all(probs == 0)
    # the tiniest temperature is greedy, not NaN
    knobs = dict(temperature=np.float32(1e-30), top_p=np.float32(1.0), penalty=np.float32(1.0),
                 seed=np.uint32(0), min_new=np.int32(0), stop_ids=np.full((8,), 6, np.int32))
    tok = np.asarray(choose_tokens(logits[2:3].repeat(50, 0), Mode(do_sample=True), knobs, np.int32(0), None))
    assert np.all(tok == 1)
    # a NaN logit (a broken model) is never chosen, greedy or sampled
    bad = np.array([[np.nan, 1.0, 0.0, 4.0, -2.0, np.nan]], np.float32)
    for mode in (Mode(), Mode(do_sample=True), Mode(do_sample=True, top_k=2, use_top_p=True)):
        knobs["temperature"] = np.float32(1.0)
        knobs["top_p"] = np.float32(0.9)
        tok = np.asarray(choose_tokens(bad.repeat(50, 0), mode, knobs, np.int32(0), None))
        assert np.all(np.isin(tok, [1, 2, 3, 4])), mode


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=600), "max_position_embeddings"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop_token_ids=[100000]), "stop_token_ids"),
        (dict(min_new_tokens=-1), "min_new_tokens"),
    ],
)
def test_bad_generation_arguments(mha, kw, match):
    _, model = mha
    with pytest.raises(ChameleonError, match=match):
        model.generate(np.array([text_ids(8, seed=1)]), **kw)


def test_prompt_plus_new_tokens_past_max_positions(mha):
    _, model = mha
    ids = np.array([text_ids(500, seed=2)])
    msg = r"500 \+ max_new_tokens 13 = 513 exceeds max_position_embeddings 512"
    with pytest.raises(ChameleonError, match=msg):
        model.generate(ids, max_new_tokens=13)


def test_right_padding_and_bad_chunk_size(mha):
    _, model = mha
    ids, mask = left_pad([text_ids(5, seed=3), text_ids(8, seed=4)])
    with pytest.raises(ChameleonError, match="attention_mask: row 0 ends with padding"):
        model.generate(ids, mask[:, ::-1])
    with pytest.raises(ChameleonError, match="chunk_size"):
        model.generate_stream(ids, mask, chunk_size=0)


# ------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def cli_model_dir(tmp_path_factory):
    """A random model and a test tokenizer sharing one vocabulary, in one directory."""
    from tokenizer_utils import build_test_tokenizer

    from conftest import NUM_CODES

    d = tmp_path_factory.mktemp("cli")
    vm = build_test_tokenizer(d, num_image_codes=NUM_CODES, vocab_size=512, image_seq_length=64,
                              image_size=16)
    build_hf_model(d, seed=61, vocab_size=512, vocabulary_map=vm, bos_token_id=vm["<s>"],
                   eos_token_id=vm["</s>"], pad_token_id=vm["<pad>"])
    return d


def test_cli_generate_streams_the_models_text(cli_model_dir, tmp_path, capsys):
    from PIL import Image

    from chameleon_jax import cli
    from chameleon_jax.processing import ChameleonProcessor

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8)).save(img)
    argv = ["generate", "--model", str(cli_model_dir), "--prompt", "Describe the image", "--image", str(img),
            "--max-new-tokens", "10", "--chunk-size", "3"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    # the same prompt through the Python API: images first, then the text, greedy
    proc = ChameleonProcessor.from_pretrained(cli_model_dir)
    batch = proc(text=["<image>Describe the image"], images=[str(img)])
    model = cj.load(cli_model_dir)
    want = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                          max_new_tokens=10)
    assert out == proc.decode(want[0]) + "\n"
    stops = np.flatnonzero(want[0] == model.config.eos_token_id)
    assert f"{stops[0] + 1 if stops.size else 10} tokens in" in err

    sampled = ["--max-new-tokens", "4", "--temperature", "0.8", "--top-k", "5", "--seed", "1"]
    assert cli.main(argv[:-4] + sampled) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-k", "5"], "--temperature > 0"),
        (["--temperature", "-1"], "--temperature"),
        (["--image", "/nonexistent.png"], "nonexistent"),
    ],
)
def test_cli_generate_errors_are_one_line(cli_model_dir, capsys, extra, match):
    from chameleon_jax import cli

    assert cli.main(["generate", "--model", str(cli_model_dir), "--prompt", "hello"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or (len(err) == 2 and "loaded in" in err[0]), err
    assert err[-1].startswith("chameleon-jax: error:") and match in err[-1], err


def test_cli_generate_help_explains_every_flag():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "chameleon_jax.cli", "generate", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--prompt", "--image", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                 "--seed", "--repetition-penalty", "--text-completion", "--dtype", "--chunk-size"):
        assert flag in out.stdout, flag
    assert "greedy" in out.stdout


def test_cli_generate_without_model_uses_the_shipped_demo(capsys, tmp_path):
    from chameleon_jax import cli
    from chameleon_jax.demo import world
    from PIL import Image

    path = tmp_path / "shape.png"
    Image.fromarray(world.render(world.Scene("green", "circle", "gray", 8, 12, 40))).save(path)
    assert cli.main(["generate", "--prompt", "<image>", "--image", str(path), "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert "shipped demo model" in err and "tokens in" in err
    assert out.endswith("\n") and world.parse_caption(out) == ("green", "circle", "gray"), out
