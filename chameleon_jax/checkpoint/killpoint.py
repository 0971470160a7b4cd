"""Deterministic kill points for the reliability tests (tests/test_kill.py).

Every write path calls :func:`point` at each file write / rename step. With the environment
variable ``CHAMELEON_JAX_KILL_AT=k`` the process SIGKILLs itself at the k-th call; with
``CHAMELEON_JAX_KILL_COUNT=path`` each call appends its label to ``path`` (to learn how many
points an operation has). Unset (the normal case) a call costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_count = 0


def point(label: str) -> None:
    kill_at, count_file = os.environ.get("CHAMELEON_JAX_KILL_AT"), os.environ.get("CHAMELEON_JAX_KILL_COUNT")
    if kill_at is None and count_file is None:
        return
    global _count
    _count += 1
    if count_file:
        with open(count_file, "a", encoding="utf-8") as f:
            f.write(f"{_count} {label}\n")
    if kill_at is not None and _count == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
