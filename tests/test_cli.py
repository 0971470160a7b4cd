"""The console entry point."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from chameleon_jax import cli


def test_demo_runs_and_reports(capsys, tmp_path):
    from PIL import Image

    from chameleon_jax.demo import world

    assert cli.main(["demo", "--out-dir", str(tmp_path / "out"), "--preview"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"loaded the shipped demo model in [\d.]+s", out)
    rows = re.findall(r"^  \[(ok |MISS)\] truth: (.+?)\s+model: (.*)$", out, re.M)
    assert len(rows) == 3 and all(world.parse_caption(truth) for _, truth, _ in rows)
    pngs = sorted((tmp_path / "out").glob("draw-*.png"))
    assert len(pngs) == 2 and all(str(p) in out for p in pngs)
    assert Image.open(pngs[0]).size == (256, 256)
    assert "\u2580" in out and "\x1b[38;2;" in out  # the half-block preview
    assert re.search(r"'a purple' -> 'a purple .+'", out)
    assert "Next:" in out and "chameleon-jax generate --mode image" in out


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "chameleon_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "chameleon_jax.cli", "demo", "--help"], capture_output=True, text=True)
    assert "--seed" in out.stdout and "--out-dir" in out.stdout


def test_version(capsys):
    import chameleon_jax

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"chameleon-jax {chameleon_jax.__version__}"


@pytest.mark.parametrize("flag, value, want", [
    ("--max-new-tokens", "0", "an integer >= 1"), ("--top-k", "-1", "an integer >= 0"),
    ("--top-p", "1.5", r"a value in \[0, 1\]"), ("--repetition-penalty", "0", "a number > 0"),
    ("--chunk-size", "0", "an integer >= 1"), ("--temperature", "nan", "a finite number"),
])
def test_generate_arguments_checked_before_the_model_loads(monkeypatch, capsys, flag, value, want):
    import chameleon_jax

    monkeypatch.setattr(chameleon_jax, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["generate", "--prompt", "hi", flag, value]) == 2
    assert re.search(rf"error: {re.escape(flag)}: expected {want}.*, got {re.escape(value)}", capsys.readouterr().err)


def test_generate_missing_files_named_before_the_model_loads(monkeypatch, capsys, tmp_path):
    import chameleon_jax

    monkeypatch.setattr(chameleon_jax, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["generate", "--prompt", "hi", "--image", str(tmp_path / "cat.png")]) == 2
    assert f"--image {tmp_path / 'cat.png'}: no such file" in capsys.readouterr().err
    assert cli.main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert f"--model {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


def test_library_errors_name_the_flag():
    """A check only the loaded model can make (prompt + new tokens vs max positions) comes from the
    library under the Python name; main() prints it under the flag."""
    parser = cli.build_parser()
    msg = "max_new_tokens: prompt length 5 + max_new_tokens 600 = 605 exceeds max_position_embeddings 512"
    assert cli._as_flag(msg, parser, "generate") == "--max-new-tokens" + msg[len("max_new_tokens"):]
    assert cli._as_flag("top_p: expected a value in [0, 1]", parser, "generate").startswith("--top-p: ")
    assert cli._as_flag("attention_mask: bad", parser, "generate") == "attention_mask: bad"


def test_other_commands_check_flags(capsys, tmp_path):
    assert cli.main(["export", str(tmp_path), str(tmp_path / "x"), "--max-shard-gb", "0"]) == 2
    assert "--max-shard-gb: expected a size in GiB > 0" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "c.json"), "--max-steps", "0"]) == 2
    assert "--max-steps: expected an integer >= 1" in capsys.readouterr().err


def test_generate_interleaved_mode(capsys, tmp_path):
    """The demo model completes a caption, opens an image, and the image lands in OUT-0.png."""
    from PIL import Image

    from chameleon_jax.demo import world

    out = tmp_path / "mixed.png"
    assert cli.main(["generate", "--mode", "interleaved", "--prompt", "a blue", "--text-completion",
                     "--out", str(out), "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out
    words, marker = text.strip().split("\n")[0].strip(), f"[image: {tmp_path / 'mixed-0.png'}]"
    assert marker in text
    drawn = world.classify(Image.open(tmp_path / "mixed-0.png"))
    assert world.parse_caption(f"a blue {words}") == drawn, (words, drawn)
    assert cli.main(["generate", "--mode", "interleaved", "--prompt", "a blue"]) == 2
    assert "--out: expected a PNG path for --mode interleaved" in capsys.readouterr().err
    assert cli.main(["generate", "--mode", "interleaved", "--prompt", "a", "--out", str(out),
                     "--max-images", "-1"]) == 2
    assert "--max-images: expected an integer >= 0" in capsys.readouterr().err
