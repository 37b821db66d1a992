"""Linear probe, the evaluation protocol and per-exit evaluation: synthetic features with known answers,
then real images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bim_export.core.errors import InputError
from bim_export.model.images import sample_images, scan_image_folder
from bim_export.train import evaluate as ev
from bim_export.model import splits
from bim_export.train import probe


def _clusters(n=400, dim=16, classes=5, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.normal(size=(n, dim)), y


def test_eval_module_imports_without_torch():
    code = "import sys, bim_export.train.evaluate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_linear_probe_separable_and_random():
    x, y = _clusters(spread=0.5)
    assert probe.linear_probe_top1(x[:300], y[:300], x[300:], y[300:]) == 1.0
    rng = np.random.default_rng(3)
    xr, yr = rng.normal(size=(1200, 16)), rng.integers(0, 4, 1200)
    assert probe.linear_probe_top1(xr[:900], yr[:900], xr[900:], yr[900:]) < 0.4


def test_linear_probe_kfold_separable_and_random():
    x, y = _clusters(n=200, spread=0.5)
    assert probe.linear_probe_kfold_top1(x, y) == 1.0
    rng = np.random.default_rng(6)
    xr, yr = rng.normal(size=(300, 16)), rng.integers(0, 3, 300)
    assert probe.linear_probe_kfold_top1(xr, yr) < 0.45  # chance is 1/3


def test_stratified_folds_balance_classes():
    y = np.repeat([0, 1, 2], [10, 7, 5])
    fold = splits.stratified_folds(y, 5)
    for c in range(3):
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_linear_probe_needs_linear_not_nearest_neighbour():
    # class given by the sign of one feature among noisy ones: linear probe nails it
    rng = np.random.default_rng(4)
    x = rng.normal(size=(800, 20))
    y = (x[:, 0] > 0).astype(int)
    assert probe.linear_probe_top1(x[:600], y[:600], x[600:], y[600:]) > 0.95


def test_linear_probe_is_deterministic_and_handles_constant_features():
    x, y = _clusters(spread=1.0)
    x[:, 3] = 7.0
    a = probe.linear_probe_top1(x[:300], y[:300], x[300:], y[300:])
    b = probe.linear_probe_top1(x[:300], y[:300], x[300:], y[300:])
    assert a == b and a > 0.5


# ------------------------------------------------------------------------------ splits and bad input


def test_stratified_split_is_deterministic_and_per_class():
    images = sample_images()
    tr1, va1 = splits.stratified_split(images)
    tr2, va2 = splits.stratified_split(images)
    assert tr1.paths == tr2.paths and va1.paths == va2.paths
    assert not set(tr1.paths) & set(va1.paths)
    assert len(tr1) + len(va1) == len(images)
    assert set(va1.labels) == set(range(len(images.classes)))  # every class is queried


def _write(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_train_val_subfolders_are_used_as_given(tmp_path):
    for part, n in (("train", 3), ("val", 2)):
        for c, v in (("cat", 10), ("dog", 200)):
            for i in range(n):
                _write(tmp_path / part / c / f"{i}.png", v)
    data = splits.load_eval_data(tmp_path)
    assert (len(data.train_idx), len(data.val_idx)) == (6, 4)
    assert "train/ and val/" in data.protocol
    assert data.images.classes == ["cat", "dog"]
    val_labels = [data.images.labels[i] for i in data.val_idx]
    val_dirs = [data.images.paths[i].parent.name for i in data.val_idx]
    assert [data.images.classes[lbl] for lbl in val_labels] == val_dirs


def test_small_sets_are_scored_leave_one_out_and_large_ones_split():
    from bim_export.model.images import ImageList

    def fake(n):
        return ImageList(Path("digits"), [Path(f"{i}.png") for i in range(n)], [i % 4 for i in range(n)],
                         ["a", "b", "c", "d"])

    small, large = splits.make_eval_data(fake(120)), splits.make_eval_data(fake(800))
    assert small.leave_one_out and "leave-one-out" in small.protocol
    assert not large.leave_one_out and "stratified" in large.protocol
    assert (len(large.train_idx), len(large.val_idx)) == (640, 160)


def test_unlabelled_folder_is_an_input_error_naming_it(tmp_path):
    for i in range(3):
        _write(tmp_path / "loose" / f"{i}.png", i)
    with pytest.raises(InputError, match="loose"):
        splits.load_eval_data(tmp_path / "loose")


def test_single_class_folder_is_an_input_error(tmp_path):
    for i in range(3):
        _write(tmp_path / "d" / "only" / f"{i}.png", i)
    with pytest.raises(InputError, match="2 classes"):
        splits.load_eval_data(tmp_path / "d")


# ------------------------------------------------------------------------------ real images, real model


@pytest.fixture(scope="module")
def tiny_vit():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()


def test_extract_features_of_a_timm_backbone_is_its_embedding(tiny_vit):
    import torch

    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    feats = ev.extract_features(tiny_vit, x, batch_size=2)
    assert list(feats) == [2] and feats[2].shape == (5, 32)
    with torch.no_grad():
        ref = tiny_vit.forward_head(tiny_vit.forward_features(torch.from_numpy(x)), pre_logits=True)
    np.testing.assert_allclose(feats[2], ref.numpy(), atol=1e-5)


def test_evaluate_model_on_real_sample_images(tiny_vit):
    images = sample_images()
    res = ev.evaluate_model(tiny_vit, images, 32)
    m = res["2"]
    assert m["knn_dataset"]["size"] == len(images)
    assert m["knn_dataset"]["name"] == "sample_images"
    assert "leave-one-out" in m["knn_dataset"]["protocol"]  # 60 images: a held-out fifth is too coarse
    # the crops of one photo share colour statistics: even random features beat chance (0.1)
    assert 0.2 <= m["knn_top1"] <= 1.0
    assert 0.2 <= m["linear_probe_top1"] <= 1.0


def test_evaluate_model_rejects_unlabelled_images(tiny_vit, tmp_path):
    for i in range(4):
        _write(tmp_path / f"{i}.png", 40 * i)
    with pytest.raises(InputError, match=str(tmp_path.name)):
        ev.evaluate_model(tiny_vit, scan_image_folder(tmp_path), 32)


# ------------------------------------------------------------------------------ checkpoints and the CLI


@pytest.fixture()
def ckpt_copy(tiny_checkpoint, tmp_path):
    import shutil

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_evaluate_checkpoint_updates_metrics_and_keeps_recon_loss(ckpt_copy):
    import json

    from bim_export.core.resources import sample_images_dir

    before = json.loads((ckpt_copy / "metrics.json").read_text())
    summary = ev.evaluate_checkpoint(ckpt_copy, sample_images_dir())
    after = json.loads((ckpt_copy / "metrics.json").read_text())
    assert set(after["exits"]) == {"2", "4"}
    for d in ("2", "4"):
        m = after["exits"][d]
        assert m["recon_loss"] == before["exits"][d]["recon_loss"]
        assert 0.0 <= m["knn_top1"] <= 1.0 and 0.0 <= m["linear_probe_top1"] <= 1.0
        assert m["knn_dataset"] == {"name": "sample_images", "size": 60,
                                    "protocol": "leave-one-out kNN, 5-fold linear probe (under 500 images)"}
    lines = summary.splitlines()
    assert "sample_images" in lines[0] and "leave-one-out" in lines[0]
    assert [ln.split()[0] for ln in lines[2:4]] == ["2", "4"]
    assert f"{after['exits']['4']['knn_top1']:.4f}" in lines[3]


def test_eval_recon_loss_is_measured_on_the_evaluated_images(ckpt_copy, tmp_path):
    """eval's reconstruction loss is each exit's training objective on the --data images (not the
    training figures repeated), on seeded masks: the same on every run, different on other images."""
    import json

    import torch

    from bim_export.model.images import load_image_array
    from bim_export.core.resources import heldout_images_dir, sample_images_dir
    from bim_export.train.model import BimModel

    trained = json.loads((ckpt_copy / "metrics.json").read_text())["exits"]
    runs = []
    for i, data in enumerate((sample_images_dir(), sample_images_dir(), heldout_images_dir())):
        summary = ev.evaluate_checkpoint(ckpt_copy, data, metrics_out=tmp_path / f"m{i}.json")
        runs.append(json.loads((tmp_path / f"m{i}.json").read_text())["exits"])
    for d in ("2", "4"):
        loss = runs[0][d]["eval_recon_loss"]
        assert loss == runs[1][d]["eval_recon_loss"]  # deterministic
        assert loss != trained[d]["recon_loss"] and runs[0][d]["recon_loss"] == trained[d]["recon_loss"]
        assert loss != runs[2][d]["eval_recon_loss"]  # other images, another figure
    row = next(ln for ln in summary.splitlines() if ln.split()[:1] == ["4"])
    assert row.split()[-1] == f"{runs[2]['4']['eval_recon_loss']:.4f}"  # the table shows it
    assert "recon loss: each exit's masked-patch loss on these" in summary
    # the figure is the training objective on those images and masks
    model = BimModel.from_checkpoint(ckpt_copy).eval()
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    x, _ = load_image_array(sample_images_dir(), 32, cfg["mean"], cfg["std"], limit=8)
    want = model.forward_backward(torch.from_numpy(x), model.mask_noise(8, torch.Generator().manual_seed(0))).floats()
    got = ev.reconstruction_losses(model, x, batch_size=8, seed=0)
    assert got.keys() == want.keys() and all(abs(got[d] - want[d]) < 1e-6 for d in got)


def test_eval_features_match_the_exported_backbone(ckpt_copy):
    """The pooled exit features scored here are the embedding the exported backbone will produce."""
    import torch

    from bim_export.model import backbone
    from bim_export.train.model import BimModel

    model = BimModel.from_checkpoint(ckpt_copy)
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    feats = ev.extract_features(model, x)
    for d in (2, 4):
        bb = backbone.build_backbone(ckpt_copy, d)
        with torch.no_grad():
            emb = bb.forward_head(bb.forward_features(torch.from_numpy(x)), pre_logits=True).numpy()
        np.testing.assert_allclose(feats[d], emb, atol=1e-5)


def test_cli_eval_prints_table_and_exits_0(ckpt_copy, capsys):
    from bim_export.cli import main
    from bim_export.core.resources import sample_images_dir

    assert main(["eval", str(ckpt_copy), "--data", str(sample_images_dir())]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and "metrics.json" in out


def test_cli_eval_unlabelled_folder_is_exit_2_naming_it(ckpt_copy, tmp_path, capsys):
    from bim_export.cli import main

    loose = tmp_path / "loose_images"
    for i in range(3):
        _write(loose / f"{i}.png", 50 * i)
    assert main(["eval", str(ckpt_copy), "--data", str(loose)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "loose_images" in err and len(err.strip().splitlines()) == 1


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_eval_metrics_out_leaves_the_checkpoint_unchanged(ckpt_copy, tmp_path, capsys):
    import json

    from bim_export.cli import main
    from bim_export.core.resources import sample_images_dir

    before = _tree(ckpt_copy)
    dest = tmp_path / "figures" / "metrics.json"
    assert main(["eval", str(ckpt_copy), "--data", str(sample_images_dir()), "--metrics-out", str(dest)]) == 0
    assert f"written to {dest} ({ckpt_copy} unchanged)" in capsys.readouterr().out
    assert _tree(ckpt_copy) == before
    written = json.loads(dest.read_text())
    shipped_before = json.loads(before["metrics.json"])
    for d in ("2", "4"):  # the checkpoint's figures with the new ones merged in
        assert written["exits"][d]["recon_loss"] == shipped_before["exits"][d]["recon_loss"]
        assert 0.0 <= written["exits"][d]["knn_top1"] <= 1.0
    assert main(["eval", str(ckpt_copy), "--data", str(sample_images_dir()), "--metrics-out", str(dest)]) == 0


def test_cli_eval_of_a_shipped_checkpoint_only_prints(ckpt_copy, capsys, monkeypatch):
    """Shipped checkpoints are read-only: the figures are printed, the table says nothing was written."""
    from bim_export.cli import main
    from bim_export.core import atomic
    from bim_export.core.resources import sample_images_dir

    # where the files that ship live is the installation's business; here, beside the copy
    monkeypatch.setattr(atomic, "shipped_roots", lambda: [ckpt_copy.parent.resolve()])
    before = _tree(ckpt_copy)
    assert main(["eval", str(ckpt_copy), "--data", str(sample_images_dir())]) == 0
    out = capsys.readouterr().out
    assert "kNN top-1" in out and f"not written: {ckpt_copy} ships with bim-export and is read-only" in out
    assert _tree(ckpt_copy) == before


@pytest.mark.slow
def test_cli_eval_of_the_shipped_default_checkpoint_writes_elsewhere(tmp_path, capsys):
    """The shipped metrics.json is what default exports select on: evaluating it never rewrites it."""
    import json

    from bim_export.cli import main
    from bim_export.core.resources import default_checkpoint_dir, resource_dir, sample_images_dir

    assets = resource_dir("assets")
    before = _tree(assets)
    dest = tmp_path / "default-metrics.json"
    assert main(["eval", str(default_checkpoint_dir()), "--data", str(sample_images_dir()),
                 "--metrics-out", str(dest)]) == 0
    assert f"written to {dest}" in capsys.readouterr().out
    assert _tree(assets) == before
    assert set(json.loads(dest.read_text())["exits"]) == {"3", "6", "9", "12"}
