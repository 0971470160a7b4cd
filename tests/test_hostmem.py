"""hostmem.reuse_freed_memory: XLA:CPU temporaries stop page-faulting in afresh on every call.

Each case runs in a fresh interpreter (the setting is process-wide and must come before JAX starts):
a jitted function with ~128 MiB of temporaries, called 16 times, reports the minor page faults of each
call. Without the setting every call faults its temporaries in (~32,000 pages); with it most calls after
the first few fault (almost) none (now and then one lands in fresh memory again, more often when the
machine is busy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import chameleon_jax as cj
applied = cj.reuse_freed_memory() if sys.argv[1] == "reuse" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x[::-1]) + jnp.exp(x), axis=0))  # two [32768, 512] temps
x = jnp.ones((32768, 512), jnp.float32)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
late = cj.reuse_freed_memory() if sys.argv[1] == "late" else None
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"applied": applied, "late": late, "faults": faults, "temp_pages": temp // 4096}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_reuse_freed_memory_stops_page_faults():
    default = _run("default")
    if min(default["faults"][-8:]) < default["temp_pages"] // 4:
        pytest.skip(f"this allocator does not page-fault XLA's temporaries anew per call ({default}); "
                    "nothing for the setting to fix")
    reuse = _run("reuse")
    assert reuse["applied"] is True
    # once the heap has grown to fit, calls reuse its pages: most of the last 8 take (almost) no faults,
    # where without the setting each of them faulted at least a quarter of the temporaries in (the skip above)
    quiet = [n < default["temp_pages"] // 50 for n in reuse["faults"][-8:]]
    assert sum(quiet) >= 4, (default, reuse)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_reuse_freed_memory_refused_after_jax_started():
    assert _run("late")["late"] is False
