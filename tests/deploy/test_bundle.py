"""The bundle writer: every file present, hashes right, atomic, a readable report and plot."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx
import pytest
from bundle_spec import bundle_spec

from bim_export.deploy import bundle as bundle_mod
from bim_export.deploy.bundle import file_hashes, write_bundle
from bim_export.runtime.machine import sha256_file

EXPECTED = {"model.onnx", "manifest.json", "reference.npz", "report.md", "pareto.png", "infer.py", "common.py", "validate.py",
            "runtime", "triton", "build_engine.sh", "trt_engine.md"}  # a Jetson's: Triton repository, trtexec script
TRITON = {"triton/jetson-orin-nano/config.pbtxt", "triton/jetson-orin-nano/1/model.onnx"}
RUNTIME = {f"runtime/{name}.py" for name in ("__init__", "errors", "knn", "machine", "parity", "preprocess", "session",
                                             "labels", "early_exit", "validate", "batcher", "serve")}


@pytest.fixture
def spec(tmp_path):
    return bundle_spec(tmp_path)


def test_bundle_has_every_file_and_hashes(tmp_path, spec):
    dest = write_bundle(tmp_path / "exports", spec)
    assert dest == tmp_path / "exports" / "jetson-orin-nano"
    assert {p.name for p in dest.iterdir()} == EXPECTED
    manifest = json.loads((dest / "manifest.json").read_text())
    assert set(manifest["files"]) == EXPECTED - {"manifest.json", "runtime", "triton"} | RUNTIME | TRITON
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
    # the expected error says what it rests on: the device class's measured uncalibrated error
    lat = json.loads((tmp_path / "jetson-orin-nano" / "manifest.json").read_text())["latency"]
    assert f"expected error ±{lat['expected_error'] * 100:.0f} % ({lat['error_basis']})" in report
    assert lat["error_basis"].startswith("uncalibrated gpu defaults")
    assert spec.selection.table() in report and "chosen" in spec.selection.table()
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
    spec.choice.depth = 2
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


# torch, timm and bim_export made unimportable, as on a device that has only the bundle
_NO_TORCH = ("import sys, runpy; sys.path.insert(0, '.'); "
             "sys.modules.update(torch=None, timm=None, bim_export=None, torchvision=None); "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_bundle_runs_standalone(tmp_path):
    """The bundle's infer.py and validate.py work from the bundle folder with only onnxruntime, numpy,
    Pillow: no torch, no bim_export."""
    import subprocess
    import sys

    import onnxruntime as ort
    from PIL import Image

    spec = bundle_spec(tmp_path, profile="raspberry-pi-5")
    sess = ort.InferenceSession(str(spec.model), providers=["CPUExecutionProvider"])
    spec.reference["embedding"] = sess.run(["embedding"], {"pixels": spec.reference["pixels"]})[0]  # what it computes
    dest = write_bundle(tmp_path / "exports", spec)
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(img)
    done = subprocess.run([sys.executable, "-s", "-E", str(dest / "infer.py"), str(img)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(dim 16," in done.stdout
    for script, said in ((["infer.py", str(img)], "(dim 16,"), (["validate.py"], "PASS")):
        done = subprocess.run([sys.executable, "-s", "-E", "-c", _NO_TORCH, *script], capture_output=True, text=True,
                              cwd=dest, timeout=300)
        assert done.returncode == 0, done.stderr
        assert said in done.stdout
    assert json.loads((dest / "manifest.json").read_text())["device_validations"][-1]["passed"] is True


def test_info_prints_files_choice_and_validations(tmp_path, spec, capsys):
    from bim_export.cli import main
    from bim_export.runtime.validate import validate_bundle

    dest = write_bundle(tmp_path, spec)
    assert main(["info", str(dest)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((dest / "manifest.json").read_text())
    assert out.startswith(f"{dest}: bundle for jetson-orin-nano (bim-export ")
    size = (dest / "model.onnx").stat().st_size
    assert re.search(rf"\n  model\.onnx +{size / 1e3:.1f} kB\n", out) and re.search(r"\n  reference\.npz +", out)
    assert re.search(r"\n  triton/ +[0-9.]+ kB in 2 files\n", out)
    lat = manifest["latency"]
    assert "  model        depth 4 of exits 2, 4, int8, opset 17" in out
    assert "  quality      kNN top-1 60.0%" in out
    assert f"  latency      {lat['ms']:.3g} ms p90 ±{lat['expected_error']:.0%} (predicted) at batch 1" in out
    assert f"error: {lat['error_basis']}" in out
    assert "  budgets      latency p90 <= 8 ms, peak memory <= 1024 MB, model size <= 64 MB" in out
    assert "  candidates   1 (1 chosen, 0 within budget, 0 rejected" in out
    assert "  parity       passed, worst cosine 0.99700, agreement 100%, max abs 0.02, 8 images" in out
    assert "  on devices   none recorded" in out
    from bim_export.core.errors import ValidationError

    with pytest.raises(ValidationError):  # the spec's reference outputs are not the graph's: recorded as failed
        validate_bundle(dest)
    assert main(["info", str(dest)]) == 0
    out = capsys.readouterr().out
    record = json.loads((dest / "manifest.json").read_text())["device_validations"][0]
    assert f"  device [0]   {record['time']} on {record['machine']['cpu']}" in out and "none recorded" not in out
    assert f": FAILED ({record['failures'][0]};" in out and "; parity FAILED, worst cosine" in out
    assert "(not checked there)" in out


def test_a_registered_writer_is_one_more_output_kind(tmp_path, spec):
    """A new output kind (here a model card folder) is one registered writer: written after the
    others, hashed in the manifest, and replaceable by the next export."""

    @bundle_mod.register_writer("card", ("card",))
    def write_card(draft):
        folder = draft.dir / "card" / "bim" / "1"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes((draft.dir / "model.onnx").read_bytes())
        (draft.dir / "card" / "bim" / "card.md").write_text("# bim\n")
        draft.manifest["card"] = {"model": "bim"}

    try:
        assert bundle_mod.WRITERS.names()[-1] == "card" and "card" in bundle_mod.bundle_kind().names
        dest = write_bundle(tmp_path / "exports", spec)
        manifest = json.loads((dest / "manifest.json").read_text())
        assert manifest["card"] == {"model": "bim"}
        assert {"card/bim/card.md", "card/bim/1/model.onnx"} <= set(manifest["files"])
        assert manifest["files"]["card/bim/1/model.onnx"] == manifest["files"]["model.onnx"]
        assert write_bundle(tmp_path / "exports", spec) == dest  # the next export replaces it
    finally:
        bundle_mod.WRITERS.unregister("card")
    assert "card" not in bundle_mod.bundle_kind().names
