"""The bundle writer: every file present, hashes right, atomic, a readable report and plot."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from tiny_onnx import SIZE, write_tiny_onnx

from bim_export.deploy import bundle as bundle_mod
from bim_export.deploy.bundle import BundleSpec, PlotPoint, file_hashes, write_bundle
from bim_export.machine import sha256_file

EXPECTED = {"model.onnx", "manifest.json", "reference.npz", "report.md", "pareto.png", "infer.py", "common.py", "validate.py",
            "parity.py", "knn.py", "machine.py"}


def _spec(tmp_path, script="jetson.py") -> BundleSpec:
    model = write_tiny_onnx(tmp_path / "cached.onnx", {"exporter": "torch.onnx (test)", "depth": "4"})
    rng = np.random.default_rng(0)
    points = [
        PlotPoint(4, "fp32", 12.0, 0.61, rejected="latency p90 12 ms > 8 ms"),
        PlotPoint(4, "int8", 5.0, 0.60, chosen=True, source="predicted"),
        PlotPoint(2, "fp32", 6.5, 0.48),
        PlotPoint(2, "int8", 3.1, 0.30, rejected="parity failed: cosine 0.97 < 0.995"),
        PlotPoint(1, "int8", None, 0.2, rejected="pruned"),
    ]
    manifest = {
        "profile": "jetson-orin-nano", "depth": 4, "precision": "int8", "opset": 17, "batch": 1,
        "preprocessing": {"img_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3},
        "parity": {"passed": True, "batch_n": 8, "note": "",
                   "batch1": {"cosine": 0.999, "cosine_min": 0.998, "max_abs": 0.01, "mean_abs": 0.001, "images": 4,
                              "neighbour_agreement": None, "passed": True},
                   "batchN": {"cosine": 0.998, "cosine_min": 0.997, "max_abs": 0.02, "mean_abs": 0.002, "images": 8,
                              "neighbour_agreement": 1.0, "agreement_kind": "knn_top1", "passed": True}},
        "latency": {"ms": 5.0, "stat": "p90", "source": "predicted", "expected_error": 0.2},
        "candidates": {"choice": {"depth": 4, "precision": "int8"}, "candidates": []},
    }
    reference = {"pixels": rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32),
                 "embedding": rng.standard_normal((2, 16)).astype(np.float32), "labels": np.array([0, 1])}
    return BundleSpec(profile_name="jetson-orin-nano", script=script, model_path=model, reference=reference,
                      manifest=manifest, table="depth  precision  status\n4      int8       chosen", points=points,
                      budget_ms=8.0, latency_stat="p90", why="Depth 4 int8 is the best within budget.")


@pytest.fixture
def spec(tmp_path):
    return _spec(tmp_path)


def test_bundle_has_every_file_and_hashes(tmp_path, spec):
    dest = write_bundle(tmp_path / "exports", spec)
    assert dest == tmp_path / "exports" / "jetson-orin-nano"
    assert {p.name for p in dest.iterdir()} == EXPECTED
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert sha256_file(dest / name) == digest
    assert manifest["exporter"] == "torch.onnx (test)"
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "timm", "bim_export"}
    assert manifest["io"] == {"input": "pixels", "outputs": ["tokens", "embedding"]}
    assert manifest["latency"]["source"] == "predicted" and manifest["depth"] == 4
    assert manifest["infer_script"] == "jetson.py"
    assert "TensorrtExecutionProvider" in (dest / "infer.py").read_text()
    for name, src in bundle_mod.validator_files().items():
        assert (dest / name).read_bytes() == src.read_bytes()
    ref = np.load(dest / "reference.npz")
    np.testing.assert_array_equal(ref["pixels"], spec.reference["pixels"])
    onnx.checker.check_model(str(dest / "model.onnx"), full_check=True)
    props = {p.key: p.value for p in onnx.load(str(dest / "model.onnx")).metadata_props}
    assert props["profile"] == "jetson-orin-nano" and props["depth"] == "4" and props["precision"] == "int8"


def test_report_states_choice_sources_and_how_to_run(tmp_path, spec):
    report = (write_bundle(tmp_path, spec) / "report.md").read_text()
    assert "depth 4 (int8)" in report and "source: **predicted**" in report
    assert "4      int8       chosen" in report
    assert "| batch 8 | 8 | 0.998000 / 0.997000 | 100.0% (knn_top1) | 0.02 | 0.002 | yes |" in report
    assert "python infer.py" in report and "python validate.py ." in report
    assert "onnxruntime-gpu" in report  # jetson needs the GPU build


def test_pareto_png_is_an_image(tmp_path, spec):
    dest = write_bundle(tmp_path, spec)
    data = (dest / "pareto.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_failed_write_leaves_previous_bundle(tmp_path, spec, monkeypatch):
    first = write_bundle(tmp_path, spec)
    before = file_hashes(first)

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupted export

    monkeypatch.setattr(bundle_mod, "plot_pareto", boom)
    spec.manifest["depth"] = 2
    with pytest.raises(KeyboardInterrupt):
        write_bundle(tmp_path, spec)
    assert file_hashes(first) == before
    assert json.loads((first / "manifest.json").read_text())["depth"] == 4
    assert sorted(os.listdir(tmp_path)) == ["cached.onnx", "jetson-orin-nano"]  # no temporary folder left


def test_failed_first_write_leaves_nothing(tmp_path, spec, monkeypatch):
    monkeypatch.setattr(bundle_mod, "render_report", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_bundle(tmp_path / "exports", spec)
    assert list((tmp_path / "exports").iterdir()) == []


def test_bundle_runs_standalone(tmp_path):
    """The bundle's infer.py works from the bundle folder with only onnxruntime, numpy, Pillow."""
    import subprocess
    import sys

    from PIL import Image

    dest = write_bundle(tmp_path / "exports", _spec(tmp_path, script="cpu.py"))
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(img)
    done = subprocess.run([sys.executable, "-s", "-E", str(dest / "infer.py"), str(img)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(dim 16," in done.stdout
