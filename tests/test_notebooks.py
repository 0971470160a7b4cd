"""The notebooks run top to bottom in a fresh kernel, and their stored outputs are a real run's.

Each notebook executes in its own kernel (this venv's Python, no JAX_NUM_CPU_DEVICES inherited from the
test session) with a temporary working directory, as a user's fresh runtime would; these runs are the second
tier (`make test-notebooks`, marker ``notebooks``), the stored-output checks run in every `make test`. Refresh the stored
outputs after changing a notebook (runs all four, about 3 minutes on a 2-core CPU)::

    python tests/test_notebooks.py            # or: python tests/test_notebooks.py 03_finetune_lora
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook runs need the test extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="notebook runs need the test extra (nbformat, nbclient, ipykernel)")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = ["01_quickstart", "02_image_generation", "03_finetune_lora", "04_convert_and_shard"]
MAX_BYTES = 2 * 2**20
KERNEL = "chameleon-jax-tests"


def _kernel_env(home: str) -> dict:
    """This interpreter as the kernel, found through a kernelspec of our own under ``home``."""
    spec = os.path.join(home, "kernels", KERNEL)
    os.makedirs(spec, exist_ok=True)
    with open(os.path.join(spec, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": KERNEL, "language": "python"}, f)
    # XLA_FLAGS stays: under pytest it holds conftest's test-only compile settings.
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(JUPYTER_PATH=home, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    return env


def execute(name: str):
    """Run notebook ``name`` in a fresh kernel; returns the executed notebook (raises on a cell error)."""
    nb = nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)
    with tempfile.TemporaryDirectory() as work, tempfile.TemporaryDirectory() as home:
        env = _kernel_env(home)
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = home  # where the client looks the kernelspec up
        try:
            client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                                             resources={"metadata": {"path": work}})
            client.execute(env=env)
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def outputs(nb, kind: str = "text") -> list:
    """All stream texts (kind "text") or base64 PNGs (kind "png") of a notebook's code cells."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if kind == "text" and out.output_type == "stream":
                found.append(out.text)
            elif kind == "png" and "data" in out and "image/png" in out.data:
                found.append(out.data["image/png"])
    return found


def loss_numbers(nb) -> tuple[float, float]:
    text = "".join(outputs(nb))
    m = re.search(r"loss: first 5 steps ([0-9.]+), last 5 steps ([0-9.]+)", text)
    assert m, "the fine-tuning notebook printed no loss summary"
    return float(m.group(1)), float(m.group(2))


def _checks(name: str, nb) -> None:
    """What each notebook must show, asserted on its outputs (executed now or stored)."""
    text = "".join(outputs(nb))
    if name == "01_quickstart":
        assert "model: " in text and "Chameleon-7B decoder:" in text
    if name == "02_image_generation":
        assert len(outputs(nb, "png")) >= 5, "expected inline PNGs: one drawing, the guidance grid, interleaved images"
        assert "guidance-grid.png (400, 400)" in text and "interleaved-0.png" in text
    if name == "03_finetune_lora":
        first, last = loss_numbers(nb)
        assert last < 0.8 * first, (first, last)
        assert "'a crimson square' drawn in:" in text and "resumed at step 60" in text
    if name == "04_convert_and_shard":
        assert "identical after convert + export: True" in text and "sharded == one device: True" in text
        assert "8 devices" in text


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_has_the_outputs_of_a_run(name):
    path = os.path.join(NOTEBOOK_DIR, f"{name}.ipynb")
    assert os.path.getsize(path) < MAX_BYTES
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "stored without outputs: refresh it"
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    _checks(name, nb)
    # Only the package's public API: `import chameleon_jax as cj` and its demo world, no private helpers.
    source = "\n".join(c.source for c in code)
    assert set(re.findall(r"chameleon_jax\.(\w+)", source)) <= {"demo"}, "notebooks use the public API only"
    assert not re.search(r"\bcj\.\w+\._", source)


@pytest.mark.notebooks  # second tier: `make test-notebooks` (CI runs it after `make test`)
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom_in_a_fresh_kernel(name):
    _checks(name, execute(name))


if __name__ == "__main__":  # refresh the stored outputs
    for name in sys.argv[1:] or NAMES:
        nb = execute(name)
        _checks(name, nb)
        path = os.path.join(NOTEBOOK_DIR, f"{name}.ipynb")
        nbformat.write(nb, path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB")
