"""Bundles for the phone profiles, checked with ONNX Runtime's own mobile usability checker.

The checker is run as ORT ships it (``usability_checker.analyze_model``, the function behind
``python -m onnxruntime.tools.check_onnx_model_mobile_usability``) on the bundle's model.onnx, and
its log is read: the same figures must come out as the manifest records.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from profile_copy import profile_copy
from bim_export.core.resources import sample_images_dir
from bim_export.deploy.pipeline import run_export
from bim_export.runtime.validate import validate_bundle


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


def ort_checker(path: Path) -> dict[str, dict]:
    """ORT's analyze_model on ``path``, its log parsed: per EP checked, the figures "as is"."""
    from onnxruntime.tools.mobile_helpers.usability_checker import analyze_model

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(f"ort-usability-{path.parent.name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    analyze_model(Path(path), skip_optimize=False, logger=logger)
    out: dict[str, dict] = {}
    for line in lines:
        m = re.match(r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+) EP\.", line)
        if m and m.group(4) not in out:  # the first is "as is"; a second one would assume fixed shapes
            out[m.group(4)] = {"partitions": int(m.group(1)), "taken": int(m.group(2)), "nodes": int(m.group(3))}
        m = re.match(r"Model should perform well with (.+) as is: (\w+)", line)
        if m:
            out[m.group(1)]["verdict"] = m.group(2)
    return out


@pytest.fixture(scope="module")
def android(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("android")
    run_export("mobile", tiny_checkpoint, out)
    return out / "android-snapdragon-8-gen-2"


@pytest.fixture(scope="module")
def iphone(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iphone")
    run_export("iphone", tiny_checkpoint, out)
    return out / "iphone-15-pro"


def test_android_bundle_is_what_nnapi_takes(android):
    m = json.loads((android / "manifest.json").read_text())
    assert {"model.ort", "required_operators.config"} <= set(m["files"])
    assert m["input"]["shape"] == [1, 3, 32, 32] and m["fixed_batch"] is True
    nnapi = ort_checker(android / "model.onnx")["NNAPI"]
    assert nnapi["taken"] >= 0.99 * nnapi["nodes"] and nnapi["partitions"] <= 2 and nnapi["verdict"] == "YES"
    recorded = m["mobile"]["usability"]["NnapiExecutionProvider"]
    assert (recorded["supported"], recorded["nodes"], recorded["partitions"], recorded["verdict"]) == \
        (nnapi["taken"], nnapi["nodes"], nnapi["partitions"], nnapi["verdict"])
    # every candidate's graph is one NNAPI takes whole; int8 is static QDQ per tensor, as NNAPI runs it
    assert all("NNAPI 100.0%" in row["NnapiExecutionProvider"] for row in m["mobile"]["candidates"].values())
    if m["precision"] == "int8":
        assert m["conversion"]["method"] == "static-qdq" and m["conversion"]["per_channel"] is False
    assert m["parity"]["passed"] and m["mobile"]["ort"]["parity"]["passed"]
    report = (android / "report.md").read_text()
    assert "## On the phone (ONNX Runtime Mobile)" in report
    assert "addNnapi(EnumSet.of(NNAPIFlags.CPU_DISABLED))" in report
    assert "longArrayOf(1, 3, 32, 32)" in report and "| NnapiExecutionProvider | NNAPI |" in report


def test_android_bundle_validates_its_ort_model_and_runs_it(android, tmp_path):
    text = validate_bundle(android)
    record = json.loads((android / "manifest.json").read_text())["device_validations"][-1]
    assert record["passed"] and record["latency"]["model"] == "model.ort"
    assert {"batch 1 (fixed)", "model.ort batch 1 (fixed)"} <= set(record["parity"]["per_output"])
    assert "PASS" in text
    images = sorted(sample_images_dir().rglob("*.jpg"))[:3]
    done = subprocess.run([sys.executable, str(android / "infer.py"), *map(str, images)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "check: model.ort matches model.onnx" in done.stdout and done.stdout.count("(dim 32,") == 3


def test_iphone_bundle_is_one_coreml_mlprogram(iphone, tmp_path):
    m = json.loads((iphone / "manifest.json").read_text())
    assert m["precision"] == "fp32" and m["mobile"]["runs_on"] == "CoreMLExecutionProvider"
    coreml = ort_checker(iphone / "model.onnx")["CoreML MLProgram"]
    assert (coreml["taken"], coreml["partitions"], coreml["verdict"]) == (coreml["nodes"], 1, "YES")
    # CoreML lists no int8 op: int8 candidates are predicted on the CPU cores, and say so
    for row in m["candidates"]["candidates"]:
        assert ("on CoreML" in row["latency_source"]) == (row["precision"] == "fp32"), row["latency_source"]
        assert ("on CPU: CoreML takes" in row["latency_source"]) == (row["precision"] == "int8")
    assert all(c["runs_on"] == ("CoreMLExecutionProvider" if label.endswith("fp32") else "CPUExecutionProvider")
               for label, c in m["mobile"]["candidates"].items())
    report = (iphone / "report.md").read_text()
    assert 'appendCoreMLExecutionProvider(withOptionsV2: ["ModelFormat": "MLProgram"' in report
    image = sorted(sample_images_dir().rglob("*.jpg"))[0]
    done = subprocess.run([sys.executable, str(iphone / "infer.py"), str(image)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "check: model.ort matches model.onnx" in done.stdout


def test_dynamic_batch_file_only_where_asked(android, tiny_checkpoint, tmp_path):
    assert not (android / "model.dynamic.onnx").exists()
    profile = profile_copy(tmp_path, "android-snapdragon-8-gen-2", "phone", dynamic_batch_file=True)
    run_export(str(profile), tiny_checkpoint, tmp_path / "out")
    bundle = tmp_path / "out" / "phone"
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["dynamic_model"]["input_shape"] == ["batch", 3, 32, 32] and m["dynamic_model"]["parity"]["passed"]
    x = np.load(bundle / "reference.npz")["pixels"][:3]
    fixed = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    dynamic = ort.InferenceSession(str(bundle / "model.dynamic.onnx"), providers=["CPUExecutionProvider"])
    one_by_one = np.concatenate([fixed.run(["embedding"], {"pixels": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(dynamic.run(["embedding"], {"pixels": x})[0], one_by_one, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_default_mobile_export_of_the_shipped_checkpoint(tmp_path):
    from bim_export import cli

    assert cli.main(["--target", "mobile", "--out", str(tmp_path)]) == 0
    bundle = tmp_path / "android-snapdragon-8-gen-2"
    nnapi = ort_checker(bundle / "model.onnx")["NNAPI"]
    assert nnapi["taken"] >= 0.99 * nnapi["nodes"] and nnapi["partitions"] <= 2
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["parity"]["passed"] and m["mobile"]["ort"]["parity"]["passed"]


@pytest.mark.slow
def test_target_all_writes_every_shipped_profile(tiny_checkpoint, tmp_path):
    from bim_export.deploy.profiles import list_profiles

    summary = run_export("all", tiny_checkpoint, tmp_path)
    for name in list_profiles():
        assert (tmp_path / name / "manifest.json").is_file() and name in summary
    assert (tmp_path / "iphone-15-pro" / "model.ort").is_file() and not (tmp_path / "host" / "model.ort").exists()
