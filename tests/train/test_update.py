"""Per-stage updates: the same weights as one step after the whole backward, gradients freed stage by
stage, the fallbacks, and optimizer state keyed by parameter name (resumable under either update)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_train_config
from test_trainer import assert_same_weights

from bim_export.core.errors import InputError
from bim_export.model.architecture import BimConfig
from bim_export.model.checkpoint import load_checkpoint
from bim_export.train.distributed import DistInfo
from bim_export.train.model import BimModel
from bim_export.train.optim import StageOptimizer, param_groups
from bim_export.train.trainer import train
from bim_export.train.update import Stepper, resolve_update

TINY = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2, "reg_tokens": 1}


def tiny_model(mode="bim", exits=(1, 2, 4)) -> BimModel:
    torch.manual_seed(0)
    return BimModel(BimConfig.from_settings(model="vit_tiny_patch16_224", model_args=TINY, exits=list(exits),
                                            mode=mode, decoder_width=32, decoder_heads=2))


def test_stages_own_disjoint_parameters_covering_the_model():
    m = tiny_model()
    owned = [dict(m.stage_parameters(i)) for i in range(m.num_stages)]
    names = [n for n, _ in m.named_parameters()]
    assert sorted(n for o in owned for n in o) == sorted(names)  # each parameter in exactly one stage
    assert {"encoder.patch_embed.proj.weight", "encoder.pos_embed", "encoder.cls_token", "encoder.reg_token",
            "encoder.blocks.0.attn.qkv.weight", "exit_norms.0.weight", "decoders.0.mask_token"} <= set(owned[0])
    assert {n.split(".")[2] for n in owned[2] if n.startswith("encoder.blocks.")} == {"2", "3"}
    assert all(n.startswith(("encoder.blocks.1.", "exit_norms.1.", "decoders.1.")) for n in owned[1])
    e2e = tiny_model("e2e")  # one decoder, at the last exit: the last stage's
    assert any(n.startswith("decoders.0.") for n, _ in e2e.stage_parameters(2))


def test_a_stage_is_stepped_and_its_gradients_freed_before_the_next_stage_runs():
    m = tiny_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    stepper = Stepper(StageOptimizer(m, tiny_train_config("x")), DistInfo(), "stage")
    seen = []

    def stage_done(i):
        stepper.stage_done(i)
        seen.append([all(p.grad is None for _, p in m.stage_parameters(j)) for j in range(m.num_stages)])
        assert not torch.equal(dict(m.named_parameters())["encoder.patch_embed.proj.weight"],
                               before["encoder.patch_embed.proj.weight"])  # stage 0 already stepped

    stepper.begin(1e-3)
    m.forward_backward(torch.randn(2, 3, 32, 32), torch.rand(2, 16), on_stage_end=stage_done)
    stepper.finish()
    # after stage i's end every stage up to i is stepped with its gradients freed; later ones have none yet
    assert seen == [[True, True, True]] * 3
    assert all(not torch.equal(p, before[n]) for n, p in m.named_parameters() if n.endswith("qkv.weight"))


@pytest.mark.parametrize("settings", [{}, {"accum_steps": 2}, {"grad_clip": 0.05, "grad_clip_mode": "stage"},
                                      {"grad_checkpointing": True}, {"overlap": 1}, {"overlap": 1, "accum_steps": 2}])
def test_stage_updates_equal_one_step_after_the_backward(tmp_path, settings):
    train(tiny_train_config(tmp_path / "stage", steps=3, update="stage", **settings))
    train(tiny_train_config(tmp_path / "step", steps=3, update="step", **settings))
    assert_same_weights(tmp_path / "stage", tmp_path / "step", atol=1e-6)
    if settings.get("grad_clip"):  # the clip acted: without it the weights differ
        train(tiny_train_config(tmp_path / "unclipped", steps=3))
        with pytest.raises(AssertionError):
            assert_same_weights(tmp_path / "stage", tmp_path / "unclipped", atol=1e-6)


def test_update_falls_back_to_step_where_stages_cannot_be_stepped_alone(tmp_path, caplog):
    assert resolve_update(tiny_train_config("x"))[0] == "stage"
    assert resolve_update(tiny_train_config("x", accum_steps=2))[1].endswith("during the last of 2 micro-batches)")
    assert resolve_update(tiny_train_config("x", grad_clip=1.0, grad_clip_mode="stage"))[0] == "stage"
    update, line = resolve_update(tiny_train_config("x", mode="e2e"))
    assert update == "step" and "mode e2e back-propagates through every stage" in line
    update, line = resolve_update(tiny_train_config("x", grad_clip=1.0))
    assert update == "step" and "global norm" in line and "grad_clip_mode: stage" in line
    with pytest.raises(ValueError, match="global norm needs update: step"):
        Stepper(StageOptimizer(tiny_model(), tiny_train_config("x")), DistInfo(), "stage", 1.0, "global")
    with caplog.at_level(logging.INFO, logger="bim_export.train.trainer"):
        train(tiny_train_config(tmp_path / "clip", steps=1, grad_clip=1.0))
    assert "started from scratch; update: step (update: stage would not give the same result" in caplog.text


# ------------------------------------------------------------------------------ optimizer state


def _legacy_optimizer_state(model: BimModel, by_name: dict) -> dict:
    """What older checkpoints saved: one torch AdamW over ``param_groups(model)``, state by position."""
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    sd = opt.state_dict()
    sd["state"] = {i: by_name[n] for i, n in enumerate(order) if n in by_name}
    return sd


def test_optimizer_state_is_keyed_by_name_and_reads_the_older_positional_format():
    m = tiny_model()
    opt = StageOptimizer(m, tiny_train_config("x"))
    m.forward_backward(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    opt.step()
    saved = opt.state_dict()
    assert saved["format"] == "adamw-by-name" and set(saved["state"]) == {n for n, _ in m.named_parameters()}
    for state in (saved, _legacy_optimizer_state(m, saved["state"])):
        other = StageOptimizer(tiny_model(), tiny_train_config("x"))
        other.load_state_dict(state)
        again = other.state_dict()["state"]
        assert again.keys() == saved["state"].keys()
        assert all(torch.equal(again[n]["exp_avg_sq"], saved["state"][n]["exp_avg_sq"]) for n in again)


def test_optimizers_of_some_stages_save_and_load_their_share_of_the_state():
    m = tiny_model()
    full = StageOptimizer(m, tiny_train_config("x"))
    m.forward_backward(torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    full.step()
    saved = full.state_dict()["state"]
    parts = [StageOptimizer(m, tiny_train_config("x"), stages=s) for s in ([0], [1, 2])]
    for part in parts:  # as a process holding those stages of a stage-parallel layout would
        part.load_state_dict(full.state_dict())
    states = [part.state_dict()["state"] for part in parts]
    assert set(states[0]) == {n for n, _ in m.stage_parameters(0)} and not set(states[0]) & set(states[1])
    merged = {**states[0], **states[1]}
    assert merged.keys() == saved.keys()
    assert all(torch.equal(merged[n]["exp_avg"], saved[n]["exp_avg"]) for n in saved)


def test_optimizer_state_of_another_model_is_refused():
    m = tiny_model()
    opt = StageOptimizer(m, tiny_train_config("x"))
    with pytest.raises(InputError, match=r"ts\.pt: optimizer state of parameters this model does not have \(nope\)"):
        opt.load_state_dict({"format": "adamw-by-name", "state": {"nope": {}}}, "ts.pt")
    legacy = _legacy_optimizer_state(m, {})
    legacy["param_groups"][0]["params"] = legacy["param_groups"][0]["params"][:-1]
    with pytest.raises(InputError, match=r"ts\.pt: optimizer state of an older layout has parameter groups of"):
        opt.load_state_dict(legacy, "ts.pt")
    with pytest.raises(InputError, match=r"ts\.pt: optimizer state in an unknown format"):
        opt.load_state_dict({"weights": 1}, "ts.pt")


def test_a_checkpoint_resumes_under_either_update_and_from_the_older_format(tmp_path):
    ref = tmp_path / "ref"
    train(tiny_train_config(ref, steps=4, save_every=2))
    for first, then in (("step", "stage"), ("stage", "step")):
        out = tmp_path / f"{first}-{then}"
        train(tiny_train_config(out, steps=2, update=first))
        train(tiny_train_config(out, steps=4, save_every=2, update=then), resume=True)
        assert_same_weights(ref, out)
    # a train_state.pt written before optimizer state was keyed by name
    out = tmp_path / "legacy"
    train(tiny_train_config(out, steps=2))
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["optimizer"] = _legacy_optimizer_state(BimModel.from_checkpoint(out), state["optimizer"]["state"])
    torch.save(state, out / "train_state.pt")
    train(tiny_train_config(out, steps=4, save_every=2), resume=True)
    assert_same_weights(ref, out)
    assert load_checkpoint(out).config["step"] == 4
