"""The trainer: settings, schedule, resume (also after SIGKILL), accumulation, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from bim_export.cli import main
from bim_export.core.errors import InputError, TrainingError
from bim_export.model.architecture import BimConfig
from bim_export.model.checkpoint import load_checkpoint
from bim_export.train.config import load_train_config, parse_overrides
from bim_export.train.model import BimModel
from bim_export.train.optim import lr_at, param_groups
from bim_export.train.trainer import train


def _weights(path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


def assert_same_weights(a, b, atol=0.0):
    """Checkpoints ``a`` and ``b`` hold the same weights (within ``atol`` where ``atol`` > 0).

    With a tolerance, attention key biases are left out: their gradient is zero by construction
    (softmax ignores a shift shared by all keys), so AdamW turns rounding noise there into steps
    of full learning-rate size, whatever the summation order.
    """
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        x, y = wa[k], wb[k]
        if atol and k.endswith("attn.qkv.bias"):
            d = len(x) // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        assert torch.allclose(x, y, atol=atol, rtol=0), k


# ------------------------------------------------------------------------------ settings


def test_yaml_flags_and_set_overrides_combine(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: vit_small_patch16_224\nsteps: 10\nmodel_args: {img_size: 64, depth: 6}\nout: a\n")
    cfg = load_train_config(f, ["steps=20", "model_args.depth=4", "exits=[2,4]"], out=tmp_path / "b", model=None)
    assert cfg.bim.arch == "vit_small_patch16_224" and cfg.steps == 20 and cfg.bim.exits == [2, 4]
    assert cfg.bim.model_args == {"img_size": 64, "depth": 4} and cfg.out == tmp_path / "b"
    assert parse_overrides(["a.b.c=1.5", "flag=true", "name=x"]) == {"a": {"b": {"c": 1.5}}, "flag": True, "name": "x"}


@pytest.mark.parametrize("text, overrides, message", [
    ("out: x\nstepz: 3\n", [], r"run\.yaml: stepz: Extra inputs are not permitted"),
    ("out: x\nsteps: -1\n", [], r"run\.yaml: steps: Input should be greater than or equal to 1 \(got -1\)"),
    ("out: x\nexits: [3, 2]\n", [], "exits must be strictly increasing"),
    ("out: x\nbatch_size: 10\naccum_steps: 3\n", [], "not divisible by accum_steps"),
    ("steps: 3\n", [], "out: Field required"),
    ("out: x\n", ["precision=fp8"], "precision: Input should be 'auto', 'fp32' or 'bf16'"),
    ("out: [unclosed\n", [], r"run\.yaml: not valid YAML"),
    ("- a list\n", [], "expected a mapping"),
    ("out: x\n", ["novalue"], "--set novalue: expected KEY=VALUE"),
    ("out: x\n", ["steps=0"], "--set steps: Input should be greater than or equal to 1"),
    ("out: x\nexits: [3, 6, 9, 12]\nloss_weights: [1, 1, 1, 2]\n", ["exits=[4, 8, 12]"],
     r"run\.yaml: loss_weights: 4 weights for 3 decoders \(mode bim, exits \[4, 8, 12\] from --set exits\)"),
    ("out: x\nmodel: vit_tiny_patch16_2244\n", [], r"run\.yaml: model: unknown model 'vit_tiny_patch16_2244'"),
    ("out: x\nexits: [2, 4]\n", ["overlap=3"], r"--set overlap: overlap 3 is more than the blocks of a stage"),
    ("out: x\nmode: e2e\noverlap: 1\n", [], r"run\.yaml: overlap: overlap 1 applies to mode bim"),
    ("out: x\n", ["last_decoder_width=-8"], r"--set last_decoder_width: Input should be greater than or equal to 4"),
])
def test_bad_settings_name_the_file_and_field(tmp_path, text, overrides, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match=message):
        load_train_config(f, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.yaml: cannot read config file"):
        load_train_config(tmp_path / "nope.yaml")


def test_mae_learning_rate_schedule(tmp_path):
    cfg = tiny_train_config(tmp_path, lr=None, base_lr=1e-3, batch_size=512, steps=100, warmup_steps=10, min_lr=1e-5)
    assert cfg.peak_lr == pytest.approx(2e-3)  # base_lr x batch / 256
    assert lr_at(0, cfg) == pytest.approx(2e-4)  # linear warm-up
    assert lr_at(9, cfg) == pytest.approx(2e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-5 + (2e-3 - 1e-5) * 0.5)  # half way down the cosine
    assert lr_at(99, cfg) < 2e-5
    assert tiny_train_config(tmp_path, steps=200, warmup_steps=None).warmup == 10  # 5 % by default


def test_weight_decay_skips_norms_biases_position_and_tokens():
    m = BimModel(BimConfig(arch="vit_tiny_patch16_224", model_args={"img_size": 32, "patch_size": 8, "depth": 2,
                                                                    "embed_dim": 32, "num_heads": 2, "reg_tokens": 1},
                           exits=[2]))
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.reg_token", "decoders.0.mask_token",
            "exit_norms.0.weight", "encoder.blocks.0.attn.qkv.bias"} <= skipped
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ------------------------------------------------------------------------------ runs


def test_run_writes_checkpoint_and_log(tiny_checkpoint):
    lines = [json.loads(x) for x in (tiny_checkpoint / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert set(lines[0]["loss"]) == {"2", "4"} and lines[0]["img_per_s"] > 0
    cfg = load_checkpoint(tiny_checkpoint, weights=False).config
    assert cfg["train"]["steps"] == 4 and cfg["train"]["batch_size"] == 8


def test_accumulation_matches_one_big_batch(tmp_path):
    train(tiny_train_config(tmp_path / "a", steps=2))
    train(tiny_train_config(tmp_path / "b", steps=2, accum_steps=2))
    # AdamW's first step is lr x g / (|g| + eps): an entry whose gradient is near eps (1e-8) turns
    # the summation order's rounding into a step difference of ~1e-6 (one decoder query weight here)
    assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-5)


def test_e2e_mode_has_one_decoder_at_the_last_exit(tmp_path):
    res = train(tiny_train_config(tmp_path / "e", mode="e2e", steps=2))
    ck = load_checkpoint(tmp_path / "e")
    assert ck.config["mode"] == "e2e" and ck.config["decoded_exits"] == [4]
    assert set(ck.metrics["exits"]) == {"4"} and set(res.losses) == {4}


def test_bf16_autocast_on_request(tmp_path):
    bf16 = train(tiny_train_config(tmp_path / "h", precision="bf16", steps=1))
    fp32 = train(tiny_train_config(tmp_path / "f", precision="fp32", steps=1))
    assert all(v == v and v > 0 for v in bf16.losses.values())
    for d in fp32.losses:  # the same step in bf16: close, but not the fp32 figures (autocast ran)
        assert bf16.losses[d] != fp32.losses[d]
        assert bf16.losses[d] == pytest.approx(fp32.losses[d], rel=0.05)


_CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import bim_export.train.trainer as trainer
    from conftest import tiny_train_config
    slow = trainer.lr_at
    def lr_at(step, cfg):  # slow the run down so the test can kill it between saves
        time.sleep(0.4)
        return slow(step, cfg)
    trainer.lr_at = lr_at
    trainer.train(tiny_train_config({out!r}, steps=8, save_every=1))
""")


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    train(tiny_train_config(ref, steps=8, save_every=1))
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parents[1]), out=str(out))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    step, deadline = None, time.time() + 60
    while time.time() < deadline and child.poll() is None:
        try:
            step = json.loads((out / "config.json").read_text())["step"]
        except (OSError, ValueError):
            step = None
        if step is not None and step >= 3:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    saved = load_checkpoint(out).config["step"]
    assert 3 <= saved < 8  # killed mid-run, the last save is complete
    res = train(tiny_train_config(out, steps=8, save_every=1), resume=True)
    assert res.step == 8
    assert_same_weights(ref, out)
    lines = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert lines == list(range(1, 9))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}
    real = BimModel.recon_loss

    def recon_loss(self, pred, target, mask):
        calls["n"] += 1
        loss = real(self, pred, target, mask)
        return loss * float("nan") if calls["n"] > 4 else loss  # steps 1-2 fine (2 stages each)

    monkeypatch.setattr(BimModel, "recon_loss", recon_loss)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*last good checkpoint kept: .*\(step 2\)"):
        train(tiny_train_config(out, steps=4, save_every=2))
    assert load_checkpoint(out).config["step"] == 2


def test_resume_from_another_architecture_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(tiny_checkpoint, out)
    with pytest.raises(TrainingError, match="cannot resume, the checkpoint's exits is \\[2, 4\\]"):
        train(tiny_train_config(out, exits=[1, 2, 3, 4], steps=6), resume=True)
    with pytest.raises(InputError, match="already holds a checkpoint; pass --resume"):
        train(tiny_train_config(out, steps=6))


def test_resume_is_strict_and_auto_resumes_if_present(tmp_path):
    out = tmp_path / "requeued"
    with pytest.raises(InputError, match=r"requeued: no checkpoint to resume from.*--resume auto"):
        train(tiny_train_config(out, steps=2), resume=True)  # e.g. a mistyped --out
    assert not out.exists()
    first = train(tiny_train_config(out, steps=2), resume="auto")
    assert first.resumed_from is None and first.step == 2
    assert first.summary().splitlines()[0] == f"{out}: started from scratch"
    again = train(tiny_train_config(out, steps=4), resume="auto")
    assert again.resumed_from == 2 and again.step == 4
    assert again.summary().splitlines()[0] == f"{out}: resumed from step 2"
    with pytest.raises(InputError, match="resume must be True, False or 'auto'"):
        train(tiny_train_config(out, steps=4), resume="yes")


def test_bad_data_folders(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        train(tiny_train_config(tmp_path / "o1", data=tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        train(tiny_train_config(tmp_path / "o2", data=tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="none of the 1 image files is readable"):
        train(tiny_train_config(tmp_path / "o3", data=tmp_path / "bad"))
    with pytest.raises(InputError, match="does not exist"):  # bad evaluation data fails before training
        train(tiny_train_config(tmp_path / "o4", eval_data=tmp_path / "missing"))
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4"))


def test_trains_on_tiff_images(tmp_path):
    """A folder of TIFF photos (a format Pillow reads besides JPEG/PNG) trains like any other."""
    from PIL import Image

    from bim_export.core.resources import sample_images_dir

    data = tmp_path / "tiff"
    for src in sorted(sample_images_dir().rglob("*.jpg"))[:8]:
        (data / src.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(src).save(data / src.parent.name / f"{src.stem}.tiff")
    train(tiny_train_config(tmp_path / "run", data=data, steps=1))
    assert load_checkpoint(tmp_path / "run").config["step"] == 1


def test_train_cli(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(textwrap.dedent("""
        model_args: {img_size: 32, patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}
        decoder_width: 32
        decoder_heads: 2
        steps: 2
        batch_size: 4
        num_workers: 0
        progress: false
    """))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--exits", "2,4", "--out", str(out), "--set", "lr=1e-3"]) == 0
    assert f"{out}: step 2" in capsys.readouterr().out
    assert load_checkpoint(out).config["exits"] == [2, 4]
    rc = main(["train", "--config", str(cfg), "--model", "vit_tiny_patch16_22", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --model: unknown model 'vit_tiny_patch16_22'; closest: vit_tiny_patch16_224")
    rc = main(["train", "--config", str(cfg), "--exits", "2,6", "--out", str(tmp_path / "y")])
    assert rc == 2 and "exits must lie in 1..4" in capsys.readouterr().err
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "z"), "--set", "batch_size=0"])
    assert rc == 2 and "batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_resume_starts_from_the_checkpoints_stored_settings(tmp_path, capsys, caplog):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(textwrap.dedent("""
        model_args: {img_size: 32, patch_size: 8, depth: 4, embed_dim: 32, num_heads: 2}
        exits: [2, 4]
        decoder_width: 32
        decoder_heads: 2
        steps: 2
        batch_size: 4
        lr: 1.0e-3
        num_workers: 0
        progress: false
    """))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    # no --config: the architecture, batch and schedule come from the checkpoint; --set changes steps only
    with caplog.at_level("INFO", logger="bim_export.train.trainer"):
        assert main(["train", "--out", str(out), "--resume", "--set", "steps=3"]) == 0
    assert f"{out}: resumed from step 2 with the training settings stored in {out / 'config.json'}, " \
           f"changed: steps (--set)" in caplog.text
    ck = load_checkpoint(out, weights=False)
    assert ck.config["step"] == 3 and ck.config["train"]["batch_size"] == 4 and ck.config["exits"] == [2, 4]
    stored = load_train_config(resume=True, out=out, model="vit_small_patch16_224")
    assert stored.bim.model_args["embed_dim"] == 32 and stored.bim.arch == "vit_small_patch16_224"
    assert stored.where("steps") == f"{out / 'config.json'} (train): steps"
    assert load_train_config(out=out).bim.model_args == {}  # without resume: defaults and flags only
    capsys.readouterr()
    # a bad stored value is named by its file
    raw = json.loads((out / "config.json").read_text())
    raw["train"]["steps"] = 0
    (out / "config.json").write_text(json.dumps(raw))
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert f"error: {out / 'config.json'} (train): steps: Input should be greater than or equal to 1" \
        in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_blocks_train_to_the_same_weights(tmp_path):
    """``compile`` gives "the same result within rounding" (README): within a bound set by how far
    training can move a weight at all, not by one host's kernels.

    AdamW moves each weight by about the learning rate per step whatever the gradient's scale, so two
    runs whose gradients differ, by a bug or by rounding, end up apart in units of the summed learning
    rate. Measured on the tiny run (2 steps, summed lr 2e-3; 2-core AMD EPYC with AVX-512 VNNI, torch
    2.14), largest difference of any weight: eager against eager on ATen's scalar kernels
    (ATEN_CPU_CAPABILITY=default: another, equivalent summation order) 9.7e-6; compiled (AVX-512 code)
    1.00e-5; compiled with 256-bit vectors (what an AVX2 host's inductor emits) 9.9e-6; all 0.5 % of
    the summed lr, and checkpointing alone changes nothing. Training with a 1 % higher learning rate
    moves weights 8.3e-4 apart (41 %). The bound, 2.5 % of the summed lr, is 5x the rounding drift of
    either kernel path and 16x below that 1 % change of the updates.
    """
    from bim_export.train.optim import lr_at

    # a minute on 2 cores: inductor compiles the encoder and decoder blocks (then cached on disk)
    eager = tiny_train_config(tmp_path / "eager", steps=2)
    train(eager)
    train(tiny_train_config(tmp_path / "compiled", steps=2, compile=True, grad_checkpointing=True))
    moved_at_most = sum(lr_at(step, eager) for step in range(eager.steps))
    assert_same_weights(tmp_path / "eager", tmp_path / "compiled", atol=0.025 * moved_at_most)
    assert set(_weights(tmp_path / "eager")) == set(_weights(tmp_path / "compiled"))  # names unchanged
