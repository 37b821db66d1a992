"""The bad-input corpus: every case named, driven through the CLI, so the next regression shows by name.

Each block below holds its own cases and test functions.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from bim_export.cli import main
from bim_export.resources import resource_dir, sample_images_dir

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


INPUT_CASES = [
    pytest.param(_unknown_arch_export, id="export-checkpoint-config-arch-unknown"),
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
