"""Output writes: what may be replaced, modes that follow the umask, and leftovers of killed runs."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bim_export.core import atomic
from bim_export.core.atomic import OutputKind, atomic_dir, atomic_write_bytes, check_destination, owned_temp, work_dir
from bim_export.core.errors import InputError
from bim_export.core.stale import owner_tag

THING = OutputKind("thing", keys=("thing",), marker="thing.json", names=frozenset({"thing.json", "data.bin"}))
REPO = Path(__file__).resolve().parents[1]


def _write_thing(dest: Path, payload: bytes = b"new") -> None:
    with atomic_dir(dest, THING) as tmp:
        (tmp / "thing.json").write_text('{"thing": 1}')
        (tmp / "data.bin").write_bytes(payload)


# ------------------------------------------------------------------------------ what may be replaced


def test_missing_empty_and_own_destinations_are_accepted(tmp_path):
    _write_thing(tmp_path / "new" / "deeper")  # missing, parents created
    (tmp_path / "empty").mkdir()
    _write_thing(tmp_path / "empty")
    _write_thing(tmp_path / "empty", b"again")  # an earlier output of the same kind
    assert (tmp_path / "empty" / "data.bin").read_bytes() == b"again"
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]  # no sibling left


def test_own_output_with_a_stranger_inside_is_refused(tmp_path):
    _write_thing(tmp_path / "t")
    (tmp_path / "t" / "mine.txt").write_text("mine")
    with pytest.raises(InputError, match=r"t: holds files that are not part of a bim-export thing \(mine\.txt\)"):
        _write_thing(tmp_path / "t")
    assert sorted(os.listdir(tmp_path / "t")) == ["data.bin", "mine.txt", "thing.json"]


def test_a_stranger_appearing_during_the_work_is_not_replaced(tmp_path):
    dest = tmp_path / "t"
    with pytest.raises(InputError, match="not part of a bim-export thing"):
        with atomic_dir(dest, THING) as tmp:
            (tmp / "thing.json").write_text('{"thing": 1}')
            dest.mkdir()
            (dest / "mine.txt").write_text("mine")  # written by someone else meanwhile
    assert os.listdir(dest) == ["mine.txt"] and sorted(os.listdir(tmp_path)) == ["t"]


def test_bundle_kind_accepts_what_its_own_scripts_add(tmp_path):
    from bim_export.deploy.bundle import BUNDLE

    b = tmp_path / "b"
    (b / "__pycache__").mkdir(parents=True)
    (b / "trt_cache").mkdir()
    for name in ("model.onnx", "model.ort", "infer.py", "common.py", ".manifest.json.tmp-123-ab"):
        (b / name).write_text("x")
    (b / "manifest.json").write_text(json.dumps({"format_version": 1, "bim_export_version": "0", "profile": "p",
                                                 "files": {}}))
    assert check_destination(b, BUNDLE) == b
    (b / "manifest.json").write_text(json.dumps({"profile": "p"}))
    with pytest.raises(InputError, match=r"manifest\.json is not a bim-export bundle \(no format_version"):
        check_destination(b, BUNDLE)


def test_symlinked_destination_is_written_where_it_points(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    _write_thing(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (real / "data.bin").read_bytes() == b"new"


# ------------------------------------------------------------------------------ umask


@pytest.fixture(params=[0o022, 0o077], ids=["umask-022", "umask-077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _assert_modes(root: Path, mask: int) -> None:
    """``root`` and everything under it have the modes ``mask`` allows, no tighter and no looser."""
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    wrong = {}
    for p in entries:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        got = stat.S_IMODE(p.stat().st_mode)
        if got != want:
            wrong[str(p.relative_to(root.parent))] = f"{got:o} != {want:o}"
    assert not wrong, wrong


def test_checkpoint_and_metrics_follow_the_umask(umask, tiny_checkpoint, tmp_path):
    from bim_export.model.checkpoint import load_checkpoint, save_checkpoint, update_exit_metrics

    ck = load_checkpoint(tiny_checkpoint)
    out = tmp_path / "runs" / "c"
    save_checkpoint(out, ck.state_dict, ck.config, ck.metrics, train_state={"step": 1}, log_lines=["{}"])
    update_exit_metrics(out, {2: {"knn_top1": 0.5}})
    _assert_modes(tmp_path / "runs", umask)


def test_backbone_follows_the_umask(umask, tiny_checkpoint, tmp_path):
    from bim_export.model.backbone import save_backbone

    save_backbone(tiny_checkpoint, 2, tmp_path / "bb")
    _assert_modes(tmp_path / "bb", umask)


def test_bundle_and_its_revalidated_manifest_follow_the_umask(umask, tmp_path):
    from bundle_spec import bundle_spec

    from bim_export.deploy.bundle import write_bundle
    from bim_export.runtime.validate import _write_json_atomic

    dest = write_bundle(tmp_path / "exports", bundle_spec(tmp_path))
    manifest = json.loads((dest / "manifest.json").read_text())
    _write_json_atomic(dest / "manifest.json", {**manifest, "device_validations": [{"passed": True}]})
    _assert_modes(tmp_path / "exports", umask)


def test_onnx_file_calibration_file_and_work_folder_follow_the_umask(umask, tmp_path):
    import onnx
    from tiny_onnx import write_tiny_onnx

    from bim_export.deploy.export import save_checked
    from bim_export.deploy.latency.calibration import CALIBRATION

    out = tmp_path / "out"
    out.mkdir(mode=0o777 & ~umask)
    proto = onnx.load(str(write_tiny_onnx(tmp_path / "src.onnx")))
    save_checked(proto, out / "model.onnx")
    atomic_write_bytes(out / "host.json", b'{"kind": "k", "profile": "host", "factors": {}}', CALIBRATION)
    atomic_write_bytes(out / "host.json", b'{"kind": "k", "profile": "host", "factors": {"a": 1}}', CALIBRATION)
    work_dir(out)
    assert len(os.listdir(out)) == 3
    _assert_modes(out, umask)


# ------------------------------------------------------------------------------ killed runs' leftovers


def _python(code: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


def _left_by_a_finished_run(parent: Path, prefix: str, folder: bool = True) -> Path:
    """An entry that a run of bim-export named and filled, and then died without removing."""
    code = (f"from bim_export.core.atomic import owned_temp; "
            f"print(owned_temp({str(parent)!r}, {prefix!r}, folder={folder}))")
    path = Path(_python(code).stdout.strip())
    if folder:
        (path / "partial.bin").write_bytes(b"x" * 100)
    return path


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


NEXT_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from bim_export.core.atomic import OutputKind, atomic_dir, work_dir
    parent = Path(sys.argv[1])
    kind = OutputKind("thing", keys=("thing",), marker="thing.json", names=frozenset({"thing.json", "data.bin"}))
    with atomic_dir(parent / "t", kind) as tmp:
        (tmp / "thing.json").write_text('{"thing": 1}')
        (tmp / "data.bin").write_bytes(b"x" * int(sys.argv[2]))
        print("written", flush=True)
        if sys.argv[3] == "hang":
            import time; time.sleep(120)
    print(work_dir(parent).name)
""")


def test_leftovers_of_dead_owners_are_removed_live_and_foreign_kept(tmp_path):
    dead_runs = [_left_by_a_finished_run(tmp_path, ".t.tmp-"),
                 _left_by_a_finished_run(tmp_path, ".t.tmp-", folder=False),
                 _left_by_a_finished_run(tmp_path, atomic.WORK_PREFIX)]
    live = [owned_temp(tmp_path, ".t.tmp-", folder=True),  # this process: a live run
            owned_temp(tmp_path, atomic.WORK_PREFIX, folder=True)]
    dead = _dead_pid()
    kept = [tmp_path / ".t.tmp-abc123", tmp_path / ".bim-export-work-mine",  # names bim-export does not make
            tmp_path / f".t.tmp-00000000-{dead}-1-deadbeef",  # another machine's (its processes are not ours to see)
            tmp_path / f".t.tmp-{owner_tag(pid=dead, start=10**15)}"]  # a run started after the next one
    for p in kept:
        p.mkdir()
    work = _python(NEXT_RUN, str(tmp_path), "5", "done").stdout.split()[-1]  # the next run
    left = set(os.listdir(tmp_path))
    assert not {p.name for p in dead_runs} & left
    assert left == {"t", work, *(p.name for p in live + kept)}


def test_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    dest = tmp_path / "t"
    _write_thing(dest, b"previous")
    # killed between moving the old output aside and putting the new one in place
    os.replace(dest, tmp_path / f".t.old-{owner_tag(pid=_dead_pid(), start=1)}")
    with pytest.raises(ZeroDivisionError), atomic_dir(dest, THING):
        1 / 0  # this run fails too: what was there before must be back
    assert (dest / "data.bin").read_bytes() == b"previous" and os.listdir(tmp_path) == ["t"]


def test_sigkilled_write_leaves_a_folder_the_next_run_removes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.Popen([sys.executable, "-c", NEXT_RUN, str(tmp_path), "1000", "hang"], stdout=subprocess.PIPE,
                           env=env)
    assert run.stdout.readline() == b"written\n"
    run.send_signal(signal.SIGKILL)
    run.wait()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".t.tmp-")
    work = _python(NEXT_RUN, str(tmp_path), "5", "done").stdout.split()[-1]
    assert sorted(os.listdir(tmp_path)) == sorted(["t", work])
    assert (tmp_path / "t" / "data.bin").read_bytes() == b"xxxxx"
