"""Hub ids resolve through huggingface_hub's cache, offline (a fake cache laid out as the Hub lays it out)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import chameleon_jax as cj

huggingface_hub = pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(root, repo_id: str, source: str) -> str:
    """<root>/models--owner--name/{refs/main, snapshots/<commit>/<files -> ../../blobs/...>}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap, blobs = repo / "snapshots" / COMMIT, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name in os.listdir(source):
        blob = blobs / f"blob-{name}"
        shutil.copy2(os.path.join(source, name), blob)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    return str(snap)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = _fake_cache(cache, "someone/shapes-demo", cj.demo.checkpoint_dir())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snap


def test_hub_id_loads_from_the_cache(offline_cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder called someone/shapes-demo
    model = cj.load("someone/shapes-demo")
    proc = cj.ChameleonProcessor.from_pretrained("someone/shapes-demo")
    local = cj.load(cj.demo.checkpoint_dir())
    ids = proc(text=["a red circle"], return_for_text_completion=True)["input_ids"]
    np.testing.assert_array_equal(model.logits(ids), local.logits(ids))
    assert proc.image_seq_length == 64


def test_hub_errors_are_clear(offline_cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cj.ChameleonError, match=r"nobody/missing: not a local path, not in the Hugging Face cache "
                                               r".*offline mode is on"):
        cj.load("nobody/missing")
    # a local path that merely looks like an id is never sent to the Hub
    with pytest.raises(cj.ChameleonError, match="no such directory"):
        cj.load("./not/there")
    from huggingface_hub import errors

    httpx = pytest.importorskip("httpx2")  # huggingface_hub 2.x speaks httpx2
    url = "https://huggingface.co/api/models/facebook/chameleon-7b"
    response = httpx.Response(403, request=httpx.Request("GET", url))

    def gated(*a, **k):  # what huggingface_hub raises for a gated repo without access
        raise errors.GatedRepoError("403 Client Error: access to this repo is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(cj.ChameleonError, match=r"facebook/chameleon-7b: the Hub repo is gated .*HF_TOKEN"):
        cj.ChameleonProcessor.from_pretrained("facebook/chameleon-7b")


def test_no_network_and_not_cached(monkeypatch, tmp_path):
    from huggingface_hub import errors

    monkeypatch.chdir(tmp_path)
    seen = {}

    def unreachable(repo_id, **kw):  # huggingface_hub's answer when the Hub is unreachable and nothing is cached
        seen.update(kw)
        raise errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(cj.ChameleonError, match=r"facebook/chameleon-7b: .*could not be reached \(no network\?\)"):
        cj.load("facebook/chameleon-7b", revision="main")
    assert seen["local_files_only"] is False and seen["revision"] == "main"
    assert all(not p.endswith((".bin", ".pth", ".pt")) for p in seen["allow_patterns"])  # never pickles
