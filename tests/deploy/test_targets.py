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

from bim_export.core.resources import resource_dir, sample_images_dir
from bim_export.deploy.bundle import validator_files
from bim_export.model import images as package_images
from bim_export.runtime.preprocess import preprocess as package_preprocess

TARGETS = resource_dir("targets")


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A minimal bundle: model.onnx, manifest.json, reference.npz, common.py and the runtime/ package."""
    b = tmp_path / "bundle"
    b.mkdir()
    write_tiny_onnx(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps({
        "precision": "fp32", "depth": 4, "batch": 2,
        "preprocessing": {"img_size": SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }))
    np.savez(b / "reference.npz", pixels=np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
    shutil.copy(TARGETS / "common.py", b / "common.py")
    for name, src in validator_files().items():
        if name.startswith("runtime/"):
            (b / name).parent.mkdir(exist_ok=True)
            shutil.copy(src, b / name)
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


def test_preprocess_is_one_implementation(common):
    """The scripts preprocess with the runtime's function, the one the package's parity and
    calibration images go through, and count the same files as images."""
    import inspect

    from bim_export.model.images import image_extensions

    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    np.testing.assert_array_equal(common.preprocess(img, 24, mean, std), package_preprocess(img, 24, mean, std))
    assert inspect.getsourcefile(common.preprocess) == inspect.getsourcefile(package_preprocess)
    assert package_images.preprocess is package_preprocess
    assert common.image_extensions() == image_extensions()  # the same files are images on both sides
    assert ".tiff" in common.image_extensions()


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


def test_fallback_warning_names_what_the_session_runs_without(common):
    trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": True})
    requested = [trt, "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert common.fallback_warning(requested, ["CPUExecutionProvider"]) == (
        "warning: TensorrtExecutionProvider, CUDAExecutionProvider not available here (onnxruntime offers only "
        "CPUExecutionProvider); running on CPUExecutionProvider")
    # offered by the build but dropped when the session started (no CUDA libraries): named too
    assert common.fallback_warning(requested, ["CUDAExecutionProvider", "CPUExecutionProvider"]).startswith(
        "warning: TensorrtExecutionProvider not available here")
    assert common.fallback_warning(requested, ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"]) is None
    assert common.fallback_warning(["CPUExecutionProvider"], ["CPUExecutionProvider"]) is None


@pytest.mark.parametrize("script", ["jetson.py", "server_gpu.py"])
def test_gpu_script_says_on_stderr_what_it_fell_back_from(bundle, images, script):
    done = _run_script(bundle, script, images)
    assert done.returncode == 0, done.stderr
    used = done.stdout.split("timing: ", 1)[1].split(" on ", 1)[1].split(":", 1)[0].split(", ")
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if script == "jetson.py" else ["CUDAExecutionProvider"]
    missing = [p for p in wanted if p not in used]
    warnings = [ln for ln in done.stderr.splitlines() if ln.startswith("warning:")]
    if missing:  # a CPU-only onnxruntime, or a GPU one whose providers could not start here
        assert warnings == [f"warning: {', '.join(missing)} not available here (onnxruntime offers"
                            f"{' only' if len(used) == 1 else ''} {', '.join(used)}); running on {used[0]}"]
    else:
        assert warnings == []


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
    # NNAPI before XNNPACK: the first provider picks its nodes first
    assert names(mobile.PREFERRED, ["XnnpackExecutionProvider", "NnapiExecutionProvider", "CPUExecutionProvider"]) \
        == ["NnapiExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"]


def test_ios_takes_coreml_with_the_profiles_options(common):
    import ios

    manifest = {"provider_options": {"CoreMLExecutionProvider": {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}}}
    chosen = common.choose_providers(ios.preferred_providers(manifest), ["CoreMLExecutionProvider", "CPUExecutionProvider"])
    assert chosen == [("CoreMLExecutionProvider", {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}),
                      "CPUExecutionProvider"]
    assert common.choose_providers(ios.preferred_providers({}), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_runner_fills_up_the_batch_of_a_fixed_batch_model(common, tmp_path):
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(write_tiny_onnx(tmp_path / "dynamic.onnx")))
    make_dim_param_fixed(model.graph, "batch", 2)
    onnx.save(model, tmp_path / "fixed.onnx")
    x = np.random.default_rng(4).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    fixed = common.make_session(tmp_path / "fixed.onnx", ["CPUExecutionProvider"])
    assert common.fixed_batch(fixed) == 2
    runner = common.Runner(fixed, "embedding")
    got = runner(x, 4)  # the model's batch wins; the fifth image rides with a copy of itself
    want = common.make_session(tmp_path / "dynamic.onnx", ["CPUExecutionProvider"]).run(["embedding"], {"pixels": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(runner.times_ms) == 3


def test_cosine_topk(common):
    g = np.eye(4, dtype=np.float32)
    idx, sim = common.cosine_topk(np.array([[0.1, 0.0, 1.0, 0.0]], np.float32), g, 2)
    assert idx[0, 0] == 2 and sim[0, 0] == pytest.approx(1 / np.sqrt(1.01), rel=1e-5)


def test_label_report_is_softmax_top_k_capped_at_the_classes(common):
    logits = np.array([[2.0, 0.0, 1.0], [1000.0, 1001.0, -1000.0]], np.float32)  # no overflow at any scale
    probs = common.softmax(logits)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    np.testing.assert_allclose(probs[0], np.exp([2, 0, 1]) / np.exp([2, 0, 1]).sum(), rtol=1e-6)
    text = common.label_report([Path("a.jpg"), Path("b.jpg")], logits, ["cat", "dog", "fish"], k=5)
    assert text.splitlines() == ["a.jpg: cat 0.665, fish 0.245, dog 0.090", "b.jpg: dog 0.731, cat 0.269, fish 0.000"]
    assert common.label_report([Path("a.jpg")], logits[:1], ["cat", "dog", "fish"], k=1) == "a.jpg: cat 0.665"


@pytest.mark.parametrize("script", ["cpu.py", "jetson.py", "server_gpu.py"])
def test_script_prints_embeddings_matching_onnxruntime(bundle, images, script, common):
    out = bundle / "emb.npy"
    done = _run_script(bundle, script, images, "--save", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(dim 16,") == 3 and "timing:" in done.stdout
    assert "CPUExecutionProvider" in done.stdout
    # same numbers as preprocessing + a plain session here
    _, x = common.load_images(common.collect_images([images]), json.loads((bundle / "manifest.json").read_text()))
    import onnxruntime as ort

    ref = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(["embedding"], {"pixels": x})[0]
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-5, atol=1e-5)


def test_script_reads_tiff_images(bundle, images):
    Image.open(images / "sub" / "im0.png").save(images / "sub" / "im3.tiff")
    done = _run_script(bundle, "cpu.py", images)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(dim 16,") == 4 and f"{images / 'sub' / 'im3.tiff'}: [" in done.stdout


def test_script_gallery_top_k(bundle, images):
    done = _run_script(bundle, "cpu.py", images / "sub" / "im1.png", "--gallery", images, "--top-k", "2")
    assert done.returncode == 0, done.stderr
    line = [ln for ln in done.stdout.splitlines() if ln.startswith(str(images / "sub" / "im1.png"))][0]
    assert line.split(": ", 1)[1].startswith("im1.png (1.000)")  # an image is its own nearest neighbour


def test_mobile_uses_the_shipped_ort_model(bundle, images):
    shutil.copy(TARGETS / "common.py", bundle / "common.py")
    sys.path.insert(0, str(TARGETS))
    try:
        from common import convert_to_ort
    finally:
        sys.path.remove(str(TARGETS))
    shipped = convert_to_ort(bundle / "model.onnx")  # as the export ships it
    before = shipped.stat().st_mtime_ns
    (bundle / "model.onnx").touch()  # newer than the .ort: a converting script would redo it
    done = _run_script(bundle, "mobile.py", images)
    assert done.returncode == 0, done.stderr
    assert "check: model.ort matches model.onnx" in done.stdout and "model: " in done.stdout
    assert shipped.stat().st_mtime_ns == before and "model.ort (" in done.stdout


def test_mobile_converts_to_ort_and_checks(bundle, images):
    done = _run_script(bundle, "mobile.py", images)
    assert done.returncode == 0, done.stderr
    assert (bundle / "model.ort").is_file()
    assert "check: model.ort matches model.onnx" in done.stdout
    assert done.stdout.count("(dim 16,") == 3


def test_script_errors_are_one_line(bundle, tmp_path):
    done = _run_script(bundle, "cpu.py", tmp_path / "missing.jpg")
    assert done.returncode != 0 and done.stderr.strip().startswith("error:")


# ------------------------------------------------------------------ a real bundle, bad images in


@pytest.fixture(scope="module")
def exported_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """A bundle written by the export pipeline (cpu target) for the tiny checkpoint."""
    import yaml
    from export_cache import memoize_exports

    from bim_export.deploy.pipeline import run_export

    tmp = tmp_path_factory.mktemp("real-bundle")
    prof = yaml.safe_load((resource_dir("profiles") / "raspberry-pi-5.yaml").read_text())
    prof["budgets"].update(latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    (tmp / "pi.yaml").write_text(yaml.safe_dump(prof))
    with pytest.MonkeyPatch.context() as mp:
        memoize_exports(mp, tmp)
        run_export(str(tmp / "pi.yaml"), tiny_checkpoint, tmp / "exports")
    return tmp / "exports" / "pi"


def _infer(bundle: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "infer.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=bundle.parent, timeout=120)


@pytest.mark.slow
def test_bundle_infer_skips_truncated_and_bomb_images(exported_bundle, tmp_path):
    from conftest import write_png_bomb, write_truncated_jpeg

    photos = tmp_path / "photos"
    photos.mkdir()
    good = sorted(sample_images_dir().rglob("*.jpg"))[:2]
    for p in good:
        shutil.copy(p, photos / p.name)
    write_truncated_jpeg(photos / "cut.jpg")
    write_png_bomb(photos / "bomb.png")
    done = _infer(exported_bundle, photos)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(str(photos))]
    assert sorted(Path(ln.split(": ")[0]).name for ln in lines) == sorted(p.name for p in good)
    warning = [ln for ln in done.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "2 of 4 images" in warning[0]
    assert "cut.jpg (image file is truncated" in warning[0] and "bomb.png (decompression bomb" in warning[0]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_bundle_infer_with_no_readable_image_is_one_error_line(exported_bundle, tmp_path):
    from conftest import write_png_bomb

    photos = tmp_path / "photos"
    photos.mkdir()
    write_png_bomb(photos / "bomb.png")
    done = _infer(exported_bundle, photos, "--save", tmp_path / "emb.npy")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: none of the 1 images is readable (first: {photos / 'bomb.png'} "
                                                "(decompression bomb: over Pillow's pixel limit))"]
    assert done.stdout == "" and not (tmp_path / "emb.npy").exists()
