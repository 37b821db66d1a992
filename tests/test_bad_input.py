"""The bad-input corpus: every case named, driven through the CLI, so the next regression shows by name.

Each block below holds its own cases and test functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from bim_export.cli import main
from bim_export.core.resources import resource_dir, sample_images_dir

# ===================================================================================== outputs
# "Outputs never destroy what is not ours" (docs/design.md): an --out (or --metrics-out, or a bundle's
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

    import bim_export.model.backbone  # noqa: F401 - the child cannot read the interpreter's own files
    import bim_export.train.evaluate  # noqa: F401
    import bim_export.deploy.pipeline  # noqa: F401
    import bim_export.train.trainer  # noqa: F401

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


# ====================================================================================== inputs
# What a command reads: checkpoints (config.json, train_state.pt), model names, image folders,
# training settings. Each case is exit 2 with one `error:` line naming the file and field (or flag)
# and the value, nothing on stdout, and nothing written or changed.


@dataclass
class InputCase:
    """One bad input: the command line, fragments its error line must hold, and what it must not touch."""

    argv: list[str]
    expect: list[str]
    absent: list[Path] = field(default_factory=list)  # outputs that must not appear
    unchanged: list[Path] = field(default_factory=list)  # files that must keep their bytes


def _in_checkpoint_copy(ckpt: Path, dest: Path, **config) -> Path:
    shutil.copytree(ckpt, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def _in_folder_with(path: Path, *writers) -> Path:
    path.mkdir(parents=True)
    for write in writers:
        write(path)
    return path


def _in_bomb(folder: Path) -> None:
    from conftest import write_png_bomb

    write_png_bomb(folder / "bomb.png")


def _in_train_yaml(tmp: Path, ckpt: Path, **settings) -> Path:
    """The tiny checkpoint's own training settings as a YAML file (so a resume of it matches)."""
    train = json.loads((ckpt / "config.json").read_text())["train"]
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump({**train, **settings}))
    return path


def _unknown_arch_export(tmp: Path, ckpt: Path) -> InputCase:
    bad = _in_checkpoint_copy(ckpt, tmp / "ckpt", arch="vit_tiny_patch16_2244")
    return InputCase(["export", "--target", "raspberry-pi-5", "--checkpoint", str(bad), "--out", str(tmp / "out")],
                     [f"{bad / 'config.json'}: arch: unknown model 'vit_tiny_patch16_2244'",
                      "closest: vit_tiny_patch16_224"], absent=[tmp / "out"])


def _multi_exit_of_a_per_exit_checkpoint(tmp: Path, ckpt: Path) -> InputCase:
    from finetuned import make_finetuned

    per_exit = make_finetuned(tmp / "per_exit", "per_exit", source=ckpt)
    return InputCase(["export", "--target", "raspberry-pi-5", "--checkpoint", str(per_exit), "--out",
                      str(tmp / "out"), "--multi-exit"],
                     [f"{per_exit / 'config.json'}: finetune.mode is per_exit", "--multi-exit"], absent=[tmp / "out"])


def _unknown_arch_backbone(tmp: Path, ckpt: Path) -> InputCase:
    bad = _in_checkpoint_copy(ckpt, tmp / "ckpt", arch="no_such_vit")
    return InputCase(["backbone", str(bad), "--depth", "2", "--out", str(tmp / "bb")],
                     [f"{bad / 'config.json'}: arch: unknown model 'no_such_vit'"], absent=[tmp / "bb"])


def _unknown_arch_eval(tmp: Path, ckpt: Path) -> InputCase:
    bad = _in_checkpoint_copy(ckpt, tmp / "ckpt", arch="vit_tiny_patch16_2244")
    return InputCase(["eval", str(bad), "--data", str(sample_images_dir())],
                     [f"{bad / 'config.json'}: arch: unknown model"], unchanged=[bad / "metrics.json"])


def _unknown_model_train(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(["train", "--model", "vit_tiny_patch16_2244", "--out", str(tmp / "run")],
                     ["--model: unknown model 'vit_tiny_patch16_2244'; closest: vit_tiny_patch16_224, "],
                     absent=[tmp / "run"])


def _bomb_only_train(tmp: Path, ckpt: Path) -> InputCase:
    data = _in_folder_with(tmp / "photos", _in_bomb)
    return InputCase(["train", "--config", str(_in_train_yaml(tmp, ckpt, out=str(tmp / "run"))),
                      "--data", str(data)],
                     [f"{data}: none of the 1 image files is readable (first: bomb.png: decompression bomb"],
                     absent=[tmp / "run"])


def _bomb_only_export(tmp: Path, ckpt: Path) -> InputCase:
    data = _in_folder_with(tmp / "photos", _in_bomb)
    return InputCase(["export", "--target", "raspberry-pi-5", "--checkpoint", str(ckpt), "--data", str(data),
                      "--out", str(tmp / "out")],
                     [f"{data}: none of the 1 image files is readable (first: bomb.png: decompression bomb"],
                     absent=[tmp / "out"])


def _bomb_only_eval(tmp: Path, ckpt: Path) -> InputCase:
    copy = tmp / "ckpt"
    shutil.copytree(ckpt, copy)
    data = _in_folder_with(tmp / "photos", _in_bomb)
    return InputCase(["eval", str(copy), "--data", str(data)],
                     [f"{data}: none of the 1 image files is readable (first: bomb.png: decompression bomb"],
                     unchanged=[copy / "metrics.json"])


def _one_tiny_image_for_parity(tmp: Path, ckpt: Path) -> InputCase:
    from PIL import Image

    data = _in_folder_with(tmp / "one", lambda d: Image.new("RGB", (1, 1), (90, 120, 40)).save(d / "x.png"))
    return InputCase(["export", "--target", "raspberry-pi-5", "--checkpoint", str(ckpt), "--data", str(data),
                      "--out", str(tmp / "out")],
                     [f"{data}: 1 readable image; parity and int8 calibration need at least 16"],
                     absent=[tmp / "out"])


def _resume_without_checkpoint(tmp: Path, ckpt: Path) -> InputCase:
    out = tmp / "runs" / "mistyped"
    return InputCase(["train", "--config", str(_in_train_yaml(tmp, ckpt, out=str(out))), "--resume"],
                     [f"{out}: no checkpoint to resume from (no config.json there)", "--resume auto"],
                     absent=[out])


def _resume_unsafe_train_state(tmp: Path, ckpt: Path) -> InputCase:
    copy = tmp / "ckpt"
    shutil.copytree(ckpt, copy)
    torch.save({"step": 1, "evil": shutil.rmtree}, copy / "train_state.pt")  # would call a function on load
    return InputCase(["train", "--config", str(_in_train_yaml(tmp, ckpt, out=str(copy), steps=6)), "--resume"],
                     [f"{copy / 'train_state.pt'}: unsafe training state, refused", "(shutil.rmtree)"],
                     unchanged=[copy / n for n in ("weights.safetensors", "config.json", "train_state.pt")])


def _exits_against_yaml_loss_weights(tmp: Path, ckpt: Path) -> InputCase:
    settings = _in_train_yaml(tmp, ckpt, out=str(tmp / "run"), exits=[1, 2, 3, 4], loss_weights=[1, 1, 1, 2])
    return InputCase(["train", "--config", str(settings), "--exits", "2,4"],
                     [f"{settings}: loss_weights: 4 weights for 2 decoders (mode bim, exits [2, 4] from --exits)"],
                     absent=[tmp / "run"])


def _resume_with_a_value_other_than_auto(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(["train", "--out", str(tmp / "run"), "--resume", "always"],
                     ["argument --resume: the only value is 'auto' (got 'always')"], absent=[tmp / "run"])


def _profile_opset_too_old_for_the_graph(tmp: Path, ckpt: Path) -> InputCase:
    prof = yaml.safe_load((resource_dir("profiles") / "raspberry-pi-5.yaml").read_text())
    prof["opset"] = 16  # LayerNormalization needs 17
    path = tmp / "old-runtime.yaml"
    path.write_text(yaml.safe_dump(prof))
    return InputCase(["export", "--target", str(path), "--checkpoint", str(ckpt), "--out", str(tmp / "out")],
                     ["cannot be converted to opset 16", "LayerNormalization", "the profile needs a higher opset"],
                     absent=[tmp / "out" / "old-runtime"])


def _foreign_device() -> dict:
    """A device this machine is not, whatever it is: the other architecture."""
    from bim_export.runtime.machine import machine_description

    other = "aarch64" if machine_description()["architecture"] == "x86_64" else "x86_64"
    return {"architecture": other, "cpu": "Cortex-A76", "logical_cores": 4}


def _calibrate_on_another_device(tmp: Path, ckpt: Path) -> InputCase:
    prof = yaml.safe_load((resource_dir("profiles") / "raspberry-pi-5.yaml").read_text())
    prof["device"] = _foreign_device()
    path = tmp / "barn-pi.yaml"
    path.write_text(yaml.safe_dump(prof))
    out = tmp / "calibration" / "barn-pi.json"
    return InputCase(["calibrate", "--profile", str(path), "--out", str(out)],
                     ["calibrate --profile barn-pi: this machine", "is not the profile's device", "add --force"],
                     absent=[out.parent])


def _validate_latency_on_another_device(tmp: Path, ckpt: Path) -> InputCase:
    import numpy as np
    from tiny_onnx import SIZE, write_tiny_onnx

    bundle = tmp / "barn-pi"
    bundle.mkdir()
    write_tiny_onnx(bundle / "model.onnx")
    np.savez(bundle / "reference.npz", pixels=np.zeros((2, 3, SIZE, SIZE), np.float32))
    (bundle / "manifest.json").write_text(json.dumps({"profile": "barn-pi", "device": _foreign_device(),
                                                      "measured": False, "budgets": {"latency_ms": 20}}))
    return InputCase(["validate", "--check-latency", str(bundle)],
                     [f"{bundle}: --check-latency: this machine", "is not the device of profile 'barn-pi'",
                      "add --force"], unchanged=[bundle / "manifest.json"])


def _profile_key_without_its_colon(tmp: Path, ckpt: Path) -> InputCase:
    lines = (resource_dir("profiles") / "raspberry-pi-5.yaml").read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("  memory_gb:"))
    lines[n] = lines[n].replace("memory_gb:", "memory_gb")  # yaml only notices on the line after
    path = tmp / "typo.yaml"
    path.write_text("\n".join(lines) + "\n")
    return InputCase(["profiles", "check", str(path)], [f"{path}: line {n + 1} broken YAML: could not find expected ':'"])


def _info_of_a_user_folder(tmp: Path, ckpt: Path) -> InputCase:
    folder = _user_folder(tmp / "photos")
    return InputCase(["info", str(folder)], [f"{folder}: not a bim-export bundle (no manifest.json)"],
                     unchanged=[folder / "notes.txt"])


def _info_of_a_checkpoint(tmp: Path, ckpt: Path) -> InputCase:
    copy = shutil.copytree(ckpt, tmp / "ckpt")
    (copy / "manifest.json").write_text('{"name": "my settings"}\n')  # JSON, but not a bundle's
    return InputCase(["info", str(copy)], [f"{copy / 'manifest.json'}: not a bim-export bundle's manifest (no "
                                           "format_version, bim_export_version, profile, files)"],
                     unchanged=[copy / "manifest.json", copy / "config.json"])


def _info_of_a_missing_folder(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(["info", str(tmp / "exports" / "jetson")], [f"{tmp / 'exports' / 'jetson'}: no such bundle folder"])



def _early_exit_on_a_per_exit_checkpoint(tmp: Path, ckpt: Path) -> InputCase:
    from finetuned import make_finetuned

    per_exit = make_finetuned(tmp / "per-exit", "per_exit", ("cat", "dog"), source=ckpt)
    return InputCase(["--target", "raspberry-pi-5", "--checkpoint", str(per_exit), "--early-exit", "--out",
                      str(tmp / "out")],
                     [f"{per_exit / 'config.json'}: --early-exit needs a joint fine-tuned checkpoint",
                      "fine-tuned per exit"], absent=[tmp / "out"], unchanged=[per_exit / "config.json"])


def _early_exit_on_a_pretrained_checkpoint(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(["export", "--target", "raspberry-pi-5", "--checkpoint", str(ckpt), "--early-exit", "1",
                      "--out", str(tmp / "out")],
                     ["--early-exit needs a joint fine-tuned checkpoint", "not fine-tuned"], absent=[tmp / "out"])


def _early_exit_without_held_out_images(tmp: Path, ckpt: Path) -> InputCase:
    from finetuned import make_finetuned

    joint = make_finetuned(tmp / "joint", "joint", ("cat", "dog"), source=ckpt)  # its split names no files
    return InputCase(["export", "--target", "raspberry-pi-5", "--checkpoint", str(joint), "--early-exit",
                      "--out", str(tmp / "out")],
                     ["finetune.split names no held-out images", "--eval-data DIR"], absent=[tmp / "out"])

INPUT_CASES = [
    pytest.param(_calibrate_on_another_device, id="calibrate-on-a-machine-that-is-not-the-device"),
    pytest.param(_validate_latency_on_another_device, id="validate-check-latency-on-a-machine-that-is-not-the-device"),
    pytest.param(_profile_key_without_its_colon, id="profiles-check-key-without-colon-names-its-own-line"),
    pytest.param(_info_of_a_user_folder, id="info-a-folder-that-is-not-a-bundle"),
    pytest.param(_info_of_a_checkpoint, id="info-a-foreign-manifest-json"),
    pytest.param(_info_of_a_missing_folder, id="info-no-such-folder"),
    pytest.param(_early_exit_on_a_per_exit_checkpoint, id="export-early-exit-on-a-per-exit-checkpoint"),
    pytest.param(_early_exit_on_a_pretrained_checkpoint, id="export-early-exit-on-a-checkpoint-not-fine-tuned"),
    pytest.param(_early_exit_without_held_out_images, id="export-early-exit-no-held-out-images-nor-eval-data"),
    pytest.param(_unknown_arch_export, id="export-checkpoint-config-arch-unknown"),
    pytest.param(_multi_exit_of_a_per_exit_checkpoint, id="export-multi-exit-of-a-per-exit-finetuned-checkpoint"),
    pytest.param(_unknown_arch_backbone, id="backbone-checkpoint-config-arch-unknown"),
    pytest.param(_unknown_arch_eval, id="eval-checkpoint-config-arch-unknown"),
    pytest.param(_unknown_model_train, id="train-model-unknown-names-5-closest"),
    pytest.param(_bomb_only_train, id="train-data-only-a-decompression-bomb"),
    pytest.param(_bomb_only_export, id="export-data-only-a-decompression-bomb"),
    pytest.param(_bomb_only_eval, id="eval-data-only-a-decompression-bomb"),
    pytest.param(_one_tiny_image_for_parity, id="export-data-one-1x1-image-too-few-for-parity"),
    pytest.param(_resume_without_checkpoint, id="train-resume-no-checkpoint-in-out"),
    pytest.param(_resume_unsafe_train_state, id="train-resume-train-state-unsafe-pickle"),
    pytest.param(_exits_against_yaml_loss_weights, id="train-exits-flag-against-yaml-loss-weights"),
    pytest.param(_resume_with_a_value_other_than_auto, id="train-resume-value-not-auto"),
    pytest.param(_profile_opset_too_old_for_the_graph, id="export-profile-opset-16-too-old",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("build", INPUT_CASES)
def test_bad_input_is_one_error_line_and_touches_nothing(build, tmp_path, tiny_checkpoint, capsys):
    case = build(tmp_path, tiny_checkpoint)
    before = {p: p.read_bytes() for p in case.unchanged}
    rc = main(case.argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    for fragment in case.expect:
        assert fragment in errors[0]
    assert len(errors[0]) < 400  # one readable line, not a list of every valid name
    assert out == ""  # no partial output
    for path in case.absent:
        assert not path.exists(), f"{path} was written"
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was changed"


# ========================================================================= training data and --init
# What `train` reads besides its settings: the image folder (listed at start-up, a sample decoded,
# unreadable images met later replaced, a batch that cannot be filled an error) and the --init
# weights (a file, a folder or a timm name; checked against the model before any training). Same
# rule as the inputs block: exit 2, one `error:` line naming the file and what is wrong, nothing
# written. The Hugging Face endpoint is one that never resolves, so the timm-name cases fail the same
# way with or without a network.


def _tiny_vit_weights(path: Path, **model_args) -> Path:
    import timm
    from safetensors.torch import save_file

    args = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2, **model_args}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    else:
        torch.save({"model": vit.state_dict()}, path)
    return path


def _init_train(tmp: Path, source: str, *extra: str) -> list[str]:
    return _train_cmd(tmp, tmp / "run", "--init", source, *extra)


def _init_missing_file(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(_init_train(tmp, str(tmp / "weights" / "vit.pth")),
                     [f"--init: {tmp / 'weights' / 'vit.pth'}: no such file or folder"], absent=[tmp / "run"])


def _init_corrupt_pth(tmp: Path, ckpt: Path) -> InputCase:
    (tmp / "vit.pth").write_bytes(b"PK\x03\x04 not really a torch zip")
    return InputCase(_init_train(tmp, str(tmp / "vit.pth")),
                     [f"--init: {tmp / 'vit.pth'}: corrupt or unreadable weights file"], absent=[tmp / "run"])


def _init_corrupt_safetensors(tmp: Path, ckpt: Path) -> InputCase:
    good = _tiny_vit_weights(tmp / "good.safetensors").read_bytes()
    (tmp / "vit.safetensors").write_bytes(good[: len(good) // 2])
    return InputCase(_init_train(tmp, str(tmp / "vit.safetensors")),
                     [f"--init: {tmp / 'vit.safetensors'}: not a readable safetensors file"], absent=[tmp / "run"])


def _init_unsafe_pickle(tmp: Path, ckpt: Path) -> InputCase:
    torch.save({"model": {}, "args": shutil.rmtree}, tmp / "vit.pth")  # would call a function on load
    return InputCase(_init_train(tmp, str(tmp / "vit.pth")),
                     [f"--init: {tmp / 'vit.pth'}: unsafe weights file, refused", "(shutil.rmtree)"],
                     absent=[tmp / "run"], unchanged=[tmp / "vit.pth"])


class _RunsOnLoad:
    """Unpickling this calls a function: what a malicious weights file does."""

    def __init__(self, victim: Path):
        self.victim = victim

    def __reduce__(self):
        return shutil.rmtree, (str(self.victim),)


def _in_plain_pickle(tmp: Path, protocol: int) -> tuple[Path, Path]:
    """A weights file written with pickle.dump (not torch.save) whose loading would delete a folder."""
    import pickle

    victim = tmp / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("still here\n")
    with open(tmp / "vit.pth", "wb") as f:
        pickle.dump({"model": _RunsOnLoad(victim)}, f, protocol=protocol)
    return tmp / "vit.pth", victim / "keep.txt"


def _init_plain_pickle_protocol_4(tmp: Path, ckpt: Path) -> InputCase:
    # torch's safe loader stops at protocol 4's first opcode (and warns about the protocol): the
    # file is still told apart from a corrupt one by what it would import
    weights, kept = _in_plain_pickle(tmp, protocol=4)
    return InputCase(_init_train(tmp, str(weights)),
                     [f"--init: {weights}: unsafe weights file, refused", "(shutil.rmtree)"],
                     absent=[tmp / "run"], unchanged=[weights, kept])


def _init_pickle_of_a_blocked_module(tmp: Path, ckpt: Path) -> InputCase:
    # torch words this refusal differently ("... whose module posix is blocked")
    torch.save({"model": {}, "hook": os.system}, tmp / "vit.pth")
    return InputCase(_init_train(tmp, str(tmp / "vit.pth")),
                     [f"--init: {tmp / 'vit.pth'}: unsafe weights file, refused", f"({os.system.__module__}.system)"],
                     absent=[tmp / "run"], unchanged=[tmp / "vit.pth"])


def _init_other_width(tmp: Path, ckpt: Path) -> InputCase:
    src = _tiny_vit_weights(tmp / "vit_s.safetensors", embed_dim=48)
    return InputCase(_init_train(tmp, str(src)),
                     [f"--init: {src}: key cls_token: [1, 1, 48] in the source, [1, 1, 32] in the model"],
                     absent=[tmp / "run"])


def _init_other_depth(tmp: Path, ckpt: Path) -> InputCase:
    src = _tiny_vit_weights(tmp / "deeper.pth", depth=6)
    return InputCase(_init_train(tmp, str(src)),
                     [f"--init: {src}: key blocks.4.norm1.weight: [32] in the source, absent in the model: the "
                      f"source has 6 blocks, the model 4 (model_args.depth)"], absent=[tmp / "run"])


def _init_other_patch_size_in_yaml(tmp: Path, ckpt: Path) -> InputCase:
    src = _tiny_vit_weights(tmp / "p4.safetensors", patch_size=4)
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY_TRAIN_YAML + f"init: {src}\n")
    return InputCase(["train", "--config", str(cfg), "--out", str(tmp / "run")],
                     [f"{cfg}: init: {src}: key patch_embed.proj.weight: [32, 3, 4, 4] in the source, "
                      f"[32, 3, 8, 8] in the model"], absent=[tmp / "run"])


def _init_timm_name_offline(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(_init_train(tmp, "vit_tiny_patch16_224.augreg_in21k"),
                     ["--init: vit_tiny_patch16_224.augreg_in21k: pretrained weights not in the local cache, and "
                      "hub.invalid cannot be reached"], absent=[tmp / "run"])


def _init_unknown_timm_name(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(_init_train(tmp, "vit_tiny_patch16_224.mea"),
                     ["--init: vit_tiny_patch16_224.mea: Invalid pretrained tag (mea)"], absent=[tmp / "run"])


def _data_all_unreadable_sampled(tmp: Path, ckpt: Path) -> InputCase:
    data = tmp / "photos"
    data.mkdir()
    for i in range(50):
        (data / f"img{i:02d}.jpg").write_bytes(b"\xff\xd8 not a real jpeg")
    return InputCase(_train_cmd(tmp, tmp / "run", "--data", str(data)),
                     [f"{data}: none of 32 image files sampled (of 50) is readable (first: img"],
                     absent=[tmp / "run"])


def _data_batch_cannot_be_filled(tmp: Path, ckpt: Path) -> InputCase:
    data = tmp / "photos"
    data.mkdir()
    (data / "good.jpg").write_bytes(sorted(sample_images_dir().rglob("*.jpg"))[0].read_bytes())
    for i in range(30):
        (data / f"bad{i:02d}.jpg").write_text("not an image")
    return InputCase(_train_cmd(tmp, tmp / "run", "--data", str(data), "--set", "steps=20"),
                     [f"{data}: none of 4 images in a row of the training stream is readable"], absent=[tmp / "run"])


def _data_pipeline_gpu_without_cuda(tmp: Path, ckpt: Path) -> InputCase:
    return InputCase(_train_cmd(tmp, tmp / "run", "--set", "data_pipeline=gpu", "--set", "device=cpu"),
                     ["--set data_pipeline: gpu needs training on CUDA (device is cpu)"], absent=[tmp / "run"])


TRAIN_INPUT_CASES = [
    pytest.param(_init_missing_file, id="train-init-file-missing"),
    pytest.param(_init_corrupt_pth, id="train-init-pth-corrupt"),
    pytest.param(_init_corrupt_safetensors, id="train-init-safetensors-truncated"),
    pytest.param(_init_unsafe_pickle, id="train-init-pth-unsafe-pickle"),
    pytest.param(_init_plain_pickle_protocol_4, id="train-init-plain-pickle-protocol-4-runs-code"),
    pytest.param(_init_pickle_of_a_blocked_module, id="train-init-pth-function-of-a-blocked-module"),
    pytest.param(_init_other_width, id="train-init-other-width-names-key-and-shapes"),
    pytest.param(_init_other_depth, id="train-init-other-depth-names-key-and-shapes"),
    pytest.param(_init_other_patch_size_in_yaml, id="train-init-in-yaml-other-patch-size"),
    pytest.param(_init_timm_name_offline, id="train-init-timm-name-no-network-no-cache"),
    pytest.param(_init_unknown_timm_name, id="train-init-timm-tag-unknown"),
    pytest.param(_data_all_unreadable_sampled, id="train-data-50-unreadable-images-sampled"),
    pytest.param(_data_batch_cannot_be_filled, id="train-data-a-batch-cannot-be-filled"),
    pytest.param(_data_pipeline_gpu_without_cuda, id="train-data-pipeline-gpu-without-cuda"),
]


@pytest.mark.parametrize("build", TRAIN_INPUT_CASES)
def test_bad_training_input_is_one_error_line_and_touches_nothing(build, tmp_path, tiny_checkpoint, capsys,
                                                                  monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # never resolves (RFC 2606)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    test_bad_input_is_one_error_line_and_touches_nothing(build, tmp_path, tiny_checkpoint, capsys)


def test_unsafe_pickle_error_comes_alone_on_stderr(tmp_path):
    """As a user sees it: no warning of torch's (pickle protocol, weights_only default) before the
    one error line, and the file's code did not run."""
    import subprocess

    weights, kept = _in_plain_pickle(tmp_path, protocol=4)
    done = subprocess.run([sys.executable, "-m", "bim_export.cli", *_init_train(tmp_path, str(weights))],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"error: --init: {weights}: "
                                                                                         "unsafe weights file"), done.stderr
    assert kept.read_text() == "still here\n" and not (tmp_path / "run").exists()


# ===================================================================== end training data and --init


# ====================================================================================== finetune
# What `finetune` reads: a labelled folder (one sub-folder per class, at least two classes, enough
# images in each to hold some out), an optional validation folder with the same classes, and a
# checkpoint that may already be fine-tuned (on the same labels, unless its heads are replaced).
# Same rule: exit 2, one `error:` line naming the folder or file and what is wrong, nothing written.


def _in_labelled(root: Path, counts: dict[str, int]) -> Path:
    """A folder of real JPEGs: ``counts[name]`` images in sub-folder ``name`` ("" = directly in it)."""
    photos = sorted(sample_images_dir().rglob("*.jpg"))
    k = 0
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            shutil.copy(photos[k % len(photos)], root / name / f"img{k:03d}.jpg")
            k += 1
    return root


def _finetune_cmd(tmp: Path, ckpt: Path, data: Path, *extra: str) -> list[str]:
    return ["finetune", str(ckpt), "--data", str(data), "--out", str(tmp / "run"), "--set", "num_workers=0", *extra]


def _finetune_unlabelled(tmp: Path, ckpt: Path) -> InputCase:
    data = _in_labelled(tmp / "photos", {"": 6})
    return InputCase(_finetune_cmd(tmp, ckpt, data),
                     [f"{data}: fine-tuning needs one sub-folder per class", "found 6 images directly in it"],
                     absent=[tmp / "run"])


def _finetune_single_class(tmp: Path, ckpt: Path) -> InputCase:
    data = _in_labelled(tmp / "photos", {"cat": 6})
    return InputCase(_finetune_cmd(tmp, ckpt, data), [f"{data}: fine-tuning needs at least 2 classes", "found 1: cat"],
                     absent=[tmp / "run"])


def _finetune_class_too_small(tmp: Path, ckpt: Path) -> InputCase:
    data = _in_labelled(tmp / "photos", {"cat": 6, "dog": 1})
    return InputCase(_finetune_cmd(tmp, ckpt, data),
                     [f"{data}: class dog (1 image): the held-out split needs at least 2 images per class"],
                     absent=[tmp / "run"])


def _finetune_val_classes_differ(tmp: Path, ckpt: Path) -> InputCase:
    data = _in_labelled(tmp / "photos", {"cat": 3, "dog": 3})
    val = _in_labelled(tmp / "val", {"cat": 2, "fox": 2})
    return InputCase(_finetune_cmd(tmp, ckpt, data, "--val-data", str(val)),
                     [f"{val}: --val-data classes differ from {data}'s (missing: dog; not in --data: fox)"],
                     absent=[tmp / "run"])


def _finetune_other_labels(tmp: Path, ckpt: Path) -> InputCase:
    from finetuned import make_finetuned

    tuned = make_finetuned(tmp / "tuned", labels=("cat", "dog", "fish"), source=ckpt)
    data = _in_labelled(tmp / "photos", {"cat": 3, "dog": 3})
    return InputCase(_finetune_cmd(tmp, ckpt, data)[:1] + [str(tuned)] + _finetune_cmd(tmp, ckpt, data)[2:],
                     [f"{tuned / 'config.json'}: finetune.labels: the checkpoint is already fine-tuned on other labels "
                      "(gone: fish); pass --set head=new"],
                     absent=[tmp / "run"], unchanged=[tuned / "config.json", tuned / "weights.safetensors"])


FINETUNE_INPUT_CASES = [
    pytest.param(_finetune_unlabelled, id="finetune-data-without-class-sub-folders"),
    pytest.param(_finetune_single_class, id="finetune-data-a-single-class"),
    pytest.param(_finetune_class_too_small, id="finetune-data-class-too-small-to-split-named"),
    pytest.param(_finetune_val_classes_differ, id="finetune-val-data-classes-differ-listed"),
    pytest.param(_finetune_other_labels, id="finetune-checkpoint-fine-tuned-on-other-labels"),
]


@pytest.mark.parametrize("build", FINETUNE_INPUT_CASES)
def test_bad_finetune_input_is_one_error_line_and_touches_nothing(build, tmp_path, tiny_checkpoint, capsys):
    test_bad_input_is_one_error_line_and_touches_nothing(build, tmp_path, tiny_checkpoint, capsys)


# ================================================================================== end finetune
