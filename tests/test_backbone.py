"""Backbones: a plain timm ViT that equals the BIM encoder at its exit, and loads with timm alone."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import TINY_MODEL_ARGS

from bim_export.cli import main
from bim_export.core.errors import InputError
from bim_export.model.architecture import BimConfig
from bim_export.model.backbone import build_backbone, save_backbone
from bim_export.model.checkpoint import load_checkpoint, save_checkpoint
from bim_export.train.model import BimModel


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "reg_avg_checkpoint"])
def test_backbone_equals_the_bim_encoder_at_every_exit(fixture, request):
    path = request.getfixturevalue(fixture)
    ck = load_checkpoint(path)
    bim = BimModel.from_checkpoint(ck)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exits = bim.forward_intermediates(x)
        for depth, ref in zip(ck.exits, exits):
            bb = build_backbone(ck, depth)
            assert len(bb.blocks) == depth and not bb.training and bb.num_classes == 0
            tokens = bb.forward_features(x)
            assert torch.allclose(tokens, ref, atol=1e-5)
            emb = bb.forward_head(tokens, pre_logits=True)
            assert emb.shape == (3, 32)
            assert torch.allclose(emb, bim.pool_exit(ref), atol=1e-5)
    if fixture == "reg_avg_checkpoint":  # avg pooling of the normed patch tokens, registers excluded
        assert bb.global_pool == "avg" and bb.num_prefix_tokens == 2
        assert torch.allclose(emb, exits[-1][:, 2:].mean(1), atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "reg_avg_checkpoint"])
def test_saved_backbone_loads_with_timm_alone(fixture, request, tmp_path):
    import timm

    path = request.getfixturevalue(fixture)
    summary = save_backbone(path, 2, tmp_path / "bb")
    assert "timm.create_model" in summary
    cfg = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["model_args"]["depth"] == 2
    weights = str(tmp_path / "bb" / "model.safetensors")
    args = {k: v for k, v in cfg["model_args"].items() if k != "depth"}
    loaded = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=dict(file=weights),
                               depth=2, num_classes=0, **args).eval()
    ref = build_backbone(path, 2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), ref.forward_features(x), atol=1e-6)
    # the random init of a fresh model differs, so equality above means the file was really loaded
    fresh = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0, **cfg["model_args"]).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.forward_features(x), ref.forward_features(x), atol=1e-3)


def test_unknown_depth_lists_the_exits(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="depth 3 is not an exit.*exits: 2, 4"):
        build_backbone(tiny_checkpoint, 3)
    with pytest.raises(InputError, match="exits: 2, 4"):
        save_backbone(tiny_checkpoint, 5, tmp_path / "bb")
    assert not (tmp_path / "bb").exists()


def test_backbone_cli(tiny_checkpoint, tmp_path, capsys):
    assert main(["backbone", str(tiny_checkpoint), "--depth", "4", "--out", str(tmp_path / "bb")]) == 0
    assert "depth-4 backbone" in capsys.readouterr().out
    assert (tmp_path / "bb" / "model.safetensors").exists()
    assert main(["backbone", str(tiny_checkpoint), "--depth", "3", "--out", str(tmp_path / "bb3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "exits: 2, 4" in err
    assert main(["backbone", str(tmp_path / "missing"), "--depth", "2", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _readme_load_code() -> str:
    """The Python block of the README that loads a saved backbone (``bb6/``)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)]
    found = [b for b in blocks if "bb6/" in b and "timm.create_model" in b]
    assert len(found) == 1, "README: expected one python block loading bb6/"
    return found[0]


def test_readme_load_code_gives_the_bim_encoders_exit(tmp_path, monkeypatch):
    # the README's command: bim-export backbone CKPT --depth 6 --out bb6/, on a checkpoint with exit 6
    torch.manual_seed(0)
    bim = BimModel(BimConfig.from_settings(model="vit_tiny_patch16_224", model_args={**TINY_MODEL_ARGS, "depth": 6},
                                           exits=[3, 6], decoder_width=32, decoder_heads=2))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, bim.state_dict(), {**bim.arch_config(), "mean": [0.5] * 3, "std": [0.5] * 3, "step": 0})
    monkeypatch.chdir(tmp_path)
    assert main(["backbone", str(ckpt), "--depth", "6", "--out", "bb6"]) == 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = bim.eval().forward_intermediates(x)[-1]  # exit 6: normed tokens [B, N, D]
        ref_emb = bim.pool_exit(ref)
    # each statement that builds `model` is checked, not only the last one
    code = _readme_load_code()
    namespace: dict = {}
    models = 0
    for chunk in code.split("\n\n"):
        exec(chunk, namespace)  # noqa: S102 - the README's own code
        if "model =" not in chunk:
            continue
        models += 1
        model = namespace["model"].eval()
        assert len(model.blocks) == 6 and model.num_classes == 0
        with torch.no_grad():
            tokens = model.forward_features(x)
            assert torch.allclose(tokens, ref, atol=1e-6)
            assert torch.allclose(model.forward_head(tokens, pre_logits=True), ref_emb, atol=1e-6)
    assert models == 2


def test_printed_load_lines_run(tiny_checkpoint, tmp_path):
    summary = save_backbone(tiny_checkpoint, 2, tmp_path / "bb")
    calls = [line.split(": ", 1)[1] for line in summary.splitlines()[1:]]
    assert len(calls) == 2 and all(c.startswith("timm.create_model(") for c in calls)
    ref = build_backbone(tiny_checkpoint, 2)
    x = torch.randn(2, 3, 32, 32)
    import timm

    for call in calls:
        model = eval(call, {"timm": timm}).eval()  # noqa: S307 - the line the command prints
        with torch.no_grad():
            assert torch.allclose(model.forward_features(x), ref.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("mode", ["joint", "per_exit"])
def test_finetuned_backbone_is_a_timm_classifier_with_its_exits_head(mode, tmp_path):
    """A fine-tuned checkpoint's backbone carries that exit's head: forward gives the logits, which
    are the head applied to the embedding; every layout gives the same encoder as its source."""
    from finetuned import make_finetuned

    from bim_export.core.resources import default_checkpoint_dir
    from bim_export.model import classifier

    ckpt = load_checkpoint(make_finetuned(tmp_path / "ft", mode))
    assert classifier.labels(ckpt.config) == ["cat", "dog", "fish"] and classifier.mode(ckpt.config) == mode
    size = ckpt.config["model_args"]["img_size"]
    x = torch.randn(2, 3, size, size)
    for depth in ckpt.exits:
        clf, plain = build_backbone(ckpt, depth), build_backbone(default_checkpoint_dir(), depth)
        assert clf.num_classes == 3 and plain.num_classes == 0
        with torch.no_grad():
            emb = clf.forward_head(clf.forward_features(x), pre_logits=True)
            torch.testing.assert_close(emb, plain.forward_head(plain.forward_features(x), pre_logits=True))
            torch.testing.assert_close(clf(x), clf.head(emb))
