"""More of the Pareto front: input resolution and several checkpoints as selection axes.

The tiny checkpoint (32 px, patch 8) competes at 32, 24 and 16 px; a second tiny checkpoint, trained
here, competes with it. Resampled backbones are checked against timm's own resampling, the exported
graph against PyTorch at the new size, the selector on plain tables, and every bad input is exit 2
with one line and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bim_export.cli import main
from bim_export.core.resources import resource_dir, sample_images_dir
from bim_export.deploy import pipeline
from bim_export.deploy.candidates import evaluate_candidates
from bim_export.deploy.profiles import Budgets, Profile, load_profile
from bim_export.deploy.selector import Candidate, select
from bim_export.deploy.sources import open_sources
from bim_export.model.backbone import build_backbone
from bim_export.model.checkpoint import load_checkpoint
from conftest import tiny_train_config


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


def _profile(tmp_path: Path, name: str, base: str = "raspberry-pi-5", **fields):
    prof = yaml.safe_load((resource_dir("profiles") / f"{base}.yaml").read_text())
    prof["budgets"].update(fields.pop("budgets", {}))
    prof.update(fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


# ------------------------------------------------------------------------------ resampled backbones


def test_backbone_at_its_own_resolution_is_unchanged(tiny_checkpoint):
    plain, same = build_backbone(tiny_checkpoint, 4), build_backbone(tiny_checkpoint, 4, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(plain.forward_features(x), same.forward_features(x))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), same.state_dict().values()))


def test_backbone_at_a_new_resolution_is_timms_own_resampling(tiny_checkpoint):
    import timm
    from timm.layers import resample_abs_pos_embed

    ckpt = load_checkpoint(tiny_checkpoint)
    plain, small = build_backbone(ckpt, 4), build_backbone(ckpt, 4, 16)
    assert small.patch_embed.img_size == (16, 16) and small.patch_embed.patch_size == (8, 8)
    prefix = plain.num_prefix_tokens
    expected = resample_abs_pos_embed(plain.pos_embed, new_size=(2, 2), old_size=(4, 4), num_prefix_tokens=prefix)
    assert torch.equal(small.pos_embed, expected)
    assert torch.equal(small.pos_embed[:, :prefix], plain.pos_embed[:, :prefix])  # prefix tokens kept
    # timm's dynamic-size model resamples the same embedding at forward time
    dynamic = timm.create_model(ckpt.config["arch"], num_classes=0, dynamic_img_size=True,
                                **{**ckpt.bim_config.model_args, "depth": 4})
    dynamic.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(small.forward_features(x), dynamic.eval().forward_features(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the selector, plain tables


def _plain_profile(**budgets) -> Profile:
    return Profile(name="test-device", description="test", device_class="cpu", measured=True,
                   execution_providers=["CPUExecutionProvider"], precisions=["fp32"], budgets=Budgets(**budgets))


def _c(depth, res, quality, latency, **kw):
    return Candidate(depth=depth, precision="fp32", resolution=res, quality=quality, latency_ms=latency,
                     latency_stat="p90", latency_source="predicted", expected_error=0.3, size_mb=10.0 * depth, **kw)


def test_a_budget_met_only_at_a_lower_resolution_picks_it_over_a_shallower_full_size_model():
    table = [_c(12, 224, 0.80, 20.0), _c(6, 224, 0.70, 9.0), _c(3, 224, 0.60, 5.0),
             _c(12, 160, 0.77, 9.5), _c(6, 160, 0.66, 4.5), _c(3, 160, 0.55, 2.6)]
    profile = _plain_profile(latency_ms=10.0, latency_stat="p90")
    sel = select(table, profile)
    assert (sel.choice.depth, sel.choice.resolution) == (12, 160)
    best_full = max((r.candidate for r in sel.rows if r.candidate.resolution == 224 and r.status != "rejected"),
                    key=lambda c: c.quality)
    assert sel.choice.quality > best_full.quality  # 77 % at 160 px beats depth 6 at 224 px (70 %)
    assert "@160px" in sel.choice.label and "px" in sel.table().splitlines()[0]
    assert sel.to_dict()["choice"] == {"depth": 12, "precision": "fp32", "resolution": 160}
    # without the resolution axis the same budget gets the shallower full-size model
    assert select(table[:3], profile).choice.depth == 6


def test_tables_of_one_checkpoint_at_its_own_size_keep_their_columns():
    profile = _plain_profile()
    sel = select([_c(6, None, 0.7, 3.0)], profile)
    assert sel.table().split()[0] == "depth"
    assert "resolution" not in sel.to_dict()["candidates"][0] and "checkpoint" not in sel.to_dict()["candidates"][0]


# ------------------------------------------------------------------------------ end to end


def test_quality_at_the_checkpoints_own_size_is_metrics_json(tiny_checkpoint):
    from bim_export.model.quality import measure_quality, recorded_eval_folder

    ckpt = load_checkpoint(tiny_checkpoint)
    measured = measure_quality(ckpt, 32, recorded_eval_folder(ckpt))
    for d in ckpt.exits:
        assert measured.top1[d] == pytest.approx(ckpt.metrics["exits"][str(d)]["knn_top1"])
    assert measured.dataset == {k: ckpt.metrics["exits"]["4"]["knn_dataset"][k] for k in ("name", "size", "protocol")}


@pytest.mark.slow
def test_budget_met_only_at_a_lower_resolution_end_to_end(tiny_checkpoint, tmp_path):
    generous = load_profile(_profile(tmp_path, "generous", budgets={"latency_ms": 1000}))
    sources = open_sources([tiny_checkpoint], [generous], None, tmp_path / "work", [32, 16])
    # each size on its own: together, the one that cannot win within this budget would not be built
    trials = [t for shop in sources.workshops(generous) for t in evaluate_candidates([shop], generous,
                                                                                  labelled=(False, True))]
    assert {t.resolution for t in trials} == {32, 16}
    assert all(t.parity.passed for t in trials if t.precision == "fp32")  # ONNX at 16 px == PyTorch at 16 px
    fastest = {r: min(t.latency.stat("p90") for t in trials if t.resolution == r) for r in (32, 16)}
    assert fastest[16] < fastest[32]
    budget = (fastest[16] * fastest[32]) ** 0.5  # only 16-px candidates fit
    prof = _profile(tmp_path, "tight", budgets={"latency_ms": round(budget, 4), "latency_stat": "p90"},
                    resolutions=[32, 16])
    out = tmp_path / "out"
    text = pipeline.run_export(str(prof), tiny_checkpoint, out)
    assert "at 16 px" in text
    bundle = out / "tight"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocessing"]["img_size"] == 16 and manifest["input"]["shape"][2:] == [16, 16]
    assert manifest["checkpoint"]["resolution"] == 16 and manifest["checkpoint"]["img_size"] == 32
    assert manifest["candidates"]["choice"]["resolution"] == 16
    assert manifest["quality"]["dataset"]["resolution"] == 16
    assert all(c["status"] == "rejected" for c in manifest["candidates"]["candidates"] if c["resolution"] == 32)
    assert np.load(bundle / "reference.npz")["pixels"].shape[2:] == (16, 16)
    assert main(["validate", str(bundle)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("low", [0.50, 0.897])
def test_a_workshop_that_cannot_win_is_listed_not_built(tiny_checkpoint, tmp_path, low):
    """Workshops are taken best first; one whose best exit is more than half a point below a candidate
    within every budget cannot be chosen, so nothing of it is exported (its rows say why); within
    half a point it is built and competes on latency."""
    from bim_export.deploy.candidates import to_candidates
    from bim_export.model.quality import Measured

    generous = load_profile(_profile(tmp_path, "generous", budgets={"latency_ms": 1000}))
    sources = open_sources([tiny_checkpoint], [generous], None, tmp_path / "work", [32, 16])
    high, other = sources.workshops(generous)
    exits = load_checkpoint(tiny_checkpoint).exits
    data = {"name": "set", "size": 10, "protocol": "given"}
    high.measured = Measured(32, {d: 0.9 for d in exits}, "knn_top1", data)
    other.measured = Measured(16, {d: low for d in exits}, "knn_top1", data)
    trials = evaluate_candidates([other, high], generous, labelled=(False, True))  # order given: worse first
    built = {t.resolution for t in trials if t.model is not None}
    sel = select(to_candidates(trials, generous), generous)
    if low < 0.9 - 0.005:
        assert built == {32} and not other._models  # no graph of the 16-px workshop was made
        skipped = [r for r in sel.rows if r.candidate.resolution == 16]
        assert skipped and all(r.status == "rejected" and r.reason.startswith("not built: its best exit scores 50.0%")
                               for r in skipped)
        assert sel.choice.resolution == 32
    else:
        assert built == {32, 16} and not any(t.skipped for t in trials)


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
    """A folder of two tiny runs scored on the same set: the shared tiny checkpoint and one trained
    here with another seed."""
    from bim_export.train.trainer import train

    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(tiny_checkpoint, root / "a")
    train(tiny_train_config(root / "b", eval_data=sample_images_dir(), seed=1))
    (root / "notes").mkdir()  # not a checkpoint: skipped
    return root


@pytest.mark.slow
def test_two_checkpoints_one_table_and_the_manifest_names_the_source(runs, tmp_path, capsys):
    prof = _profile(tmp_path, "generous", budgets={"latency_ms": 1000})
    out = tmp_path / "out"
    assert main(["--target", str(prof), "--checkpoint", str(runs), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.split()[0] == "checkpoint"
    assert {line.split()[0] for line in table.splitlines()[1:9]} == {"a", "b"}
    manifest = json.loads((out / "generous" / "manifest.json").read_text())
    chosen = manifest["candidates"]["choice"]["checkpoint"]
    assert chosen in ("a", "b") and manifest["checkpoint"]["name"] == chosen
    assert Path(manifest["checkpoint"]["source"]) == (runs / chosen).resolve() or \
        Path(manifest["checkpoint"]["source"]).name == chosen
    assert {c["checkpoint"] for c in manifest["candidates"]["candidates"]} == {"a", "b"}
    assert f"of {chosen}" in (out / "generous" / "report.md").read_text()


# ------------------------------------------------------------------------------ bad input: exit 2, one line


def _bad(argv, capsys, out: Path, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], err[0]
    assert not out.exists()


def test_resolution_not_a_multiple_of_the_patch_size(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    _bad(["--target", "raspberry-pi-5", "--checkpoint", str(tiny_checkpoint), "--resolutions", "32,20",
          "--out", str(out)], capsys, out, "--resolutions", "20 px", "patch size (8 px)")
    prof = _profile(tmp_path, "odd", resolutions=[32, 30])
    _bad(["--target", str(prof), "--checkpoint", str(tiny_checkpoint), "--out", str(out)], capsys, out,
         "odd.yaml: resolutions", "30 px")
    _bad(["--target", "raspberry-pi-5", "--resolutions", "big", "--out", str(out)], capsys, out, "--resolutions", "'big'")


def test_checkpoint_folder_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    out = tmp_path / "out"
    _bad(["--target", "raspberry-pi-5", "--checkpoint", str(tmp_path / "runs"), "--out", str(out)], capsys, out,
         "--checkpoint", "holds no checkpoint")


def test_checkpoints_scored_on_different_sets_need_eval_data(tiny_checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    metrics = json.loads((other / "metrics.json").read_text())
    for entry in metrics["exits"].values():
        entry["knn_dataset"] = {**entry["knn_dataset"], "name": "another-set"}
    (other / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "out"
    _bad(["--target", "raspberry-pi-5", "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(other),
          "--out", str(out)], capsys, out, "tiny", "other", "another-set", "--eval-data")
    # with --eval-data every candidate is re-scored on that one folder: the sets compare
    sources = open_sources([tiny_checkpoint, other], [load_profile("raspberry-pi-5")], None, tmp_path / "w",
                           eval_data=sample_images_dir())
    assert sources.rescore and sources.names == ["tiny", "other"]


@pytest.mark.slow
def test_fine_tuned_quality_at_a_resolution_is_the_task_top1_evaluation_computes(tmp_path):
    """At its own size the measured figure is `bim-export eval`'s task top-1 on the same folder; at
    another it is measured there, on the same images."""
    from finetuned import make_finetuned

    from bim_export.model.quality import measure_quality
    from bim_export.model.splits import task_data
    from bim_export.train.evaluate import evaluate_classifier

    labels = ("brick", "coins", "moon")
    folder = tmp_path / "task"
    for c in labels:
        shutil.copytree(resource_dir("assets") / "heldout_images" / c, folder / c)
    ckpt = load_checkpoint(make_finetuned(tmp_path / "ft", labels=labels))
    expected = evaluate_classifier(ckpt, task_data(ckpt, folder))
    own = measure_quality(ckpt, 64, folder)
    assert own.metric == "task_top1"
    assert own.top1 == {d: pytest.approx(expected[str(d)]["task_top1"]) for d in ckpt.exits}
    small = measure_quality(ckpt, 48, folder)
    assert small.dataset == own.dataset and small.resolution == 48
