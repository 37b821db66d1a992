"""``bim-export export`` / ``bim-export --target`` end to end: exit codes 0, 2, 3, 4 and their output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bim_export.cli import main
from bim_export.core.resources import resource_dir
from export_cache import memoize_exports


@pytest.fixture(scope="session", autouse=True)
def _shared_exports(tmp_path_factory):
    """Exports of the tiny checkpoint are made once for all tests (see export_cache.py)."""
    with pytest.MonkeyPatch.context() as mp:
        memoize_exports(mp, tmp_path_factory.mktemp("export-store"))
        yield


def _profile_yaml(tmp_path: Path, name: str = "tiny-edge", **budgets) -> Path:
    """A user profile: the shipped Raspberry Pi 5 with other budgets."""
    prof = yaml.safe_load((resource_dir("profiles") / "raspberry-pi-5.yaml").read_text())
    prof["budgets"].update(budgets)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, contextlib, io\n"
            "from bim_export.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'matplotlib', 'timm') if m in sys.modules]\n"
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_a_reader_that_leaves_early_is_no_error():
    """`bim-export profiles show NAME | head -1`: the reader closed the pipe before the command wrote
    (here: before it even started); the command ends quietly, exit 0, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "bim_export.cli", "profiles", "show", "raspberry-pi-5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_unknown_target_exit_2_with_close_matches(tmp_path, capsys):
    assert main(["--target", "jetsn", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "jetson" in err and "did you mean" in err
    assert _leftovers(tmp_path) == []


def test_missing_checkpoint_exit_2(tmp_path, capsys):
    assert main(["export", "--target", "jetson", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err
    assert _leftovers(tmp_path / "o") == []


def test_corrupt_checkpoint_exit_2(tmp_path, tiny_checkpoint, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "config.json").write_text("{ not json")
    assert main(["--target", "edge-cpu", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err
    assert _leftovers(tmp_path / "o") == []


def test_impossible_budget_exit_3_table_on_stdout(tmp_path, tiny_checkpoint, capsys):
    yaml_path = _profile_yaml(tmp_path, latency_ms=0.0001)
    out = tmp_path / "exports"
    assert main(["--target", str(yaml_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 3
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "latency" in last
    assert "rejected" in captured.out and "int8" in captured.out and "fp32" in captured.out
    assert _leftovers(out) == []  # no bundle, no work folder


def _progress_lines(err: str) -> list[tuple[int, int, str]]:
    """The ``[k/n] what item (profile)`` lines of stderr as (k, n, rest)."""
    found = [re.match(r"^\[ *(\d+)/(\d+)\] (.*)$", line) for line in err.splitlines()]
    return [(int(m[1]), int(m[2]), m[3]) for m in found if m]


def test_export_exit_0_writes_bundle(tmp_path, tiny_checkpoint, capsys):
    yaml_path = _profile_yaml(tmp_path, latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    out = tmp_path / "exports"
    assert main(["--target", str(yaml_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    bundle = out / "tiny-edge"
    assert f"bundle: {bundle}" in stdout
    # progress: off a terminal, one line per step on stderr, counted stage by stage; none on stdout
    assert not _progress_lines(stdout) and stdout.lstrip().startswith("depth")
    steps = _progress_lines(captured.err)
    assert len(steps) == len(captured.err.splitlines())  # nothing else at the default verbosity
    assert all(text.endswith("(tiny-edge)") for _, _, text in steps)
    assert steps[0] == (1, 4, "export depth 2 fp32 (tiny-edge)")  # exits 2, 4 x fp32, int8
    assert steps[1] == (2, 4, "convert depth 2 int8 (tiny-edge)")
    k_prev = 0
    for k, n, _ in steps:  # each stage counts 1..n
        assert k == k_prev + 1 or k == 1
        k_prev = k if k < n else 0
    assert k_prev == 0
    verbs = [text.split(" depth")[0] for _, _, text in steps]
    assert verbs == ["export", "convert", "cut", "cut", *["predict"] * 4, *["parity"] * 4, "check", "write"]
    assert _leftovers(out) == ["tiny-edge"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["profile"] == "tiny-edge" and manifest["latency"]["source"] == "predicted"
    assert manifest["candidates"]["choice"] == {"depth": manifest["depth"], "precision": manifest["precision"]}


def test_verbose_shows_bim_exports_log_not_the_libraries(tmp_path, tiny_checkpoint, capsys):
    yaml_path = _profile_yaml(tmp_path, latency_ms=0.0001)  # pruned on prediction: a short run
    args = ["--target", str(yaml_path), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]
    assert main(["-v", *args]) == 3
    err = capsys.readouterr().err.splitlines()
    records = [line for line in err if not _progress_lines(line) and not line.startswith("error: ")]
    assert any(line.startswith("INFO bim_export.deploy.workshop: exporting exits [2, 4]") for line in records)
    assert records and all(line.split(" ")[1].startswith("bim_export.") for line in records)
    assert main(args) == 3  # without -v: progress and the error line only
    err = capsys.readouterr().err.splitlines()
    assert all(_progress_lines(line) for line in err[:-1]) and err[-1].startswith("error: ")


def test_fp32_parity_failure_exit_4_no_bundle(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from bim_export.deploy import candidates

    real = candidates.Workshop.reference

    def skewed(self, depth):  # as if the exported graph computed something else
        ref = real(self, depth)
        return {k: v + 1.0 for k, v in ref.items()}

    monkeypatch.setattr(candidates.Workshop, "reference", skewed)
    yaml_path = _profile_yaml(tmp_path, latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    out = tmp_path / "exports"
    previous = out / "tiny-edge"  # a previous bundle (recognised by its manifest), which may be replaced
    previous.mkdir(parents=True)
    (previous / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "bim_export_version": "0", "profile": "tiny-edge", "files": {}}))
    (previous / "model.onnx").write_text("previous model")
    assert main(["--target", str(yaml_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 4
    err = capsys.readouterr().err.splitlines()
    assert all(re.match(r"^\[ *\d+/\d+\] ", line) for line in err[:-1])  # the progress, then the one error line
    assert err[-1].startswith("error: ") and "fp32 parity failed" in err[-1]
    assert _leftovers(out) == ["tiny-edge"]
    assert _leftovers(previous) == ["manifest.json", "model.onnx"]  # what was there before, untouched
    assert (previous / "model.onnx").read_text() == "previous model"


def test_export_removes_work_folders_of_killed_runs_only(tmp_path, tiny_checkpoint, capsys):
    from bim_export.core import atomic
    from bim_export.core.stale import owner_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "exports"
    out.mkdir()
    stale = out / f"{atomic.WORK_PREFIX}{owner_tag(pid=dead.pid, start=1)}"  # a killed earlier run's
    stale.mkdir()
    live = atomic.owned_temp(out, atomic.WORK_PREFIX, folder=True)  # a run still going (this process)
    for p in (stale, live):
        (p / "d2-fp32-17.onnx").write_bytes(b"x" * 1000)
    yaml_path = _profile_yaml(tmp_path, latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    assert main(["--target", str(yaml_path), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert _leftovers(out) == sorted(["tiny-edge", live.name])
    assert _leftovers(live) == ["d2-fp32-17.onnx"]


@pytest.mark.slow
def test_finetune_defaults_to_the_shipped_checkpoint_and_labelled_photos(tmp_path, capsys):
    """The README's first fine-tuning command: no CHECKPOINT, no --data; the classifier's labels are
    the shipped labelled photos' classes, and its held-out split is theirs."""
    from bim_export.core.resources import heldout_images_dir
    from bim_export.model import classifier
    from bim_export.model.checkpoint import load_checkpoint

    assert main(["finetune", "--out", str(tmp_path / "demo"), "--set", "epochs=1"]) == 0
    cfg = load_checkpoint(tmp_path / "demo", weights=False).config
    assert classifier.labels(cfg) == sorted(p.name for p in heldout_images_dir().iterdir() if p.is_dir())
    assert cfg["finetune"]["split"]["name"] == "heldout_images" and "shipped labelled photos" in capsys.readouterr().err
