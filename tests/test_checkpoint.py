"""Checkpoint directories: round trip, fp16 storage, atomic replacement, clear errors on damage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bim_export.model.checkpoint import (Checkpoint, load_checkpoint, save_checkpoint, update_exit_metrics)
from bim_export.core.errors import InputError
from bim_export.train.model import BimModel

DESIGN_KEYS = ("format_version", "arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
               "num_prefix_tokens", "exits", "decoder", "mask_ratio", "mean", "std", "step", "train",
               "bim_export_version", "model_args", "global_pool", "class_token", "reg_tokens", "mode")


def _copy(ckpt_dir, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, dest)
    return dest


def test_trained_checkpoint_describes_itself(tiny_checkpoint):
    ck = load_checkpoint(tiny_checkpoint)
    assert isinstance(ck, Checkpoint) and ck.path == tiny_checkpoint
    assert [k for k in DESIGN_KEYS if k not in ck.config] == []
    assert ck.config["exits"] == [2, 4] and ck.config["step"] == 4
    assert ck.config["decoder"] == {"depth": 1, "width": 32, "heads": 2}
    assert ck.metrics["step"] == 4
    for d in ("2", "4"):
        m = ck.metrics["exits"][d]
        assert m["recon_loss"] > 0
        assert 0.0 <= m["knn_top1"] <= 1.0 and m["knn_dataset"]["size"] == 60
    assert all(v.dtype == torch.float32 for v in ck.state_dict.values())
    state = ck.load_train_state()
    assert state["step"] == 4 and "optimizer" in state and "rng" in state


def test_build_model_round_trips_the_weights(tiny_checkpoint, tmp_path):
    ck = load_checkpoint(tiny_checkpoint)
    model = BimModel.from_checkpoint(ck)
    assert not model.training
    save_checkpoint(tmp_path / "copy", model.state_dict(), ck.config, ck.metrics)
    again = load_checkpoint(tmp_path / "copy")
    assert again.state_dict.keys() == ck.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in ck.state_dict.items())
    assert again.metrics == ck.metrics


def test_fp16_weights_are_smaller_and_load_as_fp32(tiny_checkpoint, tmp_path):
    ck = load_checkpoint(tiny_checkpoint)
    save_checkpoint(tmp_path / "half", ck.state_dict, ck.config, weights_dtype="fp16")
    half = load_checkpoint(tmp_path / "half")
    assert half.config["weights_dtype"] == "fp16"
    size = lambda p: (p / "weights.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "half") < 0.6 * size(tiny_checkpoint)
    for k, v in ck.state_dict.items():
        assert half.state_dict[k].dtype == torch.float32
        assert torch.allclose(half.state_dict[k], v, rtol=1e-3, atol=1e-4)
    with pytest.raises(InputError, match="weights_dtype"):
        save_checkpoint(tmp_path / "bad", ck.state_dict, ck.config, weights_dtype="int8")


def test_failed_save_leaves_the_previous_checkpoint(tiny_checkpoint, tmp_path):
    dest = _copy(tiny_checkpoint, tmp_path)
    ck = load_checkpoint(dest)
    with pytest.raises(TypeError):
        save_checkpoint(dest, ck.state_dict, {**ck.config, "bad": object()})
    assert load_checkpoint(dest).config == ck.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_update_exit_metrics_merges(tiny_checkpoint, tmp_path):
    dest = _copy(tiny_checkpoint, tmp_path)
    update_exit_metrics(dest, {4: {"linear_probe_top1": 0.5, "extra": 1}})
    m = load_checkpoint(dest, weights=False).metrics
    assert m["exits"]["4"]["extra"] == 1 and m["exits"]["4"]["linear_probe_top1"] == 0.5
    assert "recon_loss" in m["exits"]["4"] and "2" in m["exits"]


def test_missing_directory_and_files_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    dest = _copy(tiny_checkpoint, tmp_path)
    (dest / "weights.safetensors").unlink()
    with pytest.raises(InputError, match=r"weights\.safetensors: missing"):
        load_checkpoint(dest)
    (dest / "config.json").unlink()
    with pytest.raises(InputError, match=r"config\.json: missing"):
        load_checkpoint(dest)
    with pytest.raises(InputError, match="is a file"):
        load_checkpoint(tiny_checkpoint / "config.json")


def test_corrupt_files_are_reported(tiny_checkpoint, tmp_path):
    dest = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config\.json: not valid JSON"):
        load_checkpoint(dest)
    del cfg["exits"]
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"config\.json: missing keys exits"):
        load_checkpoint(dest)

    dest2 = _copy(tiny_checkpoint, tmp_path / "b")
    data = (dest2 / "weights.safetensors").read_bytes()
    (dest2 / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"weights\.safetensors: corrupt"):
        load_checkpoint(dest2)
    (dest2 / "metrics.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"metrics\.json: expected a JSON object"):
        load_checkpoint(dest2, weights=False)


def test_train_state_never_unpickles_code(tiny_checkpoint, tmp_path):
    dest = _copy(tiny_checkpoint, tmp_path)
    torch.save({"step": 1, "evil": shutil.rmtree}, dest / "train_state.pt")  # a pickled function
    with pytest.raises(InputError, match=r"train_state\.pt: unsafe training state, refused: .* \(shutil\.rmtree\)") as err:
        load_checkpoint(dest).load_train_state()
    # torch's own message suggests weights_only=False, i.e. running the file's code: not passed on
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value) and "\x1b" not in str(err.value)
    (dest / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"train_state\.pt: corrupt or unreadable training state"):
        load_checkpoint(dest).load_train_state()
    (dest / "train_state.pt").unlink()
    with pytest.raises(InputError, match="no training state"):
        load_checkpoint(dest).load_train_state()


def test_weights_that_do_not_match_the_config_are_reported(tiny_checkpoint, tmp_path):
    ck = load_checkpoint(tiny_checkpoint)
    cfg = {**ck.config, "model_args": {**ck.config["model_args"], "embed_dim": 64}}
    save_checkpoint(tmp_path / "x", ck.state_dict, cfg)
    with pytest.raises(InputError, match=r"weights\.safetensors: weights do not match config\.json"):
        BimModel.from_checkpoint(load_checkpoint(tmp_path / "x"))


def test_newer_format_is_refused(tiny_checkpoint, tmp_path):
    dest = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["format_version"] = 99
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="format_version 99 is newer"):
        load_checkpoint(dest)


def test_shipped_default_checkpoint_matches_its_recipe():
    from bim_export.core.resources import default_checkpoint_dir, resource_dir
    from bim_export.train.config import TrainConfig, load_train_config

    ck = load_checkpoint(default_checkpoint_dir())
    assert ck.exits == [3, 6, 9, 12] and ck.config["embed_dim"] == 192 and ck.config["weights_dtype"] == "fp16"
    assert not (default_checkpoint_dir() / "train_state.pt").exists()
    assert all(0.0 <= ck.metrics["exits"][str(d)]["knn_top1"] <= 1.0 for d in ck.exits)
    recipe = load_train_config(resource_dir("assets") / "default_checkpoint.yaml")
    # scored on images it was not trained on: the held-out photos, named in metrics.json
    assert recipe.data is None and recipe.eval_data.name == "heldout_images"
    assert {ck.metrics["exits"][str(d)]["knn_dataset"]["name"] for d in ck.exits} == {"heldout_images"}
    trained = TrainConfig(**ck.config["train"])
    assert trained.bim == recipe.bim  # model, model_args, exits, decoder ...
    for key in ("steps", "batch_size", "lr", "seed"):
        assert getattr(trained, key) == getattr(recipe, key), key
