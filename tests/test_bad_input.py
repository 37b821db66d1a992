"""The bad-input corpus: every case named, driven through the CLI, so the next regression shows by name.

Each block below holds its own cases and test functions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from bim_export.cli import main
from bim_export.resources import resource_dir, sample_images_dir

# ===================================================================================== outputs
# "Outputs never destroy what is not ours" (DESIGN.md): an --out (or --metrics-out, or a bundle's
# OUT/<profile>) that holds anything but an earlier output of the same kind, lies inside the shipped
# files, or cannot be written is exit 2 with one `error:` line naming it, before any work, and
# nothing there changes.

OUT_PROFILE = "raspberry-pi-5"  # a shipped profile: its bundle goes to OUT/raspberry-pi-5
TINY_TRAIN_YAML = textwrap.dedent("""
    model_args: {img_size: 32, patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}
    exits: [2, 4]
    decoder_width: 32
    decoder_heads: 2
    steps: 2
    batch_size: 4
    num_workers: 0
    progress: false
""")


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too) with its kind and the sha256 of its content."""
    if not os.path.lexists(root):
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                snap[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return snap


def _user_folder(path: Path) -> Path:
    """A folder of the user's own: photos and notes."""
    shutil.copytree(sample_images_dir() / "camera", path)
    (path / "notes.txt").write_text("my notes\n")
    return path


def _user_file(path: Path) -> Path:
    path.write_text('{"name": "my settings"}\n')  # JSON, but not one of ours
    return path


def _train_cmd(tmp: Path, out: Path, *extra: str) -> list[str]:
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY_TRAIN_YAML)
    return ["train", "--config", str(cfg), "--out", str(out), *extra]


def _export_cmd(ckpt: Path, out: Path) -> list[str]:
    return ["export", "--target", OUT_PROFILE, "--checkpoint", str(ckpt), "--out", str(out)]


# Each case: (tmp, tiny checkpoint) -> (argv, the path that must not change, a fragment of the error).


def _train_out_is_its_data(tmp, ckpt):
    data = _user_folder(tmp / "photos")
    return _train_cmd(tmp, data, "--data", str(data)), data, "not part of a bim-export checkpoint"


def _train_out_is_a_file(tmp, ckpt):
    f = _user_file(tmp / "notes.json")
    return _train_cmd(tmp, f), f, "is a file"


def _train_resume_into_user_folder(tmp, ckpt):
    d = _user_folder(tmp / "photos")
    return _train_cmd(tmp, d, "--resume"), d, "not part of a bim-export checkpoint"


def _train_resume_checkpoint_holding_user_file(tmp, ckpt):
    run = tmp / "run"
    shutil.copytree(ckpt, run)
    (run / "notes.txt").write_text("mine\n")
    return _train_cmd(tmp, run, "--resume"), run, "(notes.txt)"


def _train_user_config_json_is_not_a_checkpoint(tmp, ckpt):
    d = tmp / "project"
    d.mkdir()
    (d / "config.json").write_text('{"name": "my project"}\n')
    return _train_cmd(tmp, d), d, "config.json is not a bim-export checkpoint"


def _train_out_inside_shipped_assets(tmp, ckpt):
    return _train_cmd(tmp, resource_dir("assets") / "new-run"), resource_dir("assets"), "ship with bim-export"


def _train_resume_shipped_checkpoint(tmp, ckpt):
    shipped = resource_dir("assets") / "default_checkpoint"
    return _train_cmd(tmp, shipped, "--resume"), resource_dir("assets"), "ship with bim-export"


def _train_out_under_a_file(tmp, ckpt):
    f = _user_file(tmp / "notes.json")
    return _train_cmd(tmp, f / "run"), f, "is a file, not a folder"


def _backbone_out_user_folder(tmp, ckpt):
    d = _user_folder(tmp / "photos")
    return ["backbone", str(ckpt), "--depth", "2", "--out", str(d)], d, "not part of a bim-export backbone"


def _backbone_out_ends_in_dotdot(tmp, ckpt):
    d = _user_folder(tmp / "photos")
    return ["backbone", str(ckpt), "--depth", "2", "--out", str(d / "camera" / "..")], d, "not part of a bim-export"


def _backbone_out_is_a_file(tmp, ckpt):
    f = _user_file(tmp / "notes.json")
    return ["backbone", str(ckpt), "--depth", "2", "--out", str(f)], f, "is a file"


def _backbone_out_is_a_checkpoint(tmp, ckpt):
    other = tmp / "ckpt-copy"
    shutil.copytree(ckpt, other)
    return ["backbone", str(ckpt), "--depth", "2", "--out", str(other)], other, "not part of a bim-export backbone"


def _backbone_out_inside_shipped_assets(tmp, ckpt):
    out = resource_dir("assets") / "default_checkpoint"
    return ["backbone", str(ckpt), "--depth", "2", "--out", str(out)], resource_dir("assets"), "ship with bim-export"


def _export_out_is_a_file(tmp, ckpt):
    f = _user_file(tmp / "exports")
    return _export_cmd(ckpt, f), f, "is a file, not a folder"


def _export_bundle_folder_holds_user_files(tmp, ckpt):
    out = tmp / "exports"
    _user_folder(out / OUT_PROFILE)
    return _export_cmd(ckpt, out), out, "not part of a bim-export bundle"


def _export_bundle_folder_is_a_file(tmp, ckpt):
    out = tmp / "exports"
    out.mkdir()
    _user_file(out / OUT_PROFILE)
    return _export_cmd(ckpt, out), out, "is a file"


def _export_out_inside_shipped_assets(tmp, ckpt):
    return _export_cmd(ckpt, resource_dir("assets")), resource_dir("assets"), "ship with bim-export"


def _calibrate_out_is_a_user_file(tmp, ckpt):
    f = _user_file(tmp / "host.json")
    return ["calibrate", "--profile", "host", "--out", str(f)], f, "is not a bim-export calibration file"


def _eval_metrics_out_is_a_user_file(tmp, ckpt):
    f = _user_file(tmp / "metrics.json")
    argv = ["eval", str(ckpt), "--data", str(sample_images_dir()), "--metrics-out", str(f)]
    return argv, f, "is not a bim-export metrics file"


def _eval_metrics_out_inside_shipped_assets(tmp, ckpt):
    shipped = resource_dir("assets") / "default_checkpoint" / "metrics.json"
    argv = ["eval", str(ckpt), "--data", str(sample_images_dir()), "--metrics-out", str(shipped)]
    return argv, resource_dir("assets"), "ship with bim-export"


OUTPUT_CASES = [
    pytest.param(_train_out_is_its_data, id="train-out-is-its-own-data-folder"),
    pytest.param(_train_out_is_a_file, id="train-out-is-a-file"),
    pytest.param(_train_out_under_a_file, id="train-out-under-a-file"),
    pytest.param(_train_resume_into_user_folder, id="train-resume-into-a-user-folder"),
    pytest.param(_train_resume_checkpoint_holding_user_file, id="train-resume-checkpoint-holding-a-user-file"),
    pytest.param(_train_user_config_json_is_not_a_checkpoint, id="train-out-holds-a-user-config-json"),
    pytest.param(_train_out_inside_shipped_assets, id="train-out-inside-shipped-assets"),
    pytest.param(_train_resume_shipped_checkpoint, id="train-resume-the-shipped-checkpoint"),
    pytest.param(_backbone_out_user_folder, id="backbone-out-is-a-user-folder"),
    pytest.param(_backbone_out_ends_in_dotdot, id="backbone-out-ends-in-dotdot"),
    pytest.param(_backbone_out_is_a_file, id="backbone-out-is-a-file"),
    pytest.param(_backbone_out_is_a_checkpoint, id="backbone-out-is-a-checkpoint"),
    pytest.param(_backbone_out_inside_shipped_assets, id="backbone-out-is-the-shipped-checkpoint"),
    pytest.param(_export_out_is_a_file, id="export-out-is-a-file"),
    pytest.param(_export_bundle_folder_holds_user_files, id="export-bundle-folder-holds-user-files"),
    pytest.param(_export_bundle_folder_is_a_file, id="export-bundle-folder-is-a-file"),
    pytest.param(_export_out_inside_shipped_assets, id="export-out-inside-shipped-assets"),
    pytest.param(_calibrate_out_is_a_user_file, id="calibrate-out-is-a-user-file"),
    pytest.param(_eval_metrics_out_is_a_user_file, id="eval-metrics-out-is-a-user-file"),
    pytest.param(_eval_metrics_out_inside_shipped_assets, id="eval-metrics-out-is-the-shipped-metrics"),
]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_output_never_replaces_what_is_not_ours(case, tmp_path, tiny_checkpoint, capsys):
    argv, guarded, fragment = case(tmp_path, tiny_checkpoint)
    before, around = _snapshot(guarded), sorted(os.listdir(guarded.parent))
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert _snapshot(guarded) == before  # nothing there changed
    assert sorted(os.listdir(guarded.parent)) == around  # and no temporary sibling was left


# Read-only destinations: refused before any work (train used to fail at its first save, after the
# training steps). Root writes through a 0555 folder, so as root the command runs in a forked child
# that has dropped to an unprivileged user.

NOBODY = 65534


def _readonly_train(ro, ckpt):
    return _train_cmd(ro.parent, ro / "run"), "not writable"


def _readonly_backbone(ro, ckpt):
    return ["backbone", str(ckpt), "--depth", "2", "--out", str(ro / "bb")], "not writable"


def _readonly_export(ro, ckpt):
    return _export_cmd(ckpt, ro / "exports"), "not writable"


def _readonly_eval_in_place(ro, ckpt):
    return ["eval", str(ro / "ckpt"), "--data", str(sample_images_dir())], "--metrics-out"


READ_ONLY_CASES = [
    pytest.param(_readonly_train, id="train-out-in-read-only-folder"),
    pytest.param(_readonly_backbone, id="backbone-out-in-read-only-folder"),
    pytest.param(_readonly_export, id="export-out-in-read-only-folder"),
    pytest.param(_readonly_eval_in_place, id="eval-checkpoint-in-read-only-folder"),
]


def _run_as_nobody(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in a forked child running as an unprivileged user; returns (exit code, stderr)."""
    import select
    import signal

    import bim_export.backbone  # noqa: F401 - the child cannot read the interpreter's own files
    import bim_export.evaluate  # noqa: F401
    import bim_export.pipeline  # noqa: F401
    import bim_export.trainer  # noqa: F401

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w", buffering=1)
            sys.stdout = open(os.devnull, "w")
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except PermissionError:
                code = 98  # not allowed to drop privileges
            else:
                code = main(argv)
        except BaseException as e:  # noqa: BLE001 - an unexpected failure: report it to the parent
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while select.select([f], [], [], 300)[0]:
            chunk = f.read1(65536)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 98:
        pytest.skip("running as root without the right to drop privileges: root writes through a 0555 folder")
    return code, b"".join(chunks).decode()


@pytest.mark.parametrize("case", READ_ONLY_CASES)
def test_read_only_destination_is_refused_before_any_work(case, tiny_checkpoint, capsys):
    # not tmp_path: as root, its parents are 0700 and the unprivileged child could not reach them
    base = Path(tempfile.mkdtemp(prefix="bim-readonly-"))
    try:
        os.chmod(base, 0o755)
        ro = base / "ro"
        ro.mkdir()
        shutil.copytree(tiny_checkpoint, ro / "ckpt")
        ckpt = base / "ckpt"
        shutil.copytree(tiny_checkpoint, ckpt)
        argv, fragment = case(ro, ckpt)
        for p in [*base.rglob("*")]:  # readable to the unprivileged child
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        for p in (ro / "ckpt", ro):
            os.chmod(p, 0o555)
        before = _snapshot(ro)
        if os.geteuid() == 0:
            rc, err = _run_as_nobody(argv)
        else:
            rc = main(argv)
            err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert str(ro) in err and fragment in err, err
        assert _snapshot(ro) == before
    finally:
        for p in (base / "ro", base / "ro" / "ckpt"):
            if p.exists():
                os.chmod(p, 0o755)
        shutil.rmtree(base)


# ================================================================================= end outputs
