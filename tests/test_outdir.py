"""Output directories (checkpoint/outdir.py): convert / export / train refuse an output that is,
contains or lies inside their source, touching nothing; temp dirs of killed writers are removed
by the next run, and nothing else beside the output is."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from chameleon_jax import ChameleonError, cli
from chameleon_jax.checkpoint import outdir
from chameleon_jax.checkpoint.convert import convert
from chameleon_jax.training import TrainConfig, Trainer
from conftest import build_hf_model


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("outdir") / "hf"
    build_hf_model(d, seed=3, num_hidden_layers=1)
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("outdir-orbax") / "orbax"
    convert(str(src), str(d), progress=False)
    return d


def _snapshot(root) -> dict:
    """Every entry under ``root``: file bytes, or None for a directory (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _layout(tmp_path, source, case):
    """work/src (a copy of ``source``), work/unrelated.txt and link -> work; (work, SRC, DST) of ``case``."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(source, work / "src")
    (work / "unrelated.txt").write_text("not ours")
    link = tmp_path / "link"
    os.symlink(work, link)
    src, dst = {
        "same": (work / "src", work / "src"),
        "contains": (work / "src", work),
        "inside": (work / "src", work / "src" / "out"),
        "same_via_symlink": (work / "src", link / "src"),
        "contains_via_symlink": (link / "src", work),
    }[case]
    return work, str(src), str(dst)


CASES = ["same", "contains", "inside", "same_via_symlink", "contains_via_symlink"]
RELATION = {"same": "is", "contains": "contains", "inside": "lies inside", "same_via_symlink": "is",
            "contains_via_symlink": "contains"}


@pytest.mark.parametrize("case", CASES)
def test_convert_refuses_dst_overlapping_src(src, tmp_path, case, capsys):
    work, s, d = _layout(tmp_path, src, case)
    before = _snapshot(work)
    assert cli.main(["convert", s, d, "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"DST {d} {RELATION[case]} the source {s}" in err, err
    if "symlink" in case:
        assert "resolved:" in err
    assert _snapshot(work) == before  # byte for byte, nothing added or removed
    assert sorted(os.listdir(tmp_path)) == ["link", "work"]  # no temp dir either


@pytest.mark.parametrize("case", ["same", "contains", "inside"])
def test_export_refuses_dst_overlapping_src(converted, tmp_path, case, capsys):
    work, s, d = _layout(tmp_path, converted, case)
    before = _snapshot(work)
    assert cli.main(["export", s, d, "--overwrite"]) == 2
    assert f"DST {d} {RELATION[case]} the source {s}" in capsys.readouterr().err
    assert _snapshot(work) == before


def test_convert_refuses_dst_inside_meta_tokenizer_dir(tmp_path):
    """A Meta model dir finds its tokenizer dir outside itself: DST may not land in either."""
    from types import SimpleNamespace

    from chameleon_jax.checkpoint import convert as convert_mod

    model_dir, tok_dir = tmp_path / "release" / "models" / "7b", tmp_path / "release" / "tokenizer"
    model_dir.mkdir(parents=True)
    tok_dir.mkdir()
    fake = SimpleNamespace(model_dir=str(model_dir), tokenizer_dir=str(tok_dir))
    orig = convert_mod.open_source
    convert_mod.open_source = lambda *a: ("meta", None, fake, None)
    try:
        with pytest.raises(ChameleonError, match=r"lies inside the source's tokenizer directory"):
            convert(str(model_dir), str(tok_dir / "out"), progress=False)
    finally:
        convert_mod.open_source = orig
    assert os.listdir(tok_dir) == []


@pytest.mark.parametrize("case", ["same", "contains", "inside"])
def test_train_refuses_output_dir_overlapping_model(src, tmp_path, case, capsys):
    work, s, d = _layout(tmp_path, src, case)
    before = _snapshot(work)
    tc = TrainConfig(model=s, data=str(tmp_path / "data.jsonl"), output_dir=d, steps=1)
    with pytest.raises(ChameleonError, match=rf"train config: output_dir {d} {RELATION[case]} the model {s}"):
        Trainer(tc, log=None)  # refused before the model is loaded (data.jsonl does not even exist)
    if case == "contains":
        cfg = tmp_path / "train.json"
        cfg.write_text(json.dumps(tc.to_dict()))
        assert cli.main(["train", "--config", str(cfg)]) == 2
        assert "output_dir" in capsys.readouterr().err
    assert _snapshot(work) == before


# ------------------------------------------------------------------ leftovers of killed writers
_KILLED_CONVERT = """
import sys, time
from chameleon_jax.checkpoint import convert as c, orbax
real = orbax.write_orbax
def write_then_hang(directory, *a, **k):
    real(directory, *a, **k)
    print(directory, flush=True)
    time.sleep(600)
orbax.write_orbax = write_then_hang
c.convert(sys.argv[1], sys.argv[2], progress=False)
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_killed_convert_leftover_is_removed_by_the_next_run(src, tmp_path):
    dst = tmp_path / "dst"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CONVERT, str(src), str(dst)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        tmp = proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert tmp and os.path.isdir(tmp) and os.listdir(tmp), "the writer should have died mid-convert"
    assert os.path.dirname(tmp) == str(tmp_path) and not dst.exists()
    # Beside DST but not a dead writer's: a look-alike of ours, one of another host, a live one (ours)
    # and an unrelated hidden dir. None of these may be touched.
    host = outdir._host()
    keep = [".dst.mine", f".dst.chameleon-tmp.{host}x.{_dead_pid()}.abc",
            f".dst.chameleon-tmp.{host}.{os.getpid()}.abc", ".dst.chameleon-tmp.not-a-pid.x"]
    for name in keep:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    with pytest.warns(UserWarning, match=r"removed a temp dir left by a killed writer \(pid \d+\)"):
        convert(str(src), str(dst), progress=False)
    assert not os.path.exists(tmp)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["dst"])


def test_writer_killed_between_its_renames_gets_the_previous_version_back(tmp_path):
    """Killed after moving DST's previous version aside and before renaming the new one in: the
    previous version is the only complete copy, so the next run puts it back."""
    host, pid = outdir._host(), _dead_pid()
    old = tmp_path / f".dst.chameleon-old.{host}.{pid}.k2j3"
    new = tmp_path / f".dst.chameleon-tmp.{host}.{pid}.a8f1"
    (old / "x").mkdir(parents=True)
    (old / "x" / "weights").write_text("previous")
    new.mkdir()
    (new / "weights").write_text("next")
    with pytest.warns(UserWarning) as record:
        with pytest.raises(ChameleonError, match="already exists"):
            with outdir.atomic_dir(str(tmp_path / "dst")):
                pass
    messages = [str(w.message) for w in record]
    assert len(messages) == 3 and sum("restored the previous version" in m for m in messages) == 1
    assert sum("removed a temp dir left by a killed writer" in m for m in messages) == 2
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    assert (tmp_path / "dst" / "weights").read_text() == "previous"


def test_temp_dir_of_an_older_version_is_reported_not_removed(tmp_path):
    (tmp_path / ".dst.tmpab12_x9z").mkdir()
    with pytest.warns(UserWarning, match=r"\.dst\.tmpab12_x9z: looks like a temp dir left by a killed writer"):
        with outdir.atomic_dir(str(tmp_path / "dst")) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
    assert sorted(os.listdir(tmp_path)) == [".dst.tmpab12_x9z", "dst"]
