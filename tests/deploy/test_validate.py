"""validate.py: parity figures and their verdict, and re-validation of a bundle, also standalone."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from bim_export.cli import main as cli_main
from bim_export.core.errors import InputError, ValidationError
from bim_export.deploy.bundle import validator_files
from bim_export.deploy.export import export_onnx
from bim_export.model.images import load_image_array, sample_images
from bim_export.runtime.machine import machine_description
from bim_export.runtime.parity import compare_outputs, merge_results, session_emulation_note
from bim_export.runtime.session import run_onnx, session
from bim_export.runtime.validate import validate_bundle

SIZE = 32


@pytest.fixture(scope="module")
def images():
    x, y = load_image_array(sample_images(), SIZE, limit=20, seed=3)
    return x, y


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE,
                             patch_size=8, depth=4, embed_dim=32, num_heads=2).eval()


@pytest.fixture(scope="module")
def onnx_model(backbone, tmp_path_factory):
    return export_onnx(backbone, tmp_path_factory.mktemp("val") / "model.onnx", opset=17, img_size=SIZE,
                       metadata={"depth": 4, "precision": "fp32"})


@pytest.fixture(scope="module")
def reference(backbone, images):
    x, y = images
    with torch.inference_mode():
        tokens = backbone.forward_features(torch.from_numpy(x))
        emb = backbone.forward_head(tokens, pre_logits=True)
    return {"pixels": x, "tokens": tokens.numpy(), "embedding": emb.numpy(), "labels": y}


def outputs_of(ref):
    return {k: ref[k].copy() for k in ("tokens", "embedding")}


# ---------------------------------------------------------------------------- compare_outputs


def test_identical_outputs_pass_with_perfect_figures(reference):
    r = compare_outputs(reference, outputs_of(reference), {"cosine": 0.999, "neighbour_agreement": 1.0},
                        labels=reference["labels"])
    assert r.passed and r.failures == []
    assert r.max_abs == 0 and r.cosine == pytest.approx(1.0) and r.neighbour_agreement == 1.0
    assert r.agreement_kind == "knn_top1" and r.images == 20


def test_corrupted_embedding_fails_and_names_output_and_figure(reference):
    test = outputs_of(reference)
    rng = np.random.default_rng(0)
    test["embedding"][:5] = rng.standard_normal(test["embedding"][:5].shape)  # 5 of 20 images garbage
    r = compare_outputs(reference, test, {"cosine": 0.995, "neighbour_agreement": 0.99})
    assert not r.passed
    assert any(f.startswith("embedding: cosine") for f in r.failures), r.failures
    assert r.cosine_min < 0.5 < r.cosine
    assert r.agreement_kind == "nearest_neighbour" and r.neighbour_agreement < 1.0


def test_every_failure_is_collected(reference):
    test = outputs_of(reference)
    test["tokens"][0, 0, 0] = np.nan
    test["embedding"] += 0.5
    r = compare_outputs(reference, test, SimpleNamespace(cosine=0.9999, neighbour_agreement=0.5, max_abs=1e-3))
    joined = "\n".join(r.failures)
    assert "tokens: 1 non-finite values" in joined
    assert "embedding: max abs error 0.5 > 0.001" in joined
    assert "embedding: cosine" in joined
    assert not r.passed


def test_missing_and_misshaped_outputs_are_failures(reference):
    r = compare_outputs(reference, {"embedding": reference["embedding"][:3]})
    assert r.failures[0].startswith("tokens: missing from the tested outputs")
    assert "embedding: shape [3, 32] differs from the reference [20, 32]" in r.failures[1]


def test_tuple_outputs_and_default_tolerances(reference):
    r = compare_outputs((reference["tokens"], reference["embedding"]), outputs_of(reference))
    assert r.passed and r.tolerances == {"cosine": 0.995, "neighbour_agreement": 0.99, "max_abs": None}


def test_merge_keeps_worst_figures_and_labels_failures(reference):
    good = compare_outputs(reference, outputs_of(reference), label="batch 8")
    bad_out = outputs_of(reference)
    bad_out["embedding"] = -bad_out["embedding"]
    bad = compare_outputs(reference, bad_out, label="batch 1")
    m = merge_results([good, bad], label="int8")
    assert not m.passed and m.cosine == bad.cosine
    assert m.failures and all(f.startswith("batch 1: ") for f in m.failures)
    assert json.loads(json.dumps(m.to_dict()))["label"] == "int8"


# ------------------------------------------------------------------------ ONNX Runtime vs PyTorch


def run_parity(onnx_path, backbone, x, tolerances=None, labels=None, *, batches=(1, 8)):
    """ONNX Runtime vs the PyTorch backbone at each batch size, merged: the parity library on a plain
    timm model, as the pipeline runs it on each candidate."""
    with torch.inference_mode():
        tokens = backbone.forward_features(torch.from_numpy(x))
        ref = {"tokens": tokens.numpy(), "embedding": backbone.forward_head(tokens, pre_logits=True).numpy()}
    sess = session(onnx_path)
    precision = sess.get_modelmeta().custom_metadata_map.get("precision")
    note = session_emulation_note(sess)
    return merge_results([compare_outputs(ref, run_onnx(sess, x, b), tolerances, labels,
                                          label=f"{precision} batch {b}", note=note) for b in batches],
                         label=precision)


def test_run_parity_fp32_at_batch_1_and_n(onnx_model, backbone, images):
    x, y = images
    r = run_parity(onnx_model, backbone, x, {"cosine": 0.99999, "neighbour_agreement": 1.0, "max_abs": 1e-4},
                   labels=y, batches=(1, 7))
    assert r.passed, r.failures
    assert set(r.per_output) == {"fp32 batch 1", "fp32 batch 7"}
    assert r.note == ""


def test_run_parity_labels_fp16_on_cpu_as_host_emulated(onnx_model, backbone, images, tmp_path):
    from bim_export.deploy.quantize import convert_precision

    convert_precision(onnx_model, tmp_path / "fp16.onnx", "fp16")
    r = run_parity(tmp_path / "fp16.onnx", backbone, images[0][:6], batches=(1, 6))
    assert r.passed and "host-emulated" in r.note


def test_run_parity_labels_int8_for_another_devices_kernels(onnx_model, backbone, images, tmp_path, monkeypatch):
    import platform

    from bim_export.deploy import quantize

    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("on arm64 the CPU EP runs int8 the way the target does")
    monkeypatch.setattr(quantize, "_optimum_available", lambda: False)
    quantize.convert_precision(onnx_model, tmp_path / "trt.onnx", "int8", calib_x=images[0], preset="tensorrt")
    r = run_parity(tmp_path / "trt.onnx", backbone, images[0][:6], batches=(6,))
    assert r.note == "int8 for tensorrt on CPUExecutionProvider: host-emulated"
    r = run_parity(onnx_model, backbone, images[0][:6], batches=(6,))
    assert r.note == ""


# --------------------------------------------------------------------------- validate_bundle


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def other_architecture() -> str:
    """The architecture this machine is not (the tests run on x86 and ARM hosts alike)."""
    return "aarch64" if machine_description()["architecture"] == "x86_64" else "x86_64"


FOREIGN = {"architecture": other_architecture(), "accelerator": "Jetson Orin Nano", "logical_cores": 6}


def make_bundle(root: Path, onnx_model: Path, reference: dict, profile: str = "host", budget_ms: float = 1e4,
                device: dict | None = None) -> Path:
    """A bundle as the pipeline writes one (the fields validate_bundle reads)."""
    root.mkdir(parents=True)
    shutil.copyfile(onnx_model, root / "model.onnx")
    np.savez(root / "reference.npz", **{k: v[:6] for k, v in reference.items()})
    for name, src in validator_files().items():
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(src, root / name)
    manifest = {
        "format_version": 1, "profile": profile, "depth": 4, "precision": "fp32", "opset": 17, "batch": 2,
        "device": device, "measured": profile == "host",
        "execution_providers": ["TensorrtExecutionProvider", "CPUExecutionProvider"],
        "budgets": {"latency_ms": budget_ms, "latency_stat": "p90"},
        "tolerances": {"cosine": 0.9999, "neighbour_agreement": 0.99},
        "files": {p.relative_to(root).as_posix(): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()},
        "device_validations": [],
    }
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def test_validate_bundle_records_measured_figures(tmp_path, onnx_model, reference):
    bundle = make_bundle(tmp_path / "host", onnx_model, reference)
    report = validate_bundle(bundle)
    assert "PASS" in report and "p90" in report
    manifest = json.loads((bundle / "manifest.json").read_text())
    (rec,) = manifest["device_validations"]
    assert rec["passed"] and rec["failures"] == []
    assert rec["providers"] == ["CPUExecutionProvider"]  # TensorRT is not here: fell back
    assert rec["parity"]["cosine"] > 0.9999 and rec["parity"]["images"] == 6
    lat = rec["latency"]
    assert lat["source"] == "measured" and lat["batch"] == 2 and 0 < lat["p50"] <= lat["p90"]
    assert lat["within_budget"] is True and rec["latency_checked"] is True
    validate_bundle(bundle)  # a second run appends
    assert len(json.loads((bundle / "manifest.json").read_text())["device_validations"]) == 2


def test_parity_failure_raises_exit_4_and_is_still_recorded(tmp_path, onnx_model, reference):
    bad = dict(reference, embedding=-reference["embedding"])
    bundle = make_bundle(tmp_path / "b", onnx_model, bad)
    with pytest.raises(ValidationError, match="embedding: cosine") as e:
        validate_bundle(bundle)
    assert e.value.exit_code == 4
    rec = json.loads((bundle / "manifest.json").read_text())["device_validations"][-1]
    assert rec["passed"] is False and rec["failures"]


def test_changed_file_and_missed_budget_are_reported_together(tmp_path, onnx_model, reference):
    bundle = make_bundle(tmp_path / "b", onnx_model, reference, budget_ms=1e-6)
    with open(bundle / "validate.py", "a", encoding="utf-8") as f:
        f.write("# edited\n")
    with pytest.raises(ValidationError) as e:
        validate_bundle(bundle)
    assert "validate.py: sha256 differs" in str(e.value) and "latency p90" in str(e.value)


def test_latency_of_another_profile_is_recorded_not_judged(tmp_path, onnx_model, reference):
    bundle = make_bundle(tmp_path / "jetson-orin-nano", onnx_model, reference, profile="jetson-orin-nano",
                         budget_ms=1e-6)
    assert "not checked here" in validate_bundle(bundle)
    rec = json.loads((bundle / "manifest.json").read_text())["device_validations"][-1]
    assert rec["latency"]["within_budget"] is False and rec["passed"] is True


def test_not_a_bundle_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a bundle"):
        validate_bundle(tmp_path)


def test_cli_validate_exit_codes(tmp_path, onnx_model, reference, capsys):
    good = make_bundle(tmp_path / "good", onnx_model, reference)
    assert cli_main(["validate", str(good)]) == 0
    bad = make_bundle(tmp_path / "bad", onnx_model, dict(reference, tokens=reference["tokens"] * 2))
    assert cli_main(["validate", str(bad)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    slow = make_bundle(tmp_path / "slow", onnx_model, reference, profile="raspberry-pi", budget_ms=1e-6)
    assert cli_main(["validate", str(slow)]) == 0  # another device's budget: recorded, not judged
    capsys.readouterr()
    # a profile that does not describe its device: no machine is shown to be it
    assert cli_main(["validate", "--check-latency", str(slow)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no device block" in err
    assert cli_main(["validate", "--check-latency", "--force", str(slow)]) == 4
    err = capsys.readouterr().err
    assert "latency p90" in err and "forced: this machine is not the profile's device" in err
    assert "(1 problem, recorded" in err  # one problem, singular


def test_latency_check_on_another_device_is_refused_unless_forced(tmp_path, onnx_model, reference, capsys):
    bundle = make_bundle(tmp_path / "jetson-orin-nano", onnx_model, reference, profile="jetson-orin-nano",
                         budget_ms=1e-6, device=FOREIGN)
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(InputError, match=rf"--check-latency: this machine, .* is not the device of profile "
                                         rf"'jetson-orin-nano' \({FOREIGN['architecture']}, Jetson Orin Nano, 6 "
                                         rf"logical cores\): architecture .*, not {FOREIGN['architecture']}"):
        validate_bundle(bundle, check_latency=True)
    assert (bundle / "manifest.json").read_bytes() == before  # nothing recorded
    assert cli_main(["validate", "--check-latency", str(bundle)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (bundle / "manifest.json").read_bytes() == before

    with pytest.raises(ValidationError, match="latency p90 .* ms > budget 1e-06 ms \\(forced"):
        validate_bundle(bundle, check_latency=True, force=True)
    rec = json.loads((bundle / "manifest.json").read_text())["device_validations"][-1]
    assert rec["forced"] is True and rec["on_profile_device"] is False and rec["latency_checked"] is True
    assert "measured on another machine, not the profile's device (check forced)" in rec["latency"]["note"]
    assert rec["latency"]["machine_mismatch"][0].startswith("architecture ")


def test_latency_on_another_device_is_shown_as_another_machines(tmp_path, onnx_model, reference):
    bundle = make_bundle(tmp_path / "jetson-orin-nano", onnx_model, reference, profile="jetson-orin-nano",
                         device=FOREIGN)
    report = validate_bundle(bundle)
    assert "(measured on another machine, not the profile's device, budget" in report
    rec = json.loads((bundle / "manifest.json").read_text())["device_validations"][-1]
    assert rec["on_profile_device"] is False and rec["forced"] is False and rec["latency_checked"] is False
    assert rec["latency"]["note"] == "measured on another machine, not the profile's device"


def test_latency_check_on_the_profiles_own_device_runs(tmp_path, onnx_model, reference):
    here = machine_description()
    device = {"architecture": here["architecture"], "cpu": here["cpu"], "logical_cores": here["logical_cores"]}
    bundle = make_bundle(tmp_path / "this-box", onnx_model, reference, profile="this-box", device=device)
    report = validate_bundle(bundle, check_latency=True)
    assert "another machine" not in report and "budget 10000.0 ms)" in report
    rec = json.loads((bundle / "manifest.json").read_text())["device_validations"][-1]
    assert rec["on_profile_device"] is True and rec["forced"] is False and "machine_mismatch" not in rec["latency"]


# ------------------------------------------------------------------------------- standalone

_BLOCKED = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['bim_export'] = None; "
            "sys.argv = ['validate.py']; runpy.run_path('validate.py', run_name='__main__')")


def test_standalone_copy_runs_without_torch_or_bim_export(tmp_path, onnx_model, reference):
    good = make_bundle(tmp_path / "good", onnx_model, reference)
    proc = subprocess.run([sys.executable, "-c", _BLOCKED], cwd=good, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout
    rec = json.loads((good / "manifest.json").read_text())["device_validations"][-1]
    assert rec["latency"]["settings"]["in_process"] is True  # bim_export's timing was not importable

    bad = make_bundle(tmp_path / "bad", onnx_model, dict(reference, embedding=reference["embedding"][::-1].copy()))
    proc = subprocess.run([sys.executable, "-c", _BLOCKED], cwd=bad, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4 and proc.stderr.startswith("error: ")

    # the copied machine.py tells another device on its own
    foreign = make_bundle(tmp_path / "foreign", onnx_model, reference, profile="jetson-orin-nano", device=FOREIGN)
    blocked = _BLOCKED.replace("['validate.py']", "['validate.py', '--check-latency']")
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=foreign, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is not the device of profile 'jetson-orin-nano'" in proc.stderr
