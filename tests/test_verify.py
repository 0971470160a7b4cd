"""convert/verify.py: passes on a faithful conversion, fails on a perturbed tensor, clear bad-input errors."""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from chameleon_jax import cli
from conftest import NUM_CODES, build_hf_model
from tokenizer_utils import build_test_tokenizer

VERIFY_PY = Path(__file__).resolve().parent.parent / "convert" / "verify.py"
NEW_TOKENS = 6


def _load_verify():
    spec = importlib.util.spec_from_file_location("chameleon_convert_verify", VERIFY_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verify_py = _load_verify()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(HF reference dir with tokenizer + processor files, its `chameleon-jax convert` output)."""
    root = tmp_path_factory.mktemp("verify")
    ref = root / "hf"
    vm = build_test_tokenizer(ref, num_image_codes=NUM_CODES, vocab_size=448, image_seq_length=64,
                              image_size=16, shuffle_seed=5)
    build_hf_model(ref, seed=71, vocab_size=448, vocabulary_map=vm, num_key_value_heads=2,
                   pad_token_id=vm["<pad>"], bos_token_id=vm["<s>"], eos_token_id=vm["</s>"])
    converted = root / "converted"
    assert cli.main(["convert", str(ref), str(converted), "--quiet"]) == 0
    return ref, converted


def test_faithful_conversion_passes(dirs):
    ref, converted = dirs
    report = io.StringIO()
    res = verify_py.verify(ref, converted, max_new_tokens=NEW_TOKENS, out=report)  # the default two prompts
    out = report.getvalue()
    print(out)  # shown with -s: what a user sees
    assert res["ok"] and len(res["prompts"]) == 2
    assert out.count("  PASS") == 2 and "FAIL" not in out
    assert out.rstrip().splitlines()[-1].startswith("PASS: 2/2 prompt(s) passed")
    text, image = res["prompts"]
    assert (text["n_images"], image["n_images"]) == (0, 1) and image["n_tokens"] > 64 + 2
    for p in res["prompts"]:
        assert p["max_rel_err"] < 1e-4 and p["max_abs_err"] < 1e-4 and p["ok"]
        assert p["agreement"] == 1.0 and p["first_divergence"] is None
        assert p["ref_tokens"] == p["our_tokens"] and len(p["ref_tokens"]) == NEW_TOKENS
        assert p["processor_ids_equal"]
    assert image["image_codes_equal"] and image["pixel_max_abs_diff"] < 1e-6
    assert text["image_codes_equal"] is None and text["pixel_max_abs_diff"] is None
    assert "64/64 image tokens equal" in out


def test_perturbed_tensor_fails(dirs, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    ref, _ = dirs
    bad = tmp_path / "bad"
    shutil.copytree(ref, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    # One row only: a shift shared by every row of a head would be invisible, the q LayerNorm
    # (over head_dim) subtracts it again.
    tensors["model.layers.1.self_attn.q_proj.weight"][0] += np.float32(0.5)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})

    argv = ["--reference", str(ref), "--converted", str(bad), "--max-new-tokens", str(NEW_TOKENS),
            "--prompt", "Hello world, tell me about the image"]  # one prompt keeps the test short
    assert verify_py.main(argv) == 1
    out = capsys.readouterr().out
    print(out)
    assert "  FAIL" in out and "BAD" in out
    assert out.rstrip().splitlines()[-1].startswith("FAIL: 0/1 prompt(s) passed")


def test_bad_input_exits_2(dirs, tmp_path, capsys):
    ref, converted = dirs
    assert verify_py.main(["--reference", str(tmp_path / "nope"), "--converted", str(converted)]) == 2
    assert f"--reference {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    assert verify_py.main(["--reference", str(ref), "--converted", str(tmp_path / "gone")]) == 2
    assert f"--converted {tmp_path / 'gone'}: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert verify_py.main(["--reference", str(tmp_path / "empty"), "--converted", str(converted)]) == 2
    assert "no config.json" in capsys.readouterr().err
    argv = ["--reference", str(ref), "--converted", str(converted), "--prompt", "<image><image>",
            "--image", str(tmp_path / "missing.png")]
    assert verify_py.main(argv) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    img = tmp_path / "one.png"
    verify_py.synthetic_image().save(img)
    assert verify_py.main(argv[:-1] + [str(img)]) == 2
    assert "1 image(s) given but the prompts hold 2 <image> placeholder(s)" in capsys.readouterr().err


def test_tokens_after_end_of_sequence_are_not_compared():
    # transformers stops (or pads with its own pad id) after EOS; chameleon-jax pads with pad_token_id
    ref = verify_py._cut_after_stop(np.array([7, 2, -1, -1]), {2})
    ours = verify_py._cut_after_stop(np.array([7, 2, 1, 1]), {2})
    assert ref.tolist() == ours.tolist() == [7, 2, -1, -1]
    assert verify_py._agreement(ref, ours) == (1.0, None)
    assert verify_py._agreement(np.array([7, 5, 6, 9]), np.array([7, 5, 4, 9])) == (0.75, 2)
