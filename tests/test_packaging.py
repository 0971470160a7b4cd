"""The built wheel carries the package data: presets load from an install outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_install_loads_preset(tmp_path):
    # No build isolation and no index: nothing is downloaded; the test venv's setuptools builds it.
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(wheels), ROOT], check=True, cwd=tmp_path)
    (wheel,) = list(wheels.glob("chameleon_jax-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Install the wheel's files (a wheel is a zip laid out for site-packages), then borrow the test
    # venv's dependencies (jax, flax, ...) through a path entry placed after it. The editable
    # install's finder in that directory is not activated by a plain path entry.
    members = zipfile.ZipFile(wheel).infolist()
    demo_bytes = sum(m.file_size for m in members if m.filename.startswith("chameleon_jax/demo/checkpoint/"))
    assert 0 < demo_bytes <= 15 * 2**20, demo_bytes  # the shipped demo weights: at most 15 MB
    assert not any("/stages/" in m.filename for m in members)  # training intermediates stay in the repo
    zipfile.ZipFile(wheel).extractall(site)
    with open(os.path.join(site, "zz_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import chameleon_jax as cj, os; c = cj.load_preset('chameleon-7b'); "
            "print(os.path.dirname(cj.__file__)); print(c.num_hidden_layers, c.hidden_size, "
            "cj.load_preset('chameleon-30b').num_hidden_layers); d = cj.demo.checkpoint_dir(); "
            "print(d); print(cj.load(d).config.vq_config.tokens_per_image)")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.split("\n")
    assert out[0].startswith(site), out  # the installed copy, not the source tree
    assert out[1] == "32 4096 48"
    assert out[2].startswith(site) and out[3] == "64", out  # the shipped demo model is package data
