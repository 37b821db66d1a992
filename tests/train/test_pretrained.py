"""--init: a timm ViT's weights into the BIM encoder, from files, checkpoints and timm names."""

from __future__ import annotations

import json
import time

import pytest
import timm
import torch
from conftest import TINY_MODEL_ARGS, tiny_train_config

from bim_export.core.errors import InputError
from bim_export.model.architecture import BimConfig
from bim_export.model.checkpoint import load_checkpoint
from bim_export.train.model import BimModel
from bim_export.train.pretrained import init_encoder
from bim_export.train.trainer import train

ARCH = "vit_tiny_patch16_224"


def _timm_vit(**args) -> torch.nn.Module:
    """A timm ViT of the tiny test architecture (or another), its weights made distinct from any init."""
    torch.manual_seed(123)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, **{**TINY_MODEL_ARGS, **args})
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vit


def _bim(**model_args) -> BimModel:
    torch.manual_seed(0)
    return BimModel(BimConfig.from_settings(model=ARCH, model_args={**TINY_MODEL_ARGS, **model_args}, exits=[2, 4],
                                            decoder_width=32, decoder_heads=2))


def _save_safetensors(state: dict, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _assert_encoder_is(model: BimModel, vit) -> None:
    src = vit.state_dict()
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert torch.equal(model.exit_norms[-1].weight, src["norm.weight"])
    assert torch.equal(model.exit_norms[-1].bias, src["norm.bias"])


@pytest.mark.parametrize("layout", ["safetensors", "pth-plain", "pth-model", "pth-state_dict", "pth-ddp"])
def test_weights_files_in_the_common_layouts(tmp_path, layout):
    vit = _timm_vit()
    sd = vit.state_dict()
    if layout == "safetensors":
        path = _save_safetensors(sd, tmp_path / "vit.safetensors")
    else:
        obj = {"pth-plain": sd, "pth-model": {"model": sd, "epoch": 3},
               "pth-state_dict": {"state_dict": sd, "arch": ARCH, "epoch": 1},
               "pth-ddp": {"model": {f"module.{k}": v for k, v in sd.items()}}}[layout]
        path = tmp_path / "vit.pth"
        torch.save(obj, path)
    model, fresh = _bim(), _bim()
    report = init_encoder(model, str(path), "--init")
    _assert_encoder_is(model, vit)
    assert report.tensors == len(model.encoder.state_dict())
    # the decoders and the other exit norms start as a model built without --init
    for k, v in fresh.state_dict().items():
        if not k.startswith(("encoder.", "exit_norms.1.")):
            assert torch.equal(model.state_dict()[k], v), k
    assert "last exit norm from its final norm" in report.describe()


def test_mae_checkpoint_keys(tmp_path):
    """MAE's encoder keys are timm's; its decoder, mask token and any head are left out."""
    vit = _timm_vit()
    sd = dict(vit.state_dict())
    sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.zeros(192, 16)})
    torch.save({"model": sd}, tmp_path / "mae_pretrain.pth")
    model = _bim()
    report = init_encoder(model, str(tmp_path / "mae_pretrain.pth"))
    _assert_encoder_is(model, vit)
    assert "left out: decoder_blocks, decoder_embed, decoder_norm, decoder_pos_embed ..." in report.notes


def test_bim_checkpoint_and_backbone_folders(tiny_checkpoint, tmp_path):
    from bim_export.model.backbone import save_backbone

    ck = load_checkpoint(tiny_checkpoint)
    for source in (tiny_checkpoint, save_backbone(tiny_checkpoint, 4, tmp_path / "bb") and tmp_path / "bb"):
        model = _bim()
        init_encoder(model, str(source))
        for k, v in model.encoder.state_dict().items():
            assert torch.equal(v, ck.state_dict[f"encoder.{k}"]), k
        assert torch.equal(model.exit_norms[1].weight, ck.state_dict["exit_norms.1.weight"])
        assert not torch.equal(model.exit_norms[0].weight, ck.state_dict["exit_norms.0.weight"])


def test_position_embedding_of_another_grid_is_resampled(tmp_path):
    from timm.layers import resample_abs_pos_embed

    vit = _timm_vit()  # 32 px, patch 8: a 4 x 4 grid
    path = _save_safetensors(vit.state_dict(), tmp_path / "vit.safetensors")
    model = _bim(img_size=64)  # 8 x 8
    report = init_encoder(model, str(path))
    want = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1)
    assert torch.equal(model.encoder.pos_embed.detach(), want)
    assert torch.equal(model.encoder.pos_embed[:, 0], vit.pos_embed[:, 0])  # the class token's position is kept
    assert "pos_embed resampled from a 4x4 to a 8x8 grid" in report.notes


@pytest.mark.parametrize("source_args, model_args, message", [
    ({"depth": 6}, {}, "key blocks.4.norm1.weight: [32] in the source, absent in the model: the source has 6 "
                       "blocks, the model 4 (model_args.depth)"),
    ({"depth": 3}, {}, "key blocks.3.norm1.weight: absent in the source, [32] in the model: the source has 3 "
                       "blocks, the model 4 (model_args.depth)"),
    ({"embed_dim": 48, "num_heads": 2}, {}, "key cls_token: [1, 1, 48] in the source, [1, 1, 32] in the model"),
    ({"patch_size": 4}, {}, "key patch_embed.proj.weight: [32, 3, 4, 4] in the source, [32, 3, 8, 8] in the model"),
    ({}, {"reg_tokens": 2}, "key reg_token: absent in the source, [1, 2, 32] in the model"),
    ({"class_token": False, "global_pool": "avg"}, {}, "key cls_token: absent in the source, [1, 1, 32] in the model"),
    ({"init_values": 1e-5}, {}, "key blocks.0.ls1.gamma: [32] in the source, absent in the model (+7 more); "
                                "another architecture"),
])
def test_architecture_mismatches_name_the_key_and_both_shapes(tmp_path, source_args, model_args, message):
    path = _save_safetensors(_timm_vit(**source_args).state_dict(), tmp_path / "other.safetensors")
    model = _bim(**model_args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError) as e:
        init_encoder(model, str(path), "--init")
    assert str(e.value) == f"--init: {path}: {message}"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded


def test_unreadable_sources(tmp_path):
    model = _bim()
    cases = {"missing.pth": "no such file or folder", "sub/dir/missing": "no such file or folder"}
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases["junk.safetensors"] = "not a readable safetensors file"
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    cases["junk.pth"] = "corrupt or unreadable weights file"
    torch.save({"model": {"blocks.0.x": torch.zeros(1)}, "hook": time.sleep}, tmp_path / "unsafe.pth")
    cases["unsafe.pth"] = "unsafe weights file, refused: it holds objects that would run code when loaded (time.sleep)"
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "no_weights.pth")
    cases["no_weights.pth"] = "no state dict in it (tensors by name, plain or under model / state_dict / module); found: epoch, lr"
    (tmp_path / "folder").mkdir()
    cases["folder"] = "a folder, but not a bim-export checkpoint (weights.safetensors + config.json) or backbone"
    for name, fragment in cases.items():
        with pytest.raises(InputError, match="^" + "--init: " + str(tmp_path / name).replace(".", r"\.")) as e:
            init_encoder(model, str(tmp_path / name), "--init")
        assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_timm_names(monkeypatch, tmp_path):
    """No network and no cache here: one clean error, quickly; cached weights load without a network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # never resolves (RFC 2606)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    model = _bim()
    t0 = time.perf_counter()
    with pytest.raises(InputError) as e:
        init_encoder(model, "vit_tiny_patch16_224.augreg_in21k", "--init")
    assert time.perf_counter() - t0 < 10
    assert str(e.value).startswith("--init: vit_tiny_patch16_224.augreg_in21k: pretrained weights not in the local "
                                   "cache, and hub.invalid cannot be reached")
    with pytest.raises(InputError, match=r"--init: vit_tiny_patch16_224\.nope: Invalid pretrained tag \(nope\)"):
        init_encoder(model, "vit_tiny_patch16_224.nope", "--init")
    with pytest.raises(InputError, match=r"--init: vit_tinny: no such file or folder, and not a timm model name "
                                         r"\(closest: "):
        init_encoder(model, "vit_tinny", "--init")

    # a cached copy in the Hugging Face cache layout: loaded with no network
    snapshot = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    torch.manual_seed(5)
    real = timm.create_model(ARCH, num_classes=0).state_dict()  # the named model's own architecture
    _save_safetensors(real, snapshot / "model.safetensors")
    with pytest.raises(InputError, match=r"augreg_in21k: key blocks\.4\.norm1\.weight: \[192\] in the source, "
                                         r"absent in the model: the source has 12 blocks, the model 4"):
        init_encoder(model, "vit_tiny_patch16_224.augreg_in21k", "--init")
    torch.manual_seed(0)
    full = BimModel(BimConfig.from_settings(model=ARCH, model_args={"img_size": 64}, exits=[6, 12],
                                            decoder_width=32, decoder_heads=2))
    report = init_encoder(full, "vit_tiny_patch16_224.augreg_in21k", "--init")
    assert report.source == "timm vit_tiny_patch16_224.augreg_in21k"
    assert "pos_embed resampled from a 14x14 to a 4x4 grid" in report.notes
    for k, v in full.encoder.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(v, real[k]), k
    assert torch.equal(full.exit_norms[1].weight, real["norm.weight"])


# ------------------------------------------------------------------------------ through the trainer


def test_trained_checkpoint_starts_from_the_init_weights(tmp_path):
    vit = _timm_vit()
    path = _save_safetensors(vit.state_dict(), tmp_path / "vit.safetensors")
    res = train(tiny_train_config(tmp_path / "run", init=str(path), steps=1, lr=1e-12, weight_decay=0.0))
    ck = load_checkpoint(tmp_path / "run")
    src = vit.state_dict()
    for k, v in ck.state_dict.items():
        if k.startswith("encoder."):
            assert torch.allclose(v, src[k[len("encoder."):]], atol=1e-9, rtol=0), k
    assert torch.allclose(ck.state_dict["exit_norms.1.weight"], src["norm.weight"], atol=1e-9, rtol=0)
    assert ck.config["train"]["init"] == str(path)  # the checkpoint records where it started
    assert res.summary().splitlines()[0].startswith(f"{tmp_path / 'run'}: started from pretrained weights {path} (")


def test_resume_does_not_apply_init_again(tmp_path):
    path = _save_safetensors(_timm_vit().state_dict(), tmp_path / "vit.safetensors")
    flat = dict(init=str(path), min_lr=1e-3, save_every=2)  # constant lr: 2 steps + 2 resumed = 4 steps
    train(tiny_train_config(tmp_path / "ref", steps=4, **flat))
    train(tiny_train_config(tmp_path / "run", steps=2, **flat))
    path.unlink()  # a resumed run does not read it: the checkpoint's weights win
    res = train(tiny_train_config(tmp_path / "run", steps=4, **flat), resume=True)
    assert res.resumed_from == 2 and res.init is None
    a, b = load_checkpoint(tmp_path / "ref").state_dict, load_checkpoint(tmp_path / "run").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4]
