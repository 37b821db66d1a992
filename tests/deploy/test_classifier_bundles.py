"""Classifier bundles: a fine-tuned checkpoint (seeded heads, no training: tests/finetuned.py) through
the export pipeline, chosen on its held-out task top-1, to bundles whose model outputs ``logits``,
whose manifest names the labels, whose infer.py prints them and whose validator checks them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from finetuned import make_finetuned

from profile_copy import profile_copy
from bim_export.core.errors import InputError
from bim_export.core.resources import sample_images_dir
from bim_export.deploy.export import read_metadata
from bim_export.deploy.info import bundle_info
from bim_export.deploy.pipeline import run_export
from bim_export.model.checkpoint import exit_quality, quality_metric, quality_source
from bim_export.runtime.validate import validate_bundle

LABELS = ("cat", "dog", "fish")
TASK = {"name": "pets", "size": 30, "protocol": "stratified hold-out 20 % per class, seed 0"}
# Task top-1 ranks the exits the other way round from kNN top-1: the selector must follow the task.
METRICS = {"step": 0, "exits": {
    "2": {"knn_top1": 0.50, "task_top1": 0.90, "task_ece": 0.05, "task_dataset": TASK},
    "4": {"knn_top1": 0.95, "task_top1": 0.60, "task_ece": 0.04, "task_dataset": TASK}}}


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


@pytest.fixture(scope="module")
def joint(tiny_checkpoint, tmp_path_factory) -> Path:
    return make_finetuned(tmp_path_factory.mktemp("ft") / "joint", "joint", LABELS, source=tiny_checkpoint,
                          metrics=METRICS)


@pytest.fixture(scope="module")
def host(joint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("host")
    run_export("host", joint, out)
    return out / "host"


def _outputs(model: Path) -> list[str]:
    return [o.name for o in onnx.load(str(model), load_external_data=False).graph.output]


def _infer(bundle: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(bundle / "infer.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=bundle, timeout=300)


def test_quality_is_the_task_top1_of_a_finetuned_checkpoint():
    assert quality_metric(METRICS) == "task_top1"
    assert [exit_quality(METRICS, d) for d in (2, 4)] == [0.90, 0.60]
    assert quality_source(METRICS) == f"pets (30 images; {TASK['protocol']})"
    knn_only = {"exits": {d: {"knn_top1": e["knn_top1"]} for d, e in METRICS["exits"].items()}}
    assert quality_metric(knn_only) == "knn_top1" and exit_quality(knn_only, 4) == 0.95
    # an exit without the checkpoint's metric has no quality: two measures are never compared
    mixed = {"exits": {"2": {"knn_top1": 0.5}, "4": {"task_top1": 0.6}}}
    assert exit_quality(mixed, 2) is None and exit_quality(mixed, 4) == 0.6


def test_host_bundle_chooses_on_task_top1_and_says_so(host):
    manifest = json.loads((host / "manifest.json").read_text())
    assert manifest["depth"] == 2  # best task top-1; kNN would pick depth 4
    assert manifest["quality"] == {"metric": "task_top1", "label": "held-out task top-1 (fine-tuned)",
                                   "value": 0.9, "dataset": TASK}
    assert manifest["candidates"]["quality_metric"] == "task_top1"
    report = (host / "report.md").read_text()
    assert f"quality: the exit's held-out task top-1 (fine-tuned) on pets (30 images; {TASK['protocol']})" in report
    assert "kNN top-1 on" not in report
    assert "the best quality (the exit's held-out task top-1 (fine-tuned))" in report
    assert "top-1 agreement of the logits >= 0.99" in report
    assert "classifier of 3 labels (cat, dog, fish)" in bundle_info(host)
    assert "quality      held-out task top-1 (fine-tuned) 90.0% on pets (30 images)" in bundle_info(host)


def test_host_bundle_outputs_logits_and_names_the_labels(host):
    model = host / "model.onnx"
    assert _outputs(model) == ["tokens", "embedding", "logits"]
    assert json.loads(read_metadata(model)["labels"]) == list(LABELS)
    manifest = json.loads((host / "manifest.json").read_text())
    assert manifest["labels"] == list(LABELS) and manifest["num_classes"] == 3
    assert [o["shape"] for o in manifest["outputs"]][-1] == ["batch", 3]
    ref = np.load(host / "reference.npz")
    assert ref["logits"].shape == (len(ref["pixels"]), 3)
    parity = manifest["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["tolerances"]["top1_agreement"] == 0.99


def test_host_infer_prints_top_k_labels_with_probabilities(host, tmp_path):
    import onnxruntime as ort
    from PIL import Image

    from bim_export.runtime.preprocess import preprocess

    images = sorted((sample_images_dir() / "camera").glob("*.jpg"))[:2]
    done = _infer(host, *images, "--top-k", "9", "--save", tmp_path / "logits.npy")
    assert done.returncode == 0, done.stderr
    pre = json.loads((host / "manifest.json").read_text())["preprocessing"]
    x = np.stack([preprocess(Image.open(p).convert("RGB"), pre["img_size"], pre["mean"], pre["std"]) for p in images])
    sess = ort.InferenceSession(str(host / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"pixels": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), logits, rtol=1e-5, atol=1e-5)
    # every class (no more than there are), most likely first, the softmax's probabilities
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for line, path, row in zip(done.stdout.splitlines(), images, probs):
        order = np.argsort(-row)
        assert line == f"{path}: " + ", ".join(f"{LABELS[j]} {row[j]:.3f}" for j in order)
    assert "classifier of 3 labels" in done.stdout
    emb = _infer(host, images[0], "--embeddings")
    assert emb.returncode == 0 and "(dim 32, norm" in emb.stdout


def test_validate_passes_and_a_sabotaged_head_fails_with_exit_4(host, tmp_path):
    assert "top-1 agreement 100.0%" in validate_bundle(host)
    bad = tmp_path / "bad"
    shutil.copytree(host, bad)
    model = onnx.load(str(bad / "model.onnx"))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_before"
    perm = onnx.helper.make_tensor("class_order", onnx.TensorProto.INT64, [3], [1, 2, 0])
    model.graph.initializer.append(perm)
    model.graph.node.append(onnx.helper.make_node("Gather", ["logits_before", "class_order"], ["logits"], axis=1))
    onnx.save(model, str(bad / "model.onnx"))
    manifest = json.loads((bad / "manifest.json").read_text())
    from bim_export.runtime.machine import sha256_file

    manifest["files"]["model.onnx"] = sha256_file(bad / "model.onnx")  # only parity can tell
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = subprocess.run([sys.executable, "validate.py"], cwd=bad, capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stderr
    assert done.stderr.startswith("error: ") and "logits: top-1 agreement" in done.stderr
    assert "embedding:" not in done.stderr  # the backbone is untouched: the head's check caught it


def test_phone_bundle_carries_the_logits_into_model_ort(joint, tmp_path):
    run_export("mobile", joint, tmp_path)
    bundle = tmp_path / "android-snapdragon-8-gen-2"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert _outputs(bundle / "model.onnx") == ["tokens", "embedding", "logits"]
    assert manifest["labels"] == list(LABELS) and (bundle / "model.ort").is_file()
    assert manifest["parity"]["top1_agreement"] >= 0.99
    assert "`logits`: float32 [batch, 3]" in (bundle / "report.md").read_text()
    done = _infer(bundle, sorted((sample_images_dir() / "camera").glob("*.jpg"))[0])
    assert done.returncode == 0, done.stderr
    assert "model.ort matches model.onnx" in done.stdout and any(name in done.stdout for name in LABELS)
    assert "top-1 agreement" in validate_bundle(bundle)


def test_int8_multi_exit_bundle_has_logits_per_exit(joint, tmp_path):
    profile = profile_copy(tmp_path, "raspberry-pi-5", precisions=["int8"])
    run_export(str(profile), joint, tmp_path / "out", multi_exit=True)
    bundle = tmp_path / "out" / profile.stem
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["multi_exit"]
    depth = manifest["depth"]
    want = [f"{k}_{d}" for d in manifest["exits"] for k in ("tokens", "embedding", "logits")]
    assert _outputs(bundle / "model.onnx") == want and depth in manifest["exits"]
    assert {f"logits_{d}" for d in manifest["exits"]} <= set(np.load(bundle / "reference.npz").files)
    assert all(r["top1_agreement"] is not None for r in manifest["parity"]["exits"].values())
    done = _infer(bundle, sorted((sample_images_dir() / "camera").glob("*.jpg"))[0], "--top-k", "2")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()[0].split(": ", 1)[1].split(", ")) == 2
    validate_bundle(bundle)


def test_per_exit_checkpoint_exports_each_depth_and_refuses_multi_exit(tiny_checkpoint, tmp_path):
    ckpt = make_finetuned(tmp_path / "per_exit", "per_exit", LABELS, source=tiny_checkpoint, metrics=METRICS)
    with pytest.raises(InputError, match=r"finetune.mode is per_exit: .* share no weights.*--multi-exit"):
        run_export("raspberry-pi-5", ckpt, tmp_path / "refused", multi_exit=True)
    assert not (tmp_path / "refused").exists()
    profile = profile_copy(tmp_path, "raspberry-pi-5", precisions=["fp32"])
    run_export(str(profile), ckpt, tmp_path / "out")
    bundle = tmp_path / "out" / profile.stem
    assert _outputs(bundle / "model.onnx") == ["tokens", "embedding", "logits"]
    assert json.loads((bundle / "manifest.json").read_text())["depth"] == 2
    validate_bundle(bundle)
