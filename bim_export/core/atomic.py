"""Output writes that are atomic and never destroy what is not ours (checkpoints, backbones, bundles,
calibration and metrics files).

The rules (docs/design.md, "Outputs never destroy what is not ours"):

- A destination may be replaced only when it is missing, an empty folder, or an output of the same
  kind that bim-export made earlier, recognised by its files (:class:`OutputKind`) and holding
  nothing else. Anything else, a place inside the files that ship with bim-export, or a folder that
  cannot be written is an :class:`~bim_export.core.errors.InputError` raised by
  :func:`check_destination` before any work, and nothing is touched.
- An output is built in a hidden sibling and renamed over the destination only when complete, so a
  failed or interrupted run leaves what was there before, never something that looks finished.
- New folders and files follow the user's umask (``tempfile``'s 0700 / 0600 would hide a bundle
  from a colleague or a service account).

Hidden siblings and work folders record their owner process in their name (:mod:`bim_export.core.stale`),
so a later run removes those a killed run left, never a live run's, and never a name it did not make.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .resources import shipped_roots
from .stale import owner_tag, remove_stale

WORK_PREFIX = ".bim-export-work-"  # a run's scratch folder inside its output folder
_PROBE_PREFIX = ".bim-export-probe-"
_MARKER_MAX_BYTES = 64 * 1024**2  # a larger "marker" is not one of ours: do not read it


@dataclass(frozen=True)
class OutputKind:
    """An output of bim-export that a later run may replace, and how to recognise it.

    Attributes:
        name: what it is, for messages ("checkpoint").
        keys: keys its JSON marker must hold.
        marker: the JSON file inside the folder that identifies it; None for a single-file output,
            which is its own marker.
        names: every entry a folder output may hold (its files, and what its own scripts add
            beside them); hidden temporary files of these names (``.NAME.tmp-*``) count as its own.
    """

    name: str
    keys: tuple[str, ...]
    marker: str | None = None
    names: frozenset[str] = frozenset()


# ------------------------------------------------------------------------------ checks


def check_destination(dest: str | os.PathLike, kind: OutputKind) -> Path:
    """Checks, before any work, that ``dest`` may be written as ``kind``; reads only.

    Returns:
        ``dest`` (a symbolic link is followed: the output goes where it points).

    Raises:
        InputError: ``dest`` lies inside the shipped files, holds something that is not an earlier
            ``kind`` of bim-export, is a file where a folder goes (or the reverse), or its folder
            cannot be written. The message names the path and the reason.
    """
    dest = Path(dest)
    if dest.name in ("", "..", "."):  # "." or "x/..": name the folder itself, not its parent's entry ""
        dest = Path(os.path.abspath(dest))
    dest = _follow(dest)
    check_not_shipped(dest)
    if os.path.lexists(dest):
        reason = _not_ours(dest, kind)
        if reason:
            what = "folder" if kind.marker else "file"
            raise InputError(f"{dest}: {reason}; nothing was written (choose a new or empty {what}, "
                             f"or move this one away yourself)")
    check_writable(dest.parent)
    return dest


def check_not_shipped(path: str | os.PathLike) -> None:
    """Raises InputError if ``path`` lies inside the files that ship with bim-export (read-only)."""
    real = Path(os.path.realpath(path))
    for root in shipped_roots():
        if real == root or root in real.parents:
            raise InputError(f"{path}: inside the files that ship with bim-export ({root}), which no command "
                             f"writes to; write elsewhere")


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside the files that ship with bim-export."""
    try:
        check_not_shipped(path)
    except InputError:
        return True
    return False


def check_writable(folder: str | os.PathLike) -> None:
    """Raises InputError unless ``folder`` (or, if missing, the nearest folder above it, where it
    would be created) can be written: permission bits and a real probe, since neither alone is
    reliable (``os.access`` ignores read-only mounts on some systems; root passes every bit)."""
    folder = Path(folder)
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{existing}: is a file, not a folder" + ("" if existing == folder else f" (so {folder} "
                         "cannot be created)") + "; nothing was written")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: not writable (permission denied); nothing was written")
    remove_stale(existing, _PROBE_PREFIX)
    probe = existing / f"{_PROBE_PREFIX}{owner_tag()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise InputError(f"{existing}: not writable ({e.strerror}); nothing was written") from e


def _follow(path: Path) -> Path:
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _not_ours(dest: Path, kind: OutputKind) -> str:
    """Why ``dest`` (which exists) is not an earlier ``kind``; "" when it is one or an empty folder."""
    if kind.marker is None:
        if dest.is_dir():
            return f"is a folder, not a {kind.name}"
        return _marker_problem(dest, kind)
    if not dest.is_dir():
        return f"is a file, not a bim-export {kind.name} folder"
    entries = sorted(os.listdir(dest))
    if not entries:
        return ""
    foreign = [e for e in entries
               if e not in kind.names and not any(e.startswith(f".{n}.tmp-") for n in kind.names)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds files that are not part of a bim-export {kind.name} ({shown})"
    return _marker_problem(dest / kind.marker, kind)


def _marker_problem(path: Path, kind: OutputKind) -> str:
    label = path.name if kind.marker else "it"
    try:
        if path.stat().st_size > _MARKER_MAX_BYTES:
            return f"{label} is not a bim-export {kind.name} (too large)"
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"holds no {path.name}, so it is not a bim-export {kind.name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{label} is not a bim-export {kind.name} (not readable JSON: {type(e).__name__})"
    missing = [k for k in kind.keys if not isinstance(data, dict) or k not in data]
    if missing:
        return f"{label} is not a bim-export {kind.name} (no {', '.join(missing)})"
    return ""


# ------------------------------------------------------------------------------ writes


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, kind: OutputKind) -> Iterator[Path]:
    """Yields a temporary folder that replaces ``dest`` when the block exits cleanly.

    ``dest`` is checked first (:func:`check_destination`) and again just before the swap. On an
    exception the temporary folder is removed and ``dest`` is untouched. Hidden siblings that a
    killed run left for ``dest`` are cleaned up first (a copy moved aside is put back when ``dest``
    is missing).
    """
    dest = check_destination(dest, kind)
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, f".{dest.name}.old-", restore=dest)
    remove_stale(parent, f".{dest.name}.tmp-")
    tmp = owned_temp(parent, f".{dest.name}.tmp-", folder=True)
    try:
        yield tmp
        _finish_tree(tmp)
        check_destination(dest, kind)  # something may have appeared while we worked
        if os.path.lexists(dest):
            # aside within the same folder: moving a folder to another parent needs write access to it
            old = parent / f".{dest.name}.old-{owner_tag()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, kind: OutputKind | None = None) -> None:
    """Writes one file atomically (temporary sibling + rename), following the umask.

    Args:
        kind: what an existing ``path`` must be to be replaced (checked with :func:`check_destination`);
            None for a file inside an output already checked (a checkpoint's metrics.json).
    """
    path = Path(path)
    if kind is not None:
        path = check_destination(path, kind)
    else:
        check_not_shipped(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.tmp-")
    tmp = owned_temp(path.parent, f".{path.name}.tmp-", folder=False)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def owned_temp(parent: str | os.PathLike, prefix: str, *, folder: bool, suffix: str = "") -> Path:
    """Creates an empty folder or file ``parent/<prefix><owner tag><suffix>`` that follows the umask.

    The name records this process as its owner, so :func:`remove_stale` can tell a killed run's
    leftover from a live run's.
    """
    path = Path(parent) / f"{prefix}{owner_tag()}{suffix}"
    if folder:
        os.mkdir(path)  # 0o777 & ~umask
    else:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path


def work_dir(out: str | os.PathLike) -> Path:
    """A scratch folder of this run inside ``out`` (removed by the caller), after removing those that
    killed runs left there."""
    remove_stale(out, WORK_PREFIX)
    return owned_temp(out, WORK_PREFIX, folder=True)


def _finish_tree(root: Path) -> None:
    """Gives every file and folder under ``root`` the umask's mode and flushes the files to disk.

    Libraries write some files 0600 whatever the umask (safetensors, for one); a checkpoint or bundle
    must be readable by whom the user's umask allows.
    """
    mask = _umask()
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        elif p.is_file():
            os.chmod(p, (0o777 if p.stat().st_mode & 0o111 else 0o666) & ~mask)
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; set it back at once
    os.umask(mask)
    return mask
