"""The console entry point."""

from __future__ import annotations

import re
import subprocess
import sys

from chameleon_jax import cli


def test_demo_runs_and_reports(capsys):
    assert cli.main(["demo", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"loaded in [\d.]+s: [\d,]+ params", out)
    assert "1 image of 32x32 px -> 256 image tokens" in out
    assert re.search(r"forward: \d+ ms first call \(compile\), [\d.]+ ms steady state", out)
    tops = re.findall(r"^\s+(\d+)\s+(\S+)\s+logit ([+-][\d.]+)$", out, re.M)
    assert len(tops) == 3
    logits = [float(t[2]) for t in tops]
    assert logits == sorted(logits, reverse=True)
    assert all(name.startswith("tok") for _, name, _ in tops)  # image tokens are suppressed


def test_help_explains_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "chameleon_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "chameleon_jax.cli", "demo", "--help"], capture_output=True, text=True)
    assert "--seed" in out.stdout and "--top" in out.stdout
