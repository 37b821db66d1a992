"""Temporary entries named after the process that owns them, and the removal of those whose owner died.

A run of bim-export builds its outputs in hidden siblings (``.NAME.tmp-*``) and its exports in a
work folder (``.bim-export-work-*``); a SIGKILL or a power cut leaves them behind, sometimes hundreds
of MB. Their names end in an owner tag, ``<host hash>-<pid>-<process start>-<random>``, so a later
run can tell a dead owner's leftover (removed) from a live run's (kept) without any lock file, and
never touches a name it did not make.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

# host hash - pid - process start (clock ticks since boot, 0 = unknown) - random [. suffix]
_TAG = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}(?:\.[A-Za-z0-9.]+)?")
_IMPORTED = time.time()


def owner_tag(pid: int | None = None, start: int | None = None) -> str:
    """``host-pid-start-random``: the owner part of a temporary entry's name (this process by default;
    ``start`` in clock ticks since boot, 0 = unknown)."""
    if pid is None:
        pid = os.getpid()  # read each time: a forked worker is another owner
    if start is None:
        start = _own_start(pid) if pid == os.getpid() else 0
    return f"{_host()}-{pid}-{start}-{secrets.token_hex(4)}"


def remove_stale(parent: str | os.PathLike, prefix: str, restore: Path | None = None) -> list[Path]:
    """Removes what killed runs left in ``parent`` under ``prefix``.

    An entry goes only if its name carries an owner tag of this host (:func:`owner_tag`), that owner
    is no longer running (its pid is gone, a zombie, or now another process), and it started before
    this process.

    Args:
        restore: where the entries are copies moved aside (``.NAME.old-*``): if ``restore`` is
            missing (a run was killed between moving the old output aside and putting the new one
            in place) the first stale copy is renamed back instead of removed.

    Returns:
        The entries removed.
    """
    parent = Path(parent)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    removed = []
    for name in names:
        path = parent / name
        if not name.startswith(prefix) or not _is_stale(path, name[len(prefix):]):
            continue
        try:
            if restore is not None and not os.path.lexists(restore):
                os.replace(path, restore)
                log.warning("%s: put back from %s, left by a killed run", restore, path)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            log.info("removed %s, left by a killed run", path)
            removed.append(path)
        except OSError as e:
            log.warning("%s: left by a killed run, but could not be removed (%s)", path, e)
    return removed


def _is_stale(path: Path, tag: str) -> bool:
    m = _TAG.fullmatch(tag)
    if m is None or m["host"] != _host() or int(m["pid"]) <= 0:
        return False  # not a name of ours, or another machine's (its processes cannot be seen)
    owner_start, own_start = int(m["start"]), _own_start(os.getpid())
    if _alive(int(m["pid"]), owner_start):
        return False
    if owner_start and own_start:  # the owner started before this process (same clock, exact)
        return owner_start < own_start
    try:  # no /proc, so no start times: older than this module's import
        return path.lstat().st_mtime < _IMPORTED
    except OSError:
        return False


def _alive(pid: int, start: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: the pid exists, assume it is the owner
    state, started = stat
    return state != "Z" and not (start and started != start)  # a zombie is dead; a new start is another process


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
        fields = text.rsplit(")", 1)[1].split()  # the name before may hold spaces and parentheses
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@functools.cache
def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@functools.cache
def _own_start(pid: int) -> int:
    stat = _proc_stat(pid)
    return stat[1] if stat else 0
