"""Build a small Chameleon-shaped tokenizer directory for tests (no network, no real weights).

The vocabulary copies the layout of Chameleon's real one at a small scale:

    0 <s>, 1 <pad>, 2 </s>, 3 <unk>,
    4 .. 4+N-1          IMGIMG names of image codes 0..N-1 (plain BPE vocabulary entries),
    then <eoss>, <racm3:break>, <reserved08706>, <image> (Meta calls the last <reserved08707>),
    then the 256 byte-level symbols, the tokens made by a few merges, and filler entries up to
    ``vocab_size``.

The special tokens are both vocabulary entries and special "added tokens", as in Meta's file.
The text side is a byte-level BPE, so any Unicode text encodes without <unk>.

``build_test_tokenizer(dir)`` writes the Hugging Face layout that both this project and
transformers' ``ChameleonProcessor.from_pretrained`` read: tokenizer.json, tokenizer_config.json,
special_tokens_map.json, processor_config.json, preprocessor_config.json.
``layout="meta"`` writes Meta's original layout instead: ``tokenizer/text_tokenizer.json`` only.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from chameleon_jax import vocab as cv

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"

# Words whose byte-level spellings get merges, so common test text encodes to a few tokens.
_MERGE_WORDS = (
    "the Ġthe Ġimage Ġimages Ġcat Ġdog Ġa Ġis Ġof Ġin Ġand Ġthis Ġthat Ġwhat What Ġdescribe "
    "Describe Ġpicture Ġhello Hello Ġworld Ġtell Ġme Ġabout Ġcolor Ġcompare Ġtwo Ġone ing Ġ. ."
).split()


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that spell each word; earlier words get higher priority."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        current = word[0]
        for ch in word[1:]:
            pair = (current, ch)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            current += ch
    return merges


def build_tokenizer_object(
    num_image_codes: int = 16,
    vocab_size: int | None = None,
    meta_names: bool = False,
    shuffle_seed: int | None = None,
) -> tuple[Tokenizer, dict[str, int]]:
    """The test tokenizer as a ``tokenizers.Tokenizer`` plus its vocabulary map (name -> id).

    No post-processor is set (Meta's file has none; the processor adds BOS for that layout).
    """
    image_token = cv.META_IMAGE_TOKEN if meta_names else cv.IMAGE_TOKEN
    specials_head = [BOS, PAD, EOS, UNK]
    specials_tail = [cv.EOI_TOKEN, cv.BOI_TOKEN, cv.SEP_TOKEN, image_token]
    names: list[str] = list(specials_head)
    codes = list(range(num_image_codes))
    if shuffle_seed is not None:  # ids 4.. hold the codes in a shuffled order, to catch order assumptions
        random.Random(shuffle_seed).shuffle(codes)
    names += [cv.image_code_name(c) for c in codes]
    names += specials_tail
    names += sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _merges_for(list(_MERGE_WORDS))
    for a, b in merges:
        if a + b not in names:
            names.append(a + b)
    if vocab_size is not None:
        if vocab_size < len(names):
            raise ValueError(f"vocab_size={vocab_size} is below the {len(names)} entries needed")
        names += [f"<filler{i}>" for i in range(vocab_size - len(names))]
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise AssertionError("duplicate vocabulary names")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials_head + specials_tail]
    )
    vocabulary_map = dict(vocab)
    if meta_names:
        vocabulary_map[cv.IMAGE_TOKEN] = vocabulary_map.pop(cv.META_IMAGE_TOKEN)
    return tok, vocabulary_map


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_test_tokenizer(
    directory: str | os.PathLike,
    num_image_codes: int = 16,
    vocab_size: int | None = None,
    image_seq_length: int = 1024,
    image_size: int = 512,
    layout: str = "hf",
    add_bos_token: bool = True,
    add_eos_token: bool = False,
    padding_side: str = "left",
    shuffle_seed: int | None = None,
) -> dict[str, int]:
    """Write a test tokenizer (and image-processor config) into ``directory``.

    Args:
      directory: created if missing.
      num_image_codes: IMGIMG names for codes 0..num_image_codes-1 at ids 4..4+num_image_codes-1
        (code c at id 4+c unless shuffle_seed is given).
      vocab_size: pad the vocabulary with filler entries up to this size (None: natural size).
      image_seq_length: tokens per image written to processor_config.json (HF layout only).
      image_size: shortest-edge resize and square crop size in preprocessor_config.json.
      layout: "hf" (tokenizer.json + configs) or "meta" (tokenizer/text_tokenizer.json with
        <reserved08707> in place of <image>, nothing else).
      add_bos_token, add_eos_token: whether tokenizer.json's post-processor adds <s> / </s>
        (HF layout; also recorded in tokenizer_config.json, as the real files do).
      padding_side: written to tokenizer_config.json (HF layout).
      shuffle_seed: if given, the IMGIMG names occupy ids 4.. in a shuffled code order.

    Returns:
      The vocabulary map (token name -> id) in HF spelling (``<image>``), i.e. what a
      ``ChameleonConfig.vocabulary_map`` for this tokenizer holds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "meta":
        tok, vocabulary_map = build_tokenizer_object(
            num_image_codes, vocab_size, meta_names=True, shuffle_seed=shuffle_seed
        )
        (directory / "tokenizer").mkdir(exist_ok=True)
        tok.save(str(directory / "tokenizer" / "text_tokenizer.json"))
        return vocabulary_map
    if layout != "hf":
        raise ValueError(f"layout must be 'hf' or 'meta', got {layout!r}")

    tok, vocabulary_map = build_tokenizer_object(num_image_codes, vocab_size, shuffle_seed=shuffle_seed)
    # Transformers 5 takes BOS/EOS from tokenizer.json's post-processor (it ignores add_bos_token in
    # tokenizer_config.json when tokenizer.json exists); the real HF file prepends <s> this way.
    bos = [f"{BOS}:0"] if add_bos_token else []
    eos = [f"{EOS}:0"] if add_eos_token else []
    if bos or eos:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(bos + ["$A:0"] + eos),
            pair=" ".join(bos + ["$A:0"] + eos + [b.replace(":0", ":1") for b in bos] + ["$B:1"]
                          + [e.replace(":0", ":1") for e in eos]),
            special_tokens=[(t, vocabulary_map[t]) for t in [BOS] * add_bos_token + [EOS] * add_eos_token],
        )
    tok.save(str(directory / "tokenizer.json"))
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "sep_token": cv.SEP_TOKEN,
    }
    _write_json(
        directory / "tokenizer_config.json",
        {
            **special,
            "add_bos_token": add_bos_token,
            "add_eos_token": add_eos_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "padding_side": padding_side,
            "processor_class": "ChameleonProcessor",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(directory / "special_tokens_map.json", special)
    _write_json(
        directory / "processor_config.json",
        {
            "image_seq_length": image_seq_length,
            "image_token": cv.IMAGE_TOKEN,
            "processor_class": "ChameleonProcessor",
        },
    )
    _write_json(
        directory / "preprocessor_config.json",
        {
            "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [1.0, 1.0, 1.0],
            "image_processor_type": "ChameleonImageProcessor",
            "image_std": [1.0, 1.0, 1.0],
            "processor_class": "ChameleonProcessor",
            "resample": 1,
            "rescale_factor": 0.0078,
            "size": {"shortest_edge": image_size},
        },
    )
    return vocabulary_map
