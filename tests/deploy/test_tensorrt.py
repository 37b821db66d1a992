"""Jetson bundles' TensorRT files: build_engine.sh (a trtexec line that bash accepts, at the
profile's batch, precision and memory), trt_engine.md, LayerNormalization as one op or decomposed as
the profile's TensorRT needs (checked with polygraphy, NVIDIA's graph tool, without a GPU), and
infer.py --engine without TensorRT."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from profile_copy import profile_copy
from bundle_spec import bundle_spec

from bim_export.deploy import tensorrt
from bim_export.deploy.bundle import write_bundle
from bim_export.deploy.pipeline import run_export
from bim_export.deploy.profiles import load_profile
from bim_export.runtime.machine import sha256_file


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


@pytest.fixture(scope="module")
def jetsons(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Real bundles of the tiny checkpoint: the Orin Nano (TensorRT 8.6+), and a copy naming TensorRT 8.5."""
    out = tmp_path_factory.mktemp("jetson")
    # fp32 only: fewer graphs to make
    old = profile_copy(out, "jetson-orin-nano", "jetson-orin-nano-trt", tensorrt="8.5", precisions=["fp32"])
    run_export("jetson-orin-nano", tiny_checkpoint, out / "new")
    run_export(str(old), tiny_checkpoint, out / "old")
    return {"8.6": out / "new" / "jetson-orin-nano", "8.5": out / "old" / "jetson-orin-nano-trt"}


def polygraphy_ops(model: Path) -> list[str]:
    """The op of every node, as `polygraphy inspect model` (its ONNX loader, no TensorRT) lists them."""
    exe = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    done = subprocess.run([exe, "inspect", "model", str(model), "--show", "layers"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ops = re.findall(r"\[Op: (\w+)\]", done.stdout)
    assert ops, done.stdout[-2000:]
    return ops


@pytest.mark.parametrize("version", ["8.6", "8.5"])
def test_graph_has_layernorm_as_the_profiles_tensorrt_needs(jetsons, version):
    bundle = jetsons[version]
    ops = polygraphy_ops(bundle / "model.onnx")
    # every op TensorRT will see is standard ONNX (no com.microsoft NHWC or fused kernels)
    assert all(onnx.defs.has(op) for op in ops), sorted(set(ops))
    manifest = json.loads((bundle / "manifest.json").read_text())
    notes = (bundle / "trt_engine.md").read_text()
    if version == "8.6":
        assert ops.count("LayerNormalization") >= 3  # the blocks' two and the exit norm
        assert manifest["tensorrt"]["needs"]["tensorrt"] == "8.6" and "LayerNormalization ships as one op" in notes
    else:
        assert "LayerNormalization" not in ops and {"ReduceMean", "Sqrt", "Div"} <= set(ops)
        assert manifest["tensorrt"]["needs"]["layernorm"] == "decomposed" and "ships decomposed" in notes
        assert "The profile names TensorRT 8.5." in notes
    assert manifest["tensorrt"]["needs"]["opset"] == 17 and "**TensorRT >= 8.6**: opset 17" in notes


def test_build_engine_script_is_valid_bash_with_the_profiles_settings(jetsons):
    bundle = jetsons["8.6"]
    script = bundle / "build_engine.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"]["build_engine.sh"] == sha256_file(script)
    text = script.read_text()
    flag = {"fp32": "", "fp16": "--fp16", "int8": "--int8"}[manifest["precision"]]
    assert flag in text and ("--int8" in text) == (manifest["precision"] == "int8")
    assert "--onnx=model.onnx" in text and "--saveEngine=model.engine" in text
    assert "--shapes=pixels:1x3x32x32" in text  # the profile's batch 1, the model's resolution
    assert "--timingCacheFile=timing.cache" in text
    mib = int(re.search(r"--memPoolSize=workspace:(\d+)", text).group(1))
    assert 0 < mib * 2**20 <= 1024e6  # within the profile's peak-memory budget
    command = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert manifest["tensorrt"]["trtexec"] == re.findall(r"--\S+", command)
    report = (bundle / "report.md").read_text()  # the report says how to build and run the engine
    assert "bash build_engine.sh" in report and "--engine model.engine" in report
    assert f"TensorRT >= {manifest['tensorrt']['needs']['tensorrt']}" in report


def test_precision_flags_and_fixed_shapes():
    nano = load_profile("jetson-orin-nano")
    assert "--int8" in tensorrt.engine_command(nano, "int8", "pixels", ["batch", 3, 224, 224])
    assert "--fp16" not in tensorrt.engine_command(nano, "fp32", "pixels", ["batch", 3, 224, 224])
    fixed = tensorrt.engine_command(nano, "fp16", "pixels", [4, 3, 224, 224])
    assert "--fp16" in fixed and not any(a.startswith("--shapes") for a in fixed)  # a fixed graph takes no shapes


def test_only_jetson_bundles_get_engine_files(tmp_path):
    h100 = write_bundle(tmp_path / "a", bundle_spec(tmp_path, profile="h100-sxm"))
    assert not (h100 / "build_engine.sh").exists() and not (h100 / "trt_engine.md").exists()


def test_infer_engine_without_tensorrt_is_one_error_line(jetsons, tmp_path):
    from PIL import Image

    bundle = jetsons["8.6"]
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (120, 60, 30)).save(img)
    (tmp_path / "model.engine").write_bytes(b"not an engine")
    # tensorrt made unimportable, as on a machine without JetPack's python3-libnvinfer
    code = ("import sys, runpy; sys.path.insert(0, '.'); sys.modules['tensorrt'] = None; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, "infer.py", str(img), "--engine", str(tmp_path / "model.engine")],
                          capture_output=True, text=True, cwd=bundle, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --engine needs TensorRT's Python module"), done.stderr
