"""Output directories: never onto, around or inside a source; written atomically; leftovers of
killed writers removed by the next run.

Every directory this project writes (convert, export, a training run's export, LoRA adapters)
goes through :func:`atomic_dir`: the content is written into a hidden temp dir beside the target
and renamed into place at the end. A writer killed with SIGKILL cannot clean up after itself,
so the temp dir's name says whose it is::

    .<target name>.chameleon-tmp.<host>.<pid>.<random>   the new content being written
    .<target name>.chameleon-old.<host>.<pid>.<random>   the previous version, during a replace

The next :func:`atomic_dir` on the same target removes the ones whose writer is gone (same host,
pid no longer running); nothing else beside the target is touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import warnings
from typing import Iterable

from ..errors import ChameleonError
from .killpoint import point

_TAG = "chameleon"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process on this host (unsure counts as running)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _temp_pattern(base: str) -> re.Pattern:
    return re.compile(re.escape(f".{base}.{_TAG}-") + r"(tmp|old)\.([A-Za-z0-9-]+)\.(\d+)\.[A-Za-z0-9_]+")


def _make_temp(parent: str, base: str, kind: str) -> str:
    return tempfile.mkdtemp(prefix=f".{base}.{_TAG}-{kind}.{_host()}.{os.getpid()}.", dir=parent)


def remove_stale_temp_dirs(directory: str) -> list[str]:
    """Remove the temp dirs that killed writers of ``directory`` left beside it; returns their paths.

    Only names of :func:`atomic_dir`'s pattern (see the module docstring) whose pid is not running
    on this host are removed. A writer killed between its two renames left ``directory`` absent
    and the previous version in its ``-old`` dir: that version is moved back first. Temp dirs of
    older versions of this project (``.<name>.tmpXXXXXXXX``, no owner in the name) are reported
    with a warning, not removed.
    """
    directory = os.path.abspath(directory)
    parent, base = os.path.split(directory)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    pattern, host = _temp_pattern(base), _host()
    legacy = re.compile(re.escape(f".{base}.") + r"(tmp|old)[a-z0-9_]{8}")
    removed = []
    # "-old" dirs first: one may hold the only copy of the previous version (see above).
    for name in sorted(entries, key=lambda n: f".{_TAG}-old." not in n):
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        m = pattern.fullmatch(name)
        if m is None:
            if legacy.fullmatch(name):
                warnings.warn(f"{path}: looks like a temp dir left by a killed writer of {directory} (an older "
                              "chameleon-jax); remove it by hand if no conversion is running", stacklevel=4)
            continue
        kind, owner, pid = m[1], m[2], int(m[3])
        if owner != host or _pid_alive(pid):
            continue  # another machine's writer, or one still running: not ours to judge
        if kind == "old" and not os.path.lexists(directory) and os.path.isdir(os.path.join(path, "x")):
            os.replace(os.path.join(path, "x"), directory)
            warnings.warn(f"{directory}: restored the previous version from {path}, left by a writer (pid {pid}) "
                          "killed while replacing it", stacklevel=4)
        shutil.rmtree(path, ignore_errors=True)
        warnings.warn(f"{path}: removed a temp dir left by a killed writer (pid {pid}) of {directory}", stacklevel=4)
        removed.append(path)
    return removed


def check_output(dst: str, sources: Iterable[tuple[str, str | None]], what: str = "DST") -> None:
    """Refuse an output ``dst`` that is, contains or lies inside one of ``sources`` ((label, path)
    pairs; None paths are skipped), comparing resolved real paths (symlinks followed). Writing
    there would replace or alter the source. Raises ChameleonError before anything is written."""
    real_dst = os.path.realpath(dst)
    for label, src in sources:
        if src is None or not os.path.lexists(src):
            continue  # nothing there to protect (and a missing source gets its own error)
        real_src = os.path.realpath(src)
        common = os.path.commonpath([real_dst, real_src])
        if real_dst == real_src:
            relation = "is"
        elif common == real_dst:
            relation = "contains"
        elif common == real_src:
            relation = "lies inside"
        else:
            continue
        resolved = ""
        if (real_dst, real_src) != (os.path.abspath(dst), os.path.abspath(src)):
            resolved = f" (resolved: {real_dst} and {real_src})"
        raise ChameleonError(f"{what} {dst} {relation} the {label} {src}{resolved}; writing there would "
                             f"replace or alter the {label}: choose an output directory outside it")


@contextlib.contextmanager
def atomic_dir(directory: str, overwrite: bool = False):
    """Yield a temp dir beside ``directory``; on success it replaces ``directory`` in one rename.

    On any failure the temp dir is removed and ``directory`` (absent or the previous version)
    is left as it was. ``overwrite=False`` refuses an existing ``directory``. Temp dirs that
    killed writers of ``directory`` left behind are removed first (:func:`remove_stale_temp_dirs`).
    """
    directory = os.path.abspath(directory)
    remove_stale_temp_dirs(directory)
    if os.path.lexists(directory) and not overwrite:
        raise ChameleonError(f"{directory}: already exists; refusing to overwrite (pass overwrite / --overwrite)")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = _make_temp(parent, base, "tmp")
    point("atomic_dir: temp dir made")
    try:
        yield tmp
        point("atomic_dir: before the final rename")
        if os.path.lexists(directory):
            old = _make_temp(parent, base, "old")
            os.replace(directory, os.path.join(old, "x"))
            point("atomic_dir: between the two renames")
            os.replace(tmp, directory)
            point("atomic_dir: before removing the old version")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        point("atomic_dir: done")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
