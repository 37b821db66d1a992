"""Early exit: segment graphs that chain to the full classifier, the cascade's exits, held-out images,
and a bundle exported with --early-exit (segments, thresholds, report, validator, infer.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bim_export.core.errors import InputError
from bim_export.core.resources import resource_dir, sample_images_dir
from bim_export.deploy import pipeline
from bim_export.deploy.early_exit import check_joint, classifier_reference, export_segments, heldout_images
from bim_export.model.backbone import build_backbone
from bim_export.model.checkpoint import load_checkpoint
from bim_export.model.images import load_image_array
from bim_export.runtime.early_exit import Cascade, confidence
from finetuned import make_finetuned

LABELS = ("cat", "dog", "fish")


@pytest.fixture(scope="module")
def joint(tiny_checkpoint, tmp_path_factory):
    return make_finetuned(tmp_path_factory.mktemp("joint") / "ckpt", "joint", LABELS, source=tiny_checkpoint)


@pytest.fixture(scope="module")
def segments(joint, tmp_path_factory):
    ckpt = load_checkpoint(joint)
    backbones = {d: build_backbone(ckpt, d) for d in ckpt.exits}
    graphs = export_segments(backbones.get, ckpt.exits, tmp_path_factory.mktemp("segments"), opset=17,
                             img_size=ckpt.config["img_size"])
    return ckpt, backbones, graphs


@pytest.fixture(scope="module")
def pixels(joint):
    cfg = load_checkpoint(joint, weights=False).config
    return load_image_array(sample_images_dir(), cfg["img_size"], cfg["mean"], cfg["std"], limit=12)[0]


def _labelled_folder(root: Path, per_class: int = 6) -> Path:
    """cat / dog / fish: three of the sample image classes under the checkpoint's label names."""
    for name, src in zip(LABELS, sorted(p for p in sample_images_dir().iterdir() if p.is_dir())):
        (root / name).mkdir(parents=True)
        for f in sorted(src.iterdir())[:per_class]:
            shutil.copy(f, root / name / f.name)
    return root


def test_segments_chained_are_the_classifier_at_every_exit(segments, pixels):
    ckpt, backbones, graphs = segments
    assert [(g.input, g.start, g.end) for g in graphs] == [("pixels", 0, 2), ("hidden", 2, 4)]
    ref = classifier_reference(backbones.get, ckpt.exits, pixels)
    with torch.inference_mode():
        logits = {d: backbones[d](torch.from_numpy(pixels)).numpy() for d in ckpt.exits}
    cascade = Cascade([g.path for g in graphs], ckpt.exits, [None, 0.0])
    for batch in (1, len(pixels)):
        for d, got in zip(ckpt.exits, cascade.run_all(pixels, batch)):
            assert np.abs(got["logits"] - logits[d]).max() <= 1e-5
            assert np.abs(got["logits"] - ref[f"logits_{d}"]).max() <= 1e-5
            for name in ("tokens", "embedding"):
                assert np.abs(got[name] - ref[f"{name}_{d}"]).max() <= 1e-5


def test_cascade_stops_each_image_at_its_first_confident_exit(segments, pixels):
    ckpt, _, graphs = segments
    every = Cascade([g.path for g in graphs], ckpt.exits, [None, 0.0]).run_all(pixels, len(pixels))
    conf = confidence(every[0]["logits"])
    t = float(np.median(conf))
    early = conf >= t
    assert 0 < early.sum() < len(pixels)
    cascade = Cascade([g.path for g in graphs], ckpt.exits, [t, 0.0])
    for batch in (1, 5):
        r = cascade(pixels, batch)
        assert r.exit_depth.tolist() == [2 if e else 4 for e in early]
        assert r.segment_images == [len(pixels), int((~early).sum())]
        assert np.allclose(r.logits[early], every[0]["logits"][early], atol=1e-5)
        assert np.allclose(r.logits[~early], every[1]["logits"][~early], atol=1e-5)
    assert Cascade([g.path for g in graphs], ckpt.exits, [0.0, 0.0])(pixels, 4).exit_depth.tolist() == [2] * len(pixels)


def test_heldout_images_from_the_split_or_a_labelled_folder(joint, tmp_path):
    ckpt = load_checkpoint(joint, weights=False)
    with pytest.raises(InputError, match="finetune.split names no held-out images.*--eval-data"):
        heldout_images(ckpt)
    data = _labelled_folder(tmp_path / "data")
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))[::2]
    cfg = json.loads((joint / "config.json").read_text())
    cfg["finetune"]["split"].update(data=str(data), heldout_files=files)
    moved = shutil.copytree(joint, tmp_path / "ckpt")
    (moved / "config.json").write_text(json.dumps(cfg))
    held = heldout_images(load_checkpoint(moved, weights=False))
    assert held.x.shape == (len(files), 3, 32, 32)
    assert held.y.tolist() == [LABELS.index(f.split("/")[0]) for f in files]
    assert held.source["size"] == len(files)
    mine = heldout_images(ckpt, data)
    assert len(mine.y) == 18 and sorted(set(mine.y.tolist())) == [0, 1, 2]
    (data / "horse").mkdir()
    shutil.copy(data / files[0], data / "horse" / "h.jpg")
    with pytest.raises(InputError, match="classes the checkpoint was not fine-tuned on: horse"):
        heldout_images(ckpt, data)
    shutil.rmtree(data / "cat")
    with pytest.raises(InputError, match="held-out images are not here"):
        heldout_images(load_checkpoint(moved, weights=False))


def test_only_a_joint_checkpoint_serves_early_exit(tiny_checkpoint, tmp_path):
    per_exit = make_finetuned(tmp_path / "per-exit", "per_exit", LABELS, source=tiny_checkpoint)
    with pytest.raises(InputError, match="fine-tuned per exit"):
        check_joint(load_checkpoint(per_exit, weights=False))
    with pytest.raises(InputError, match="not fine-tuned"):
        check_joint(load_checkpoint(tiny_checkpoint, weights=False))


# ------------------------------------------------------------------------------ the bundle


@pytest.fixture(scope="module")
def bundle(joint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ee-bundle")
    prof = yaml.safe_load((resource_dir("profiles") / "raspberry-pi-5.yaml").read_text())
    prof["budgets"].update(latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    prof["precisions"] = ["fp32"]
    (tmp / "tiny-edge.yaml").write_text(yaml.safe_dump(prof))
    data = _labelled_folder(tmp / "labelled")
    pipeline.run_export(str(tmp / "tiny-edge.yaml"), joint, tmp / "out", None, early_exit=0.5, eval_data=data)
    return tmp / "out" / "tiny-edge", data


def test_early_exit_bundle(bundle):
    b, data = bundle
    m = json.loads((b / "manifest.json").read_text())
    ee = m["early_exit"]
    assert [s["file"] for s in ee["segments"]] == ["early_exit/segment_0.onnx", "early_exit/segment_1.onnx"]
    assert {"early_exit/segment_0.onnx", "early_exit/segment_1.onnx", "early_exit/reference.npz"} <= set(m["files"])
    assert ee["exits"] == [2, 4] and len(ee["thresholds"]) == 2 and ee["thresholds"][-1] == 0.0
    assert ee["labels"] == list(LABELS) and ee["parity"]["passed"]
    assert ee["fit"]["held_out"]["size"] == 18 and ee["fit"]["accuracy_loss_points"] == 0.5
    acc = ee["accuracy"]
    assert acc["cascade"] >= acc["fixed"]["4"] - 1 / 18 * np.floor(0.005 * 18 + 1e-9) - 1e-9
    assert sum(ee["exit_distribution"].values()) == pytest.approx(1.0)
    lat = ee["latency"]
    assert lat["source"] == "measured" and len(lat["segments_ms"]) == 2 and len(lat["fixed"]) == 2
    assert lat["cascade"]["mean_ms"] == pytest.approx(
        ee["exit_distribution"]["2"] * lat["segments_ms"][0] + ee["exit_distribution"]["4"] * sum(lat["segments_ms"]))
    report = (b / "report.md").read_text()
    assert "## Early exit" in report and "| early exit |" in report and "| depth 4 |" in report


def test_validator_checks_every_segment(bundle):
    b, _ = bundle
    done = subprocess.run([sys.executable, str(b / "validate.py"), str(b)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "early exit 2 segments: " in done.stdout
    m = json.loads((b / "manifest.json").read_text())
    assert m["device_validations"][-1]["early_exit_parity"]["passed"]


def test_validator_fails_a_segment_that_differs(bundle, tmp_path):
    import onnx
    from onnx import numpy_helper

    b = shutil.copytree(bundle[0], tmp_path / "copy")
    path = b / "early_exit" / "segment_1.onnx"
    model = onnx.load(str(path))
    w = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 3, w.name))
    onnx.save(model, str(path))
    done = subprocess.run([sys.executable, str(b / "validate.py"), str(b)], capture_output=True, text=True)
    assert done.returncode == 4
    assert "early_exit/segment_1.onnx: sha256 differs" in done.stderr and "early-exit segments: exit 4" in done.stderr


def test_infer_early_exit_reports_the_exit_and_label_per_image(bundle):
    b, data = bundle
    images = sorted(data.rglob("*.jpg"))
    done = subprocess.run([sys.executable, str(b / "infer.py"), str(data), "--early-exit"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if ": exit " in line]
    assert len(lines) == len(images)
    m = json.loads((b / "manifest.json").read_text())
    cascade = Cascade.from_manifest(b, m)
    from bim_export.runtime.preprocess import preprocess
    from PIL import Image

    pre = m["preprocessing"]
    x = np.stack([preprocess(Image.open(p).convert("RGB"), pre["img_size"], pre["mean"], pre["std"]) for p in images])
    r = cascade(x, 1)
    for line, d, c in zip(lines, r.exit_depth, r.logits.argmax(1)):
        assert f": exit {d}, {LABELS[c]} (" in line
    assert "exits taken (depth: images): 2: " in done.stdout


def test_segments_in_a_phone_profiles_form(segments, pixels, tmp_path):
    """Fixed batch and the ops NNAPI lacks rewritten, as the phone profile's bundle gets them."""
    from bim_export.deploy.profiles import load_profile
    from bim_export.deploy.rewrite import form_for

    ckpt, backbones, _ = segments
    form = form_for(load_profile("android-snapdragon-8-gen-2"))
    assert form.batch and form.passes
    graphs = export_segments(backbones.get, ckpt.exits, tmp_path, opset=17, img_size=ckpt.config["img_size"], form=form)
    cascade = Cascade([g.path for g in graphs], ckpt.exits, [None, 0.0])
    assert [s.get_inputs()[0].shape[0] for s in cascade.sessions] == [form.batch] * 2
    ref = classifier_reference(backbones.get, ckpt.exits, pixels)
    for d, got in zip(ckpt.exits, cascade.run_all(pixels[:5], form.batch)):
        assert np.abs(got["logits"] - ref[f"logits_{d}"][:5]).max() <= 1e-3  # erf in tanh form: |error| < 5e-4
        assert (got["logits"].argmax(1) == ref[f"logits_{d}"][:5].argmax(1)).all()
