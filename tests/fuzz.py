"""Fuzz harness: seeded, bounded mutations of every input format the library reads.

Each case (format, index) copies a valid base input, mutates one file with ``numpy.random.default_rng``
seeded by (format, index), and calls the public entry point a user would:

==============  =====================================  ==============================================
format          mutated file                           entry point
==============  =====================================  ==============================================
safetensors     hf/model.safetensors (header, body)    cj.load(dir)
config          hf/config.json                         cj.load(dir)
tokenizer       tok/tokenizer.json                     ChameleonProcessor.from_pretrained + encode/decode
meta_tokenizer  tokenizer/text_tokenizer.json (Meta)   ChameleonProcessor.from_pretrained + encode/decode
jsonl           data/data.jsonl (training records)     read_jsonl + every DataLoader batch (images too)
png, jpeg       an image file                          processor(text, images=[path])
pth             Meta consolidated.pth / vqgan.ckpt     cj.convert(release, out)
==============  =====================================  ==============================================

An outcome is ``clean_error`` (a ChameleonError), ``succeeded`` (a harmless mutation) or ``other``
(any other exception: a bug). Cases run in a worker subprocess (jax imported once) that writes
``start i`` / ``done i <outcome> <exception type>`` to a pipe; the parent (:func:`campaign`) gives
each case ``timeout`` seconds: past it, the worker is killed, the case is a ``hang`` and a new worker
goes on from the next case; a worker that dies mid-case makes it a ``crash``. hang and crash count
as ``other``.

Reproduce one case (its traceback printed): ``python tests/fuzz.py case FORMAT INDEX``. A case's input
depends only on (format, index) and the base inputs, never on which cases ran before it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FORMATS = ("safetensors", "config", "tokenizer", "meta_tokenizer", "jsonl", "png", "jpeg", "pth")
WEIRD = [None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1.5, -0.0, 1e308, "", "x", "float32",
         "<image>", "\u0000", "a" * 5000, [], [0], [-1, 2**40], [[1]], {}, {"a": 1}, {"": None}]


# ------------------------------------------------------------------ base inputs
def build_base(root: str) -> str:
    """Write every format's valid base input under ``root`` (needs torch + transformers for the Meta
    release); returns ``root``."""
    sys.path.insert(0, HERE)
    from PIL import Image

    from chameleon_jax.config import ChameleonConfig, VQConfig
    from meta_fake import write_meta_release
    from tokenizer_utils import build_test_tokenizer
    from train_utils import write_data

    vm = build_test_tokenizer(os.path.join(root, "tok"), num_image_codes=64, vocab_size=512, image_seq_length=16,
                              image_size=8)
    config = ChameleonConfig(
        vocab_size=512, hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=vm["<s>"], eos_token_id=vm["</s>"],
        pad_token_id=vm["<pad>"], vocabulary_map=vm,
        vq_config=VQConfig(embed_dim=4, num_embeddings=64, latent_channels=4, resolution=8, base_channels=32,
                           channel_multiplier=(1, 2), num_res_blocks=1))
    random_checkpoint(os.path.join(root, "hf"), config, seed=1)
    build_test_tokenizer(os.path.join(root, "metatok"), num_image_codes=64, vocab_size=512, layout="meta")
    write_data(os.path.join(root, "data"), 4, seed=2)
    rng = np.random.default_rng(3)
    img = os.path.join(root, "img")
    os.makedirs(img)
    Image.fromarray(rng.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA").save(os.path.join(img, "base.png"))
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(os.path.join(img, "base.jpg"), quality=80)
    write_meta_release(os.path.join(root, "meta"), _HFModel(os.path.join(root, "hf"), config), multiple_of=32)
    return root


def random_checkpoint(directory: str, config, seed: int = 0) -> str:
    """An HF-layout checkpoint of random numpy params in init_params' abstract shapes (norm scales near 1):
    compiling the real init would take ~25 s on this machine."""
    import jax
    from flax import linen as nn

    from chameleon_jax.checkpoint.hf import save_hf
    from chameleon_jax.model import init_params

    rng = np.random.default_rng(seed)
    shapes = nn.unbox(init_params(config, jax.random.key(0), abstract=True))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (1.0 if "norm" in jax.tree_util.keystr(p) and "scale" in jax.tree_util.keystr(p) else 0.0)
        + rng.normal(0, 0.05, x.shape).astype(np.float32), shapes)
    save_hf(params, config, directory)
    return directory


class _HFModel:
    """What meta_fake.write_meta_release reads of a transformers model (``config``, ``state_dict()``),
    from our own HF checkpoint: no transformers import. One shard: every head gets head 0's q/k norm."""

    def __init__(self, directory: str, config):
        import dataclasses
        import types

        from chameleon_jax.checkpoint.safetensors_io import SafetensorsFile

        f = SafetensorsFile(os.path.join(directory, "model.safetensors"))
        self.tensors = {k: f.get(k) for k in f.keys()}
        for k, v in self.tensors.items():
            if "_norm." in k and ("q_norm" in k or "k_norm" in k):
                self.tensors[k] = np.repeat(v[:1], len(v), 0)
        self.config = types.SimpleNamespace(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        self.config.rope_parameters = {"rope_theta": config.rope_theta}
        self.config.vq_config = config.vq_config

    def state_dict(self):
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in self.tensors.items()}


# ------------------------------------------------------------------ mutations
def mutate_bytes(rng, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """One byte-level mutation inside data[lo:hi]: truncation, bit flips, overwritten, deleted or
    inserted chunks."""
    hi = len(data) if hi is None else hi
    b = bytearray(data)
    kind = rng.integers(6)
    pos = int(rng.integers(lo, max(hi, lo + 1)))
    if kind == 0 or not b:
        return bytes(b[:pos])
    if kind == 1:
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(lo, max(hi, lo + 1))) % len(b)
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == 2:
        n = int(rng.integers(1, 64))
        b[pos:pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif kind == 3:
        del b[pos:pos + int(rng.integers(1, 256))]
    elif kind == 4:
        b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:
        n = int(rng.integers(1, 512))
        b[pos:pos + n] = bytes(min(n, len(b) - pos))
    return bytes(b)


def _weird(rng, old):
    """A replacement value: one of WEIRD, or ``old`` nudged (numbers), cut (strings, lists)."""
    if isinstance(old, bool) or rng.random() < 0.6:
        return WEIRD[int(rng.integers(len(WEIRD)))]
    if isinstance(old, (int, float)):
        return type(old)(old * [0, -1, 2, 1000][int(rng.integers(4))] + int(rng.integers(-2, 3)))
    if isinstance(old, (str, list)):
        return old[: int(rng.integers(len(old) + 1))] if old else old
    return WEIRD[int(rng.integers(len(WEIRD)))]


def mutate_json(rng, obj, depth_bias: float = 0.6):
    """One structural mutation of a JSON value: walk to a random container entry, then delete it,
    replace it by a weird value, or duplicate a list item. Returns the (new) value."""
    if not isinstance(obj, (dict, list)) or not obj:
        return _weird(rng, obj)
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    k = keys[int(rng.integers(len(keys)))]
    child = obj[k]
    if isinstance(child, (dict, list)) and child and rng.random() < depth_bias:
        obj[k] = mutate_json(rng, child, depth_bias)
        return obj
    op = rng.integers(4)
    if op == 0:
        del obj[k]
    elif op == 1 and isinstance(obj, list):
        obj.insert(k, child)
    else:
        obj[k] = _weird(rng, child)
    return obj


def _json_file(rng, data: bytes, depth_bias=0.6) -> bytes:
    if rng.random() < 0.3:
        return mutate_bytes(rng, data)
    obj = json.loads(data)
    for _ in range(int(rng.integers(1, 4))):
        obj = mutate_json(rng, obj, depth_bias)
    return json.dumps(obj).encode()


def _safetensors(rng, data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    r = rng.random()
    if r < 0.15:
        return mutate_bytes(rng, data, 0, 8 + n)  # header bytes
    if r < 0.3:
        return mutate_bytes(rng, data, 8 + n)  # tensor bytes
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    field = ["dtype", "shape", "data_offsets", "entry", "metadata", "length"][int(rng.integers(6))]
    if field == "dtype":
        entry["dtype"] = ["F16", "BF16", "I64", "U8", "BOOL", "F64", "F8_E4M3", "Q4", 7, None][int(rng.integers(10))]
    elif field in ("shape", "data_offsets"):
        header[name][field] = mutate_json(rng, list(entry[field]), 0.0) if rng.random() < 0.5 else \
            [int(v) + int(rng.integers(-3, 4)) * int(rng.choice([1, 4, 1 << 20])) for v in entry[field]]
    elif field == "entry":
        header[name] = _weird(rng, entry) if rng.random() < 0.7 else header.pop(names[0], entry)
    elif field == "metadata":
        header["__metadata__"] = _weird(rng, header.get("__metadata__"))
    blob = json.dumps(header).encode()
    size = len(blob)
    if field == "length":
        size = [0, 1, size - 1, size + 1, 2**64 - 1, len(data)][int(rng.integers(6))]
    return size.to_bytes(8, "little") + blob + data[8 + n:]


def _jsonl(rng, data: bytes) -> bytes:
    lines = data.decode().splitlines()
    i = int(rng.integers(len(lines)))
    r = rng.random()
    if r < 0.25:
        return mutate_bytes(rng, data)
    if r < 0.4:
        extra = ['[]', 'null', '{}', '"text"', '{"text": "<image>", "images": ["."]}',
                 '{"text": "x", "images": ["../../../../etc/passwd"]}', '{"text": "a", "images": ["data.jsonl"]}',
                 '{"input_ids": [1, 99999999999999999999]}', '{"input_ids": [1.5]}', '{"messages": [{}]}',
                 '{"text": "<image> <image>", "images": ["images/img0.png", 3]}', '\ufeff{"text": "bom"}']
        lines.insert(i, extra[int(rng.integers(len(extra)))])
    else:
        lines[i] = json.dumps(mutate_json(rng, json.loads(lines[i]), 0.7))
    return ("\n".join(lines) + "\n").encode()


def _image(rng, data: bytes) -> bytes:
    if data[:4] == b"\x89PNG" and rng.random() < 0.4:  # edit a chunk's payload and fix its CRC
        b = bytearray(data)
        pos, chunks = 8, []
        while pos + 8 <= len(b):
            length = int.from_bytes(b[pos:pos + 4], "big")
            chunks.append((pos, length))
            pos += 12 + length
        pos, length = chunks[int(rng.integers(len(chunks)))]
        body = bytearray(b[pos + 8:pos + 8 + length])
        if body:
            for _ in range(int(rng.integers(1, 4))):
                body[int(rng.integers(len(body)))] = int(rng.integers(256))
        crc = zlib.crc32(bytes(b[pos + 4:pos + 8]) + bytes(body)).to_bytes(4, "big")
        return bytes(b[:pos + 8]) + bytes(body) + crc + bytes(b[pos + 12 + length:])
    return mutate_bytes(rng, data, 0, min(len(data), 200) if rng.random() < 0.5 else None)


def mutate_case(fmt: str, index: int, base: str, work: str, mutate: bool = True) -> str:
    """Copy the base input of ``fmt`` into ``work``, mutate it (seeded by fmt and index; ``mutate=False``:
    leave it valid); returns the path the entry point takes."""
    if fmt == "_selftest":  # case i: 0 succeeds, 1 raises KeyError, 2 a clean error, 3 crashes, 4 hangs
        with open(os.path.join(work, "case"), "w") as f:
            f.write(str(index))
        return os.path.join(work, "case")
    rng = np.random.default_rng([FORMATS.index(fmt), index])
    src, target, fn = {
        "safetensors": ("hf", "model.safetensors", _safetensors), "config": ("hf", "config.json", _json_file),
        "tokenizer": ("tok", "tokenizer.json", lambda r, d: _json_file(r, d, 0.8)),
        "meta_tokenizer": ("metatok", "tokenizer/text_tokenizer.json", lambda r, d: _json_file(r, d, 0.8)),
        "jsonl": ("data", "data.jsonl", _jsonl), "png": ("img", "base.png", _image),
        "jpeg": ("img", "base.jpg", _image),
        "pth": ("meta", "models/7b/consolidated.pth" if rng.random() < 0.75 else "tokenizer/vqgan.ckpt",
                lambda r, d: mutate_bytes(r, d)),
    }[fmt]
    dst = os.path.join(work, src)
    shutil.copytree(os.path.join(base, src), dst)
    path = os.path.join(dst, target)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(fn(rng, data) if mutate else data)
    return path


# ------------------------------------------------------------------ entry points
def run_entry(fmt: str, path: str, base: str, work: str) -> None:
    import chameleon_jax as cj
    from chameleon_jax.training.data import DataLoader, read_jsonl

    if fmt in ("safetensors", "config"):
        cj.load(os.path.dirname(path))
    elif fmt in ("tokenizer", "meta_tokenizer"):
        d = os.path.dirname(path)
        proc = cj.ChameleonProcessor.from_pretrained(os.path.dirname(d) if fmt == "meta_tokenizer" else d)
        out = proc(text=["hello world the cat", "a dog"], padding=True)
        proc.batch_decode(out["input_ids"], skip_special_tokens=True)
    elif fmt == "jsonl":
        proc = cj.ChameleonProcessor.from_pretrained(os.path.join(base, "tok"))
        ds = read_jsonl(path, proc, max_length=128)
        loader = DataLoader(ds, proc, batch_size=1, max_length=128)
        for _ in range(len(ds)):
            next(loader)
    elif fmt in ("png", "jpeg"):
        proc = cj.ChameleonProcessor.from_pretrained(os.path.join(base, "tok"))
        proc(text=["look <image> here"], images=[path])
    elif fmt == "pth":
        cj.convert(os.path.join(work, "meta"), os.path.join(work, "out"), progress=False)
    elif fmt == "_selftest":  # tests/test_fuzz.py: the harness must see each kind of failure
        kind = int(open(path).read())
        if kind == 1:
            raise KeyError("a stray exception")
        if kind == 2:
            raise cj.ChameleonError("a clean error")
        if kind == 3:
            os.kill(os.getpid(), signal.SIGSEGV)
        if kind == 4:
            time.sleep(3600)
    else:
        raise KeyError(fmt)


def run_case(fmt: str, index: int, base: str, scratch: str, verbose: bool = False) -> tuple[str, str]:
    """(outcome, exception type) of one case; its files live under ``scratch`` (emptied first)."""
    from chameleon_jax.errors import ChameleonError

    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    path = mutate_case(fmt, index, base, scratch)
    try:
        run_entry(fmt, path, base, scratch)
    except ChameleonError as e:
        if verbose:
            print(f"ChameleonError: {e}")
        return "clean_error", "ChameleonError"
    except Exception as e:  # anything else is a bug
        if verbose:
            traceback.print_exc()
        return "other", type(e).__name__
    return "succeeded", "-"


def _worker(base: str, cases: str, fd: int) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import chameleon_jax  # noqa: F401  (imports before the first case's clock starts)
    import chameleon_jax.training.data  # noqa: F401

    out = os.fdopen(fd, "w", buffering=1)
    scratch = tempfile.mkdtemp(prefix="fuzz-")
    for n, case in enumerate(cases.split(",")):
        fmt, i = case.split(":")
        out.write(f"start {n}\n")
        outcome, exc = run_case(fmt, int(i), base, scratch)
        out.write(f"done {n} {outcome} {exc}\n")
    shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ parent
def campaign(cases: list[tuple[str, int]], base: str, timeout: float = 20.0) -> tuple[dict, list]:
    """Run ``cases`` ((format, index) pairs) serially in worker subprocesses; returns
    ({format: {clean_error, succeeded, other}}, [(format, index, outcome, detail)] of the ``other`` ones)."""
    counts = {fmt: {"clean_error": 0, "succeeded": 0, "other": 0} for fmt, _ in cases}
    failures: list = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    i = 0
    while i < len(cases):
        first, todo = i, cases[i:]
        r, w = os.pipe()
        err = tempfile.TemporaryFile()  # not a pipe: a chatty worker must never block on it
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", base,
                                 ",".join(f"{f}:{k}" for f, k in todo), str(w)], env=env, pass_fds=(w,),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        os.close(w)
        buf, current, deadline = b"", None, time.monotonic() + 120  # startup: imports
        while True:
            line = None  # unbuffered reads: a line read ahead must not wait for select()
            while b"\n" not in buf:
                ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(r, 4096) if ready else None
                if not chunk:
                    line = "" if chunk == b"" else None
                    break
                buf += chunk
            if b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode() + "\n"
            if line is None:  # no progress in time: a hang (or a stuck startup)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kind = "hang" if current is not None else "startup-hang"
                break
            if line == "":  # the worker exited
                rc = proc.wait()
                kind = None if rc == 0 and current is None else f"crash(rc={rc})"
                break
            word, idx, *rest = line.split()
            if word == "start":
                current, deadline = int(idx), time.monotonic() + timeout
            else:  # between cases (or exiting) the clock is the startup one again
                deadline = time.monotonic() + 120
                fmt, k = todo[int(idx)]
                counts[fmt][rest[0]] += 1
                if rest[0] == "other":
                    failures.append((fmt, k, "other", rest[1]))
                current = None
                i = first + int(idx) + 1
        err.seek(0)
        stderr = err.read().decode(errors="replace")[-2000:]
        err.close()
        os.close(r)
        if kind is None:
            break
        if current is None:  # died or stuck outside a case: report and stop (not a case's fault)
            raise RuntimeError(f"fuzz worker failed outside a case ({kind}): {stderr}")
        fmt, k = todo[current]
        counts[fmt]["other"] += 1
        failures.append((fmt, k, kind, (stderr.strip().splitlines() or [""])[-1]))
        i = first + current + 1
    return counts, failures


def main(argv) -> int:
    if argv[0] == "worker":
        _worker(argv[1], argv[2], int(argv[3]))
        return 0
    if argv[0] == "case":  # python tests/fuzz.py case FORMAT INDEX [BASE]
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        sys.path.insert(0, HERE)
        base = argv[3] if len(argv) > 3 else build_base(tempfile.mkdtemp(prefix="fuzz-base-"))
        outcome, exc = run_case(argv[1], int(argv[2]), base, tempfile.mkdtemp(prefix="fuzz-case-"), verbose=True)
        print(f"{argv[1]} case {argv[2]}: {outcome} {exc} (base {base})")
        return 0
    raise SystemExit(f"usage: {argv[0]} worker ... | case FORMAT INDEX [BASE]")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
