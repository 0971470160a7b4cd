"""Fuzz campaigns (tests/fuzz.py): seeded mutations of every input format must end in a ChameleonError or
succeed; any other exception, a hang or a crash fails the test, listing each case (format, index) so
``python tests/fuzz.py case FORMAT INDEX`` reproduces it.

Default tier: 50 cases per format (pth: 12, since each harmless mutation runs a whole `convert`, ~1 s);
``-m slow``: 300 per format; CHAMELEON_JAX_FUZZ_CASES=N overrides both.
"""

from __future__ import annotations

import os

import pytest

import fuzz


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fuzz.build_base(str(tmp_path_factory.mktemp("fuzzbase")))


def _cases(tier: int) -> list[tuple[str, int]]:
    env = os.environ.get("CHAMELEON_JAX_FUZZ_CASES")
    out = []
    for fmt in fuzz.FORMATS:
        n = int(env) if env else (12 if fmt == "pth" and tier == 50 else tier)
        out += [(fmt, i) for i in range(n)]
    return out


@pytest.mark.parametrize("tier", [pytest.param(50, id="default"), pytest.param(300, id="full", marks=pytest.mark.slow)])
def test_fuzz(base, tier):
    cases = _cases(tier)
    counts, failures = fuzz.campaign(cases, base)
    print(f"\nfuzz campaign ({len(cases)} cases)\n{'format':<16}{'cases':>7}{'clean_error':>13}{'succeeded':>11}"
          f"{'other':>7}")
    for fmt, c in counts.items():
        print(f"{fmt:<16}{sum(c.values()):>7}{c['clean_error']:>13}{c['succeeded']:>11}{c['other']:>7}")
    assert sum(sum(c.values()) for c in counts.values()) == len(cases)
    assert not failures, "\n".join(f"{fmt} case {i}: {kind} {detail}  (reproduce: python tests/fuzz.py case {fmt} {i})"
                                    for fmt, i, kind, detail in failures)


def test_base_inputs_are_valid(base, tmp_path):
    """Unmutated, every format's base input goes through its entry point (so "succeeded" means something)."""
    for fmt in fuzz.FORMATS:
        work = tmp_path / fmt
        work.mkdir()
        fuzz.run_entry(fmt, fuzz.mutate_case(fmt, 0, base, str(work), mutate=False), base, str(work))


def test_harness_catches_other_hang_and_crash(base):
    """The harness's own check: a stray exception, a hang and a crash each count as ``other`` (with the
    case named), and the campaign goes on after them."""
    counts, failures = fuzz.campaign([("_selftest", i) for i in range(5)], base, timeout=2)
    assert counts == {"_selftest": {"clean_error": 1, "succeeded": 1, "other": 3}}, (counts, failures)
    assert [(i, kind.split("(")[0]) for _, i, kind, _ in failures] == [(1, "other"), (3, "crash"), (4, "hang")]
    assert failures[0][3] == "KeyError" and failures[1][2] == "crash(rc=-11)"
