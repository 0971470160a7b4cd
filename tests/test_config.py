"""ChameleonConfig <-> HF config.json, both spellings of RoPE, presets."""

from __future__ import annotations

import json

import pytest
import transformers

import chameleon_jax as cj
from chameleon_jax import ChameleonConfig, ChameleonError
from conftest import hf_config, make_vocabulary_map


def test_roundtrip_through_transformers(tmp_path):
    hf = hf_config(num_key_value_heads=2, swin_norm=True, model_parallel_size=2, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0})
    hf.save_pretrained(str(tmp_path / "a"))
    ours = ChameleonConfig.from_json_file(tmp_path / "a" / "config.json")
    assert (ours.num_key_value_heads, ours.swin_norm, ours.model_parallel_size) == (2, True, 2)
    assert (ours.rope_type, ours.rope_factor, ours.rope_theta) == ("linear", 3.0, 500.0)
    assert ours.tie_word_embeddings and ours.vq_config.channel_multiplier == (1, 2)
    ours.to_json_file(tmp_path / "b.json")
    back = transformers.ChameleonConfig.from_json_file(str(tmp_path / "b.json"))
    for k in ("hidden_size", "num_key_value_heads", "swin_norm", "model_parallel_size", "tie_word_embeddings",
              "vocabulary_map", "pad_token_id", "eos_token_id"):
        assert getattr(back, k) == getattr(hf, k), k
    assert back.rope_parameters["factor"] == 3.0 and back.rope_parameters["rope_type"] == "linear"
    assert back.vq_config.to_dict()["attn_resolutions"] == [8]
    assert ChameleonConfig.from_json_file(tmp_path / "b.json") == ours


def test_old_spelling_rope_scaling():
    d = {"model_type": "chameleon", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 1234.0,
         "rope_scaling": {"type": "dynamic", "factor": 2.0}, "qk_layernorm": True, "torch_dtype": "float32"}
    c = ChameleonConfig.from_hf_dict(d)
    assert (c.rope_type, c.rope_factor, c.rope_theta) == ("dynamic", 2.0, 1234.0)
    assert c.num_key_value_heads == 4 and c.vq_config is None
    d["rope_scaling"] = None
    assert ChameleonConfig.from_hf_dict(d).rope_type == "default"


def test_image_vocab_from_vocabulary_map():
    vm = make_vocabulary_map(256)
    c = ChameleonConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, vocabulary_map=vm)
    v = c.image_vocab
    assert v.image_token_id == vm["<image>"]
    assert len(v.image_token_ids) == 64 and list(v.image_token_ids) == sorted(v.image_token_ids)
    assert v.code_to_bpe[12] == vm["IMGIMGBCZ"]
    assert list(v.bpe_to_codes(v.codes_to_bpe([0, 5, 63]))) == [0, 5, 63]
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 64\)"):
        v.codes_to_bpe([64])


def test_invalid_combinations():
    with pytest.raises(ChameleonError, match="divisible by num_key_value_heads"):
        ChameleonConfig(num_attention_heads=32, num_key_value_heads=5)
    with pytest.raises(ChameleonError, match=r"channel counts must be multiples of 32"):
        cj.VQConfig.from_dict({"base_channels": 48})
    with pytest.raises(ChameleonError, match=r"expected a JSON object"):
        ChameleonConfig.from_hf_dict([1, 2])


def test_presets_load():
    c = cj.load_preset("chameleon-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size) == (4096, 32, 11008)
    assert json.loads(json.dumps(c.to_hf_dict()))["model_type"] == "chameleon"


def test_fields_transformers_writes_from_kwargs_load_with_one_warning(tmp_path):
    """transformers' save_pretrained writes any kwarg it was given, and loads such files: so do we."""
    hf = hf_config(hidden_dropout_prob=0.1, type_vocab_size=2)
    hf.save_pretrained(str(tmp_path))
    transformers.ChameleonConfig.from_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match=r"ignoring field\(s\) this project does not know: hidden_dropout_prob, "
                                         r"type_vocab_size\. ") as record:
        ours = ChameleonConfig.from_json_file(tmp_path / "config.json")
    assert len(record) == 1
    assert ours == ChameleonConfig.from_hf_dict({k: v for k, v in json.loads(
        (tmp_path / "config.json").read_text()).items() if k not in ("hidden_dropout_prob", "type_vocab_size")})
