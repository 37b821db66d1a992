"""The device-side inference scripts in targets/, run on the CPU execution provider.

The EP fallback (TensorRT -> CUDA -> CPU) is tested by injecting the available-providers list, so
no GPU is needed. The scripts are run as a device owner runs them: from a bundle folder, as files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_onnx import SIZE, write_tiny_onnx

from bim_export.data import preprocess as package_preprocess
from bim_export.resources import resource_dir

TARGETS = resource_dir("targets")


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A minimal bundle: model.onnx, manifest.json, reference.npz, common.py."""
    b = tmp_path / "bundle"
    b.mkdir()
    write_tiny_onnx(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps({
        "precision": "fp32", "depth": 4, "batch": 2,
        "preprocessing": {"img_size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    np.savez(b / "reference.npz", pixels=np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
    shutil.copy(TARGETS / "common.py", b / "common.py")
    return b


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "imgs" / "sub"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d.parent


@pytest.fixture
def common(monkeypatch):
    """targets/common.py imported as the scripts import it (targets/ on sys.path)."""
    monkeypatch.syspath_prepend(str(TARGETS))
    import common as mod

    return mod


def _run_script(bundle: Path, script: str, *args) -> subprocess.CompletedProcess:
    shutil.copy(TARGETS / script, bundle / "infer.py")
    return subprocess.run([sys.executable, str(bundle / "infer.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=bundle.parent, timeout=120)


def test_preprocess_matches_package(common):
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(common.preprocess(img, 24, mean, std), package_preprocess(img, 24, mean, std))


@pytest.mark.parametrize("available,expected", [
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ([], ["CPUExecutionProvider"]),
])
def test_jetson_fallback_order(common, tmp_path, available, expected):
    import jetson

    prefs = jetson.preferred_providers(tmp_path, "fp32")
    chosen = common.choose_providers(prefs, available)
    assert [common.provider_name(p) for p in chosen] == expected
    if expected[0] == "TensorrtExecutionProvider":
        opts = chosen[0][1]
        assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
        assert opts["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
        assert not opts["trt_int8_enable"]
    assert jetson.preferred_providers(tmp_path, "int8")[0][1]["trt_int8_enable"]


def test_server_gpu_and_mobile_fallback(common):
    import mobile
    import server_gpu

    def names(preferred, available):
        return [common.provider_name(p) for p in common.choose_providers(preferred, available)]

    assert names(server_gpu.preferred_providers(), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert names(server_gpu.preferred_providers(), ["CUDAExecutionProvider"]) == ["CUDAExecutionProvider",
                                                                                   "CPUExecutionProvider"]
    assert names(mobile.PREFERRED, ["NnapiExecutionProvider", "CPUExecutionProvider"]) == ["NnapiExecutionProvider",
                                                                                           "CPUExecutionProvider"]


def test_cosine_topk(common):
    g = np.eye(4, dtype=np.float32)
    idx, sim = common.cosine_topk(np.array([[0.1, 0.0, 1.0, 0.0]], np.float32), g, 2)
    assert idx[0, 0] == 2 and sim[0, 0] == pytest.approx(1 / np.sqrt(1.01), rel=1e-5)


@pytest.mark.parametrize("script", ["cpu.py", "jetson.py", "server_gpu.py"])
def test_script_prints_embeddings_matching_onnxruntime(bundle, images, script, common):
    out = bundle / "emb.npy"
    done = _run_script(bundle, script, images, "--save", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(dim 16,") == 3 and "timing:" in done.stdout
    assert "CPUExecutionProvider" in done.stdout
    # same numbers as preprocessing + a plain session here
    paths = common.collect_images([images])
    x = common.load_images(paths, json.loads((bundle / "manifest.json").read_text()))
    import onnxruntime as ort

    ref = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(["embedding"], {"pixels": x})[0]
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-5, atol=1e-5)


def test_script_gallery_top_k(bundle, images):
    done = _run_script(bundle, "cpu.py", images / "sub" / "im1.png", "--gallery", images, "--top-k", "2")
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith(str(images / "sub" / "im1.png"))][0]
    assert line.split(": ", 1)[1].startswith("im1.png (1.000)")  # an image is its own nearest neighbour


def test_mobile_converts_to_ort_and_checks(bundle, images):
    done = _run_script(bundle, "mobile.py", images)
    assert done.returncode == 0, done.stderr
    assert (bundle / "model.ort").is_file()
    assert "check: model.ort matches model.onnx" in done.stdout
    assert done.stdout.count("(dim 16,") == 3


def test_script_errors_are_one_line(bundle, tmp_path):
    done = _run_script(bundle, "cpu.py", tmp_path / "missing.jpg")
    assert done.returncode != 0 and done.stderr.strip().startswith("error:")
