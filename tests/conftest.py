"""Shared fixtures: small random transformers Chameleon checkpoints written to tmp dirs."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test-only XLA:CPU flags and compilation cache (applied below, under pytest only).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
TEST_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"chameleon-jax-test-jit-cache-{os.getpid()}")
# The settings below are for test runs only (pytest sets PYTEST_VERSION): benchmarks import helpers from
# tests/ (test_vq_decoder's weight mapping, tokenizer_utils), and these flags would silently slow what they
# measure (LLVM -O0 made the VQ-GAN decoder benchmark 1.5x slower) and give them 8 fake devices.
if os.environ.get("PYTEST_VERSION"):
    # 8 simulated devices for the sharding tests; single-device tests use device 0 as usual.
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
    # The XLA:CPU flags: most of the suite's time is XLA compiling hundreds of small programs, and the
    # tests check numbers, not speed: LLVM at -O0 and the older loop emitters compile those programs in
    # about a third of the default time (measured on tests/test_generation.py + test_parity.py: 78.6 s ->
    # 46.3 s), with the same IEEE arithmetic (no fast-math either way). Subprocesses the tests start
    # inherit them.
    os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()
    # One persistent compilation cache per test run, shared by the xdist workers (they inherit the
    # controller's environment) and by the processes the tests start: many tests build the same small
    # models and compile the same programs. Removed when the run ends (pytest_sessionfinish).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", TEST_CACHE_DIR)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import numpy as np
import pytest

from chameleon_jax.demo import tiny_vocabulary_map
from chameleon_jax.vocab import BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN

NUM_CODES = 64


def make_vocabulary_map(vocab_size: int = 256, num_codes: int = NUM_CODES) -> dict[str, int]:
    """The demo's layout with the image codes shuffled, to catch code-order assumptions."""
    return tiny_vocabulary_map(vocab_size, num_codes, shuffle_seed=123)


def hf_config(**overrides):
    import transformers

    vocab_size = overrides.pop("vocab_size", 256)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        vocabulary_map=make_vocabulary_map(vocab_size),
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        vq_config=dict(
            embed_dim=8,
            num_embeddings=NUM_CODES,
            latent_channels=8,
            resolution=16,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[8],
        ),
    )
    kw.update(overrides)
    return transformers.ChameleonConfig(**kw)


def randomize_norms(model, seed: int = 0):
    """Norm weights init to 1 and biases to 0, which would hide mapping bugs: randomize them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def build_hf_model(directory, seed: int = 0, **overrides):
    """Random HF ChameleonForConditionalGeneration saved to ``directory``; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(**overrides)
    model = transformers.ChameleonForConditionalGeneration(config).eval()
    randomize_norms(model, seed)
    model.save_pretrained(str(directory))
    return model


def image_placeholders(config, n_images: int = 1) -> list[int]:
    """boi + tokens_per_image x <image> + eoi for each image."""
    vm = config.vocabulary_map
    side = config.vq_config.resolution // 2 ** (len(config.vq_config.channel_multiplier) - 1)
    out = []
    for _ in range(n_images):
        out += [vm[BOI_TOKEN]] + [vm[IMAGE_TOKEN]] * side * side + [vm[EOI_TOKEN]]
    return out


def random_pixels(n: int, resolution: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, 3, resolution, resolution)).astype(np.float32)


def left_pad(rows, pad: int = 3):
    """Token lists -> left-padded ids [B, T] and attention mask (int64, as transformers takes them)."""
    t = max(map(len, rows))
    ids = np.full((len(rows), t), pad, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask


def text_ids(n: int, seed: int, vocab_size: int = 256) -> list[int]:
    lo = 4 + NUM_CODES + 4
    return [1] + np.random.default_rng(seed).integers(lo, vocab_size, n - 1).tolist()


@pytest.fixture
def hf_dir(tmp_path):
    return tmp_path / "hf"


def child_env() -> dict:
    """os.environ for a child process that picks its own device count: without JAX_NUM_CPU_DEVICES and
    any XLA_FLAGS but the compile settings above."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    return env


def fail_on_call(fn, n: int, error: Exception | None = None):
    """``fn`` that raises ``error`` (a full disk by default) on its ``n``-th call: a write failing midway."""
    def flaky(*a, **k):
        flaky.calls += 1
        if flaky.calls == n:
            raise error or OSError("No space left on device")
        return fn(*a, **k)

    flaky.calls = 0  # how often it was called
    return flaky


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a run without xdist) owns the cache
        shutil.rmtree(TEST_CACHE_DIR, ignore_errors=True)


# The files whose tests take longest run first: `make test` keeps each file on one of two xdist workers
# (--dist loadfile), handed out in collection order, and a long file handed out last leaves one worker
# running it alone at the end. Stable sort: every other file keeps its place.
SLOW_FIRST = ("test_demo.py", "test_kill.py", "test_quant.py", "test_train.py", "test_train_gather.py",
              "test_interleaved.py", "test_multihost_train.py", "test_fuzz.py", "test_generation.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
