"""Fine-tuning data and config: JSONL records, chat labels, bucketing, deterministic order, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import chameleon_jax as cj
from chameleon_jax.model.loss import IGNORE_INDEX
from chameleon_jax.training.data import DataLoader, default_buckets, read_jsonl
from chameleon_jax.training.config import TrainConfig
from tokenizer_utils import build_test_tokenizer
from train_utils import IMAGE_TOKENS, write_data, write_images, write_records

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_test_tokenizer(d, num_image_codes=64, vocab_size=512, image_seq_length=IMAGE_TOKENS, image_size=8)
    return cj.ChameleonProcessor.from_pretrained(d)


def _read(path, proc, **kw):
    kw.setdefault("max_length", 128)
    return read_jsonl(str(path), proc, **kw)


def test_text_and_chat_records(tmp_path, proc):
    data = write_data(tmp_path, 4)
    ds = _read(data, proc)
    doc, chat = ds.examples[0], ds.examples[1]
    # a document: <s> + text with the image expanded + </s>, every token a label
    assert doc.ids[0] == proc.bos_token_id and doc.ids[-1] == proc.eos_token_id
    assert np.array_equal(doc.labels[1:], doc.ids[1:])
    assert doc.labels[0] == IGNORE_INDEX  # <s> is never a target
    assert (doc.ids == proc.image_token_id).sum() == IMAGE_TOKENS and len(doc.images) == 1
    expected = proc(text=["hello world <image> the cat is in the image ."], images=list(doc.images),
                    return_for_text_completion=True)
    assert np.array_equal(doc.ids[:-1], expected["input_ids"][0])  # same tokens as the processor, + </s>
    # a chat: labels only on the assistant's content and the </s> closing it
    trained = chat.ids[chat.labels != IGNORE_INDEX]
    assert proc.decode(trained, skip_special_tokens=False) == "a dog and a cat</s>"
    text = proc.decode(chat.ids, skip_special_tokens=True)
    assert text.startswith("describe\nUSER: ") and "what is this ?\nASSISTANT: a dog and a cat" in text
    assert chat.source.endswith("data.jsonl:2")
    # two assistant turns: both trained, the user turn between them not
    multi = ds.examples[3]
    assert proc.decode(multi.ids[multi.labels != IGNORE_INDEX], skip_special_tokens=False) == \
        "the color of the picture is one</s>hello dog</s>"


def test_loader_buckets_order_and_resume(tmp_path, proc):
    ds = _read(write_data(tmp_path, 8), proc)
    assert default_buckets(300) == (64, 128, 256, 300)
    mk = lambda **kw: DataLoader(ds, proc, batch_size=2, grad_accum=2, seed=3, max_length=128,  # noqa: E731
                                 buckets=[32, 64, 128], **kw)
    a = mk()
    batches = [next(a) for _ in range(5)]  # 2 steps per epoch: crosses two epoch boundaries
    for b in batches:
        assert b["input_ids"].shape[:2] == (2, 2)
        longest = b["attention_mask"].sum(-1).max()
        assert b["input_ids"].shape[2] == min(x for x in (32, 64, 128) if x >= longest)
        assert np.all(b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX)
        assert len(b["pixel_values"]) == (b["input_ids"] == proc.image_token_id).sum() // IMAGE_TOKENS
    assert [(b["epoch"], b["index"]) for b in batches] == [(0, 4), (1, 0), (1, 4), (2, 0), (2, 4)]
    # epochs are different permutations; the same seed gives the same order
    e0 = np.sort(a.order(0).reshape(-1)), a.order(0), a.order(1)
    assert np.array_equal(e0[0], np.arange(8)) and not np.array_equal(e0[1], e0[2])
    # a fresh loader restored from the position continues exactly
    b = mk()
    b.load_state_dict(batches[2] | {"seed": 3, "num_examples": 8, "step_size": 4})
    for x, y in zip(batches[3:], [next(b), next(b)]):
        for k in ("input_ids", "labels", "attention_mask", "pixel_values"):
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(cj.ChameleonError, match="num_examples"):
        b.load_state_dict({"epoch": 0, "index": 0, "seed": 3, "num_examples": 9, "step_size": 4})
    # grouping by length: each step's rows come from one sorted window, so padding shrinks
    g = mk(length_grouping=2)
    pad = lambda ld: sum(int((1 - next(ld)["attention_mask"]).sum()) for _ in range(4))  # noqa: E731
    assert pad(g) <= pad(mk())
    with pytest.raises(cj.ChameleonError, match="fewer than one step"):
        DataLoader(ds, proc, batch_size=8, grad_accum=2, max_length=128)


def test_bad_lines_error_or_skip(tmp_path, proc):
    img = write_images(tmp_path / "images", 1)[0]
    good = {"text": "hello <image>", "images": [img]}
    cases = [
        ("{not json", r"data.jsonl:2: not valid JSON"),
        (json.dumps({"caption": "x"}), r"data.jsonl:2: needs a \"text\" field"),
        (json.dumps({"text": 3}), r"data.jsonl:2: \"text\" must be a string"),
        (json.dumps({"text": "a <image> b <image>", "images": [img]}), r"data.jsonl:2: text has 2 <image>"),
        (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"data.jsonl:2: messages\[0\]: role"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r"data.jsonl:2: .*assistant"),
        (json.dumps([1, 2]), r"data.jsonl:2: expected a JSON object"),
    ]
    for line, pattern in cases:
        path = write_records(tmp_path / "data.jsonl", [good, line, good])
        with pytest.raises(cj.ChameleonError, match=pattern):
            _read(path, proc)
        ds = _read(path, proc, skip_bad_lines=True)
        assert len(ds) == 2 and ds.stats["skipped"] == 1 and "data.jsonl:2" in ds.stats["skipped_lines"][0]
    with pytest.raises(cj.ChameleonError, match="no usable records"):
        _read(write_records(tmp_path / "data.jsonl", ["{bad"]), proc, skip_bad_lines=True)


def test_missing_image_names_the_file(tmp_path, proc):
    path = write_records(tmp_path / "data.jsonl", [{"text": "a <image>", "images": ["pics/nope.png"]}])
    with pytest.raises(cj.ChameleonError, match=r"data.jsonl:1: image file .*pics/nope.png not found"):
        _read(path, proc)


def test_too_long_errors_or_truncates_without_splitting_an_image(tmp_path, proc):
    imgs = write_images(tmp_path / "images", 2)
    rec = {"text": "hello world " * 5 + "<image> the cat <image> the dog", "images": imgs}
    path = write_records(tmp_path / "data.jsonl", [rec])
    n = len(_read(path, proc, max_length=256).examples[0])
    with pytest.raises(cj.ChameleonError, match=rf"data.jsonl:1: {n} tokens .* longer than max_length 40"):
        _read(path, proc, max_length=40)
    ex = _read(path, proc, max_length=40, truncate=True).examples[0]
    # the second image would be cut: it is dropped whole, with its file
    assert len(ex) <= 40 and ex.images == (str(tmp_path / imgs[0]),)
    assert (ex.ids == proc.image_token_id).sum() == IMAGE_TOKENS
    assert proc.boi_token_id in ex.ids and list(ex.ids).count(proc.boi_token_id) == 1
    short = _read(path, proc, max_length=20, truncate=True).examples[0]
    assert short.images == () and proc.boi_token_id not in short.ids


def test_train_config_errors(tmp_path):
    base = {"model": "m", "data": "d.jsonl"}
    with pytest.raises(cj.ChameleonError, match="unknown key.*'learning_rte'"):
        TrainConfig.from_dict({**base, "learning_rte": 1e-4})
    with pytest.raises(cj.ChameleonError, match="lora: unknown key.*'rnak'"):
        TrainConfig.from_dict({**base, "lora": {"rnak": 4}})
    with pytest.raises(cj.ChameleonError, match="lora.targets: unknown projection 'qkv'"):
        TrainConfig.from_dict({**base, "lora": {"targets": ["qkv"]}})
    with pytest.raises(cj.ChameleonError, match="batch_size: expected int"):
        TrainConfig.from_dict({**base, "batch_size": "8"})
    with pytest.raises(cj.ChameleonError, match="remat"):
        TrainConfig.from_dict({**base, "remat": "some"})
    with pytest.raises(cj.ChameleonError, match="model/data"):
        TrainConfig.from_dict({"steps": 3})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(base))
    tc = TrainConfig.from_json_file(str(path),
                                    ["learning_rate=1e-4", "lora.rank=4", "mesh.fsdp=2", "output_dir=x/y"])
    assert tc.learning_rate == 1e-4 and tc.lora.rank == 4 and tc.mesh == {"data": 1, "fsdp": 2, "tensor": 1}
    assert tc.output_dir == "x/y" and TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(cj.ChameleonError, match="mesh"):
        TrainConfig.from_json_file(str(path), ["mesh.pipeline=2"])
    path.write_text("{oops")
    with pytest.raises(cj.ChameleonError, match="c.json: not valid JSON"):
        TrainConfig.from_json_file(str(path))
    for name in ("train-tiny.json", "train-7b-tpu.json"):  # the shipped examples parse
        TrainConfig.from_json_file(str(CONFIGS / name))
