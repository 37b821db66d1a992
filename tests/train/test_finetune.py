"""Fine-tuning: it learns, its checkpoint round-trips through the backbones the deploy side builds,
the held-out split is recorded and reproducible, a killed run resumes to the same weights, and a
fine-tuned checkpoint continues from its heads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bim_export.cli import main
from bim_export.core.errors import InputError
from bim_export.model import classifier
from bim_export.model.backbone import build_backbone
from bim_export.model.checkpoint import load_checkpoint
from bim_export.model.images import load_image_array
from bim_export.train.finetune import finetune
from bim_export.train.finetune_config import FinetuneConfig, load_finetune_config
from bim_export.train.finetune_data import load_labelled
from bim_export.train.finetune_model import build_classifier
from bim_export.model.splits import stratified_indices
from bim_export.train.task import ece, task_metrics

DIGITS = (0, 1, 7)  # three well-separated digits
PER_CLASS = 40
# A short run of the tiny test model (depth 4, width 32, 32 px) with the default recipe.
FAST = dict(epochs=4, batch_size=16, lr=3e-5, hflip=0.0, num_workers=0, eval_each_epoch=False)


def write_digits(dest: Path, digits=DIGITS, per_class: int = PER_CLASS, size: int = 32) -> Path:
    """scikit-learn's 8 x 8 digits as an ImageFolder of ``size``-px PNGs (one sub-folder per digit)."""
    pytest.importorskip("sklearn")
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    count: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        label = int(label)
        if label not in digits or count.get(label, 0) >= per_class:
            continue
        count[label] = count.get(label, 0) + 1
        (dest / f"d{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC).save(
            dest / f"d{label}" / f"{i:04d}.png")
    return dest


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="module")
def joint_run(tiny_checkpoint, digits, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "joint"
    return finetune(tiny_checkpoint, digits, out, config=FinetuneConfig(**FAST))


# ------------------------------------------------------------------------------ task metrics


def test_ece_of_calibrated_and_overconfident_predictions():
    labels = np.array([0, 0, 1, 1])
    assert ece(np.array([[1.0, 0], [1, 0], [0, 1], [0, 1]]), labels) == 0.0  # sure and right
    assert ece(np.array([[1.0, 0], [1, 0], [1, 0], [1, 0]]), labels) == pytest.approx(0.5)  # sure, half wrong
    # 0.75 confident, right 3 times in 4: calibrated
    probs = np.array([[0.75, 0.25]] * 4)
    assert ece(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    m = task_metrics(np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), np.array([0, 1, 1]))
    assert m["task_top1"] == pytest.approx(2 / 3) and 0 < m["task_ece"] < 1


# ------------------------------------------------------------------------------ settings


def test_settings_from_yaml_and_set_name_their_source(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text("mode: per_exit\nepochs: 3\n")
    cfg = load_finetune_config(f, ["epochs=5", "crop_scale=[0.5, 1]"])
    assert load_finetune_config(None, ["crop_scale=null"]).crop_scale is None
    assert (cfg.mode, cfg.epochs, cfg.crop_scale) == ("per_exit", 5, (0.5, 1.0))
    f.write_text("mode: both\n")
    with pytest.raises(Exception, match=rf"{f}: mode: .*'joint' or 'per_exit'"):
        load_finetune_config(f)
    with pytest.raises(Exception, match=r"--set layer_decay: .*less than or equal to 1"):
        load_finetune_config(None, ["layer_decay=1.5"])
    with pytest.raises(Exception, match=r"--set epoch: Extra inputs"):
        load_finetune_config(None, ["epoch=3"])


# ------------------------------------------------------------------------------ learning and the checkpoint


def test_joint_fine_tuning_beats_chance_and_describes_itself(joint_run, digits):
    ck = load_checkpoint(joint_run)
    info = classifier.finetune_info(ck.config)
    assert info["mode"] == "joint" and info["labels"] == [f"d{d}" for d in DIGITS]
    assert info["preprocessing"]["img_size"] == 32 and info["settings"]["lr"] == FAST["lr"]
    assert not any(k.startswith("decoders.") for k in ck.state_dict)
    exits = ck.metrics["exits"]
    assert sorted(exits, key=int) == ["2", "4"]
    for m in exits.values():
        assert m["task_dataset"]["size"] == info["split"]["size"] and "hold-out 20%" in m["task_dataset"]["protocol"]
        assert 0 <= m["task_ece"] <= 1
    assert exits["4"]["task_top1"] >= 0.8, exits  # chance: 1/3


@pytest.mark.parametrize("mode", ["joint", "per_exit"])
def test_saved_classifier_is_the_trained_one_through_build_backbone(mode, joint_run, tiny_checkpoint, digits,
                                                                    tmp_path):
    out = joint_run if mode == "joint" else finetune(
        tiny_checkpoint, digits, tmp_path / "pe", config=FinetuneConfig(**{**FAST, "epochs": 2, "mode": mode}))
    ck = load_checkpoint(out)
    trained = build_classifier(ck, mode, ck.exits, 3, True, 0.0, 0).eval()  # the training side's model
    split = load_labelled(digits, None, 0.2, 0)
    x, y = load_image_array(split.heldout, 32, ck.config["mean"], ck.config["std"])
    with torch.no_grad():
        logits = trained(torch.from_numpy(x))
        for d, z in zip(ck.exits, logits):
            served = build_backbone(ck, d)(torch.from_numpy(x))  # what export and eval build
            assert torch.allclose(served, z, atol=1e-5), (mode, d, (served - z).abs().max())
            # and metrics.json holds the figures of these logits
            m = task_metrics(served.numpy(), y)
            assert m["task_top1"] == pytest.approx(ck.metrics["exits"][str(d)]["task_top1"])
            assert m["task_ece"] == pytest.approx(ck.metrics["exits"][str(d)]["task_ece"], abs=1e-6)
    prefix = "exit2." if mode == "per_exit" else "heads.0."
    assert any(k.startswith(prefix) for k in ck.state_dict)


def test_split_is_recorded_and_reproducible(joint_run, digits):
    split = classifier.finetune_info(load_checkpoint(joint_run).config)["split"]
    assert split["data"] == str(digits.resolve()) and split["val_data"] is None and split["seed"] == 0
    again = load_labelled(digits, None, 0.2, 0).record
    assert again["heldout_files"] == split["heldout_files"] and split["size"] == len(split["heldout_files"])
    labels = [int(p.split("/")[0][1:]) for p in sorted(str(p.relative_to(digits).as_posix())
                                                        for p in digits.rglob("*.png"))]
    files = sorted(p.relative_to(digits).as_posix() for p in digits.rglob("*.png"))
    _, val = stratified_indices([DIGITS.index(lbl) for lbl in labels], 0.2, 0)
    assert split["heldout_files"] == [files[i] for i in val]
    assert all(sum(f.startswith(f"d{d}/") for f in split["heldout_files"]) == PER_CLASS // 5 for d in DIGITS)
    assert load_labelled(digits, None, 0.2, 1).record["heldout_files"] != split["heldout_files"]


def test_eval_of_a_fine_tuned_checkpoint_reports_task_accuracy(joint_run, digits, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    assert main(["eval", str(joint_run), "--data", str(digits), "--metrics-out", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "task top-1" in out and "ECE" in out and "held out in fine-tuning" in out
    got, have = json.loads(metrics.read_text())["exits"], load_checkpoint(joint_run, weights=False).metrics["exits"]
    for d in ("2", "4"):  # the held-out images it recorded, scored again: the same figures
        assert got[d]["task_top1"] == pytest.approx(have[d]["task_top1"])


def test_continues_from_its_heads_on_the_same_labels(joint_run, digits, tmp_path):
    before = load_checkpoint(joint_run).state_dict
    still = dict(FAST, epochs=0.1, lr=1e-12, min_lr=0.0, warmup_epochs=0)
    again = load_checkpoint(finetune(joint_run, digits, tmp_path / "again", config=FinetuneConfig(**still))).state_dict
    assert torch.allclose(again["heads.1.weight"], before["heads.1.weight"], atol=1e-8)
    new = load_checkpoint(finetune(joint_run, digits, tmp_path / "new",
                                   config=FinetuneConfig(**still, head="new"))).state_dict
    assert not torch.allclose(new["heads.1.weight"], before["heads.1.weight"], atol=1e-3)
    assert torch.allclose(new["encoder.blocks.0.attn.qkv.weight"], before["encoder.blocks.0.attn.qkv.weight"], atol=1e-9)


def test_cli_finetune_writes_the_checkpoint_and_says_how_it_scored(tiny_checkpoint, digits, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", str(tiny_checkpoint), "--data", str(digits), "--out", str(out), "--set", "epochs=1",
            "--set", "num_workers=0", "--set", "mode=per_exit", "--set", "exits=[4]"]
    assert main(argv) == 0
    stdout, stderr = capsys.readouterr()
    assert f"{out}: fine-tuned (per_exit)" in stdout and "exit 4: top-1" in stdout and "exit 2" not in stdout
    assert "[1/1] epoch 1/1: loss" in stderr and "held-out top-1" in stderr
    ck = load_checkpoint(out)
    assert ck.exits == [4] and all(k.startswith("exit4.") for k in ck.state_dict)
    assert main(argv) == 2  # a second run to the same --out needs --resume
    assert "already holds a checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------ resume


_CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    import bim_export.train.finetune as ft
    from bim_export.train.finetune_config import FinetuneConfig
    mix = ft._mix
    def slow(*a):  # once per step: slow the run down so the test can kill it between saves
        time.sleep(0.3)
        return mix(*a)
    ft._mix = slow
    ft.finetune({ckpt!r}, {data!r}, {out!r}, config=FinetuneConfig(**{settings!r}))
""")


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tiny_checkpoint, digits, tmp_path):
    settings = dict(FAST, epochs=2, save_every=1, drop_path=0.1, crop_scale=(0.5, 1.0))  # drop path: its seeds must resume too
    ref, out = tmp_path / "ref", tmp_path / "killed"
    finetune(tiny_checkpoint, digits, ref, config=FinetuneConfig(**settings))
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(
        tests=str(Path(__file__).parents[1]), ckpt=str(tiny_checkpoint), data=str(digits), out=str(out),
        settings=settings)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    step, deadline = None, time.time() + 120
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
    total = load_checkpoint(ref).config["step"]
    assert 3 <= saved < total  # killed mid-run; the last save is complete
    finetune(tiny_checkpoint, digits, out, resume=True)  # the settings stored in the run
    a, b = load_checkpoint(ref), load_checkpoint(out)
    assert b.config["step"] == total and a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert a.metrics["exits"] == b.metrics["exits"]
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (ref / "log.jsonl").read_text().splitlines()]


def test_resume_auto_starts_and_a_finished_run_stays(tiny_checkpoint, digits, tmp_path):
    cfg = FinetuneConfig(**{**FAST, "epochs": 0.5})
    out = finetune(tiny_checkpoint, digits, tmp_path / "auto", config=cfg, resume="auto")
    first = (out / "weights.safetensors").read_bytes()
    finetune(tiny_checkpoint, digits, out, config=cfg, resume="auto")  # nothing left to do
    assert (out / "weights.safetensors").read_bytes() == first
    with pytest.raises(Exception, match="finetune.mode: the run in it differs"):
        finetune(tiny_checkpoint, digits, out, config=FinetuneConfig(**{**FAST, "mode": "per_exit"}), resume=True)


# ------------------------------------------------------------------------------ torchrun


def _rank_main(rank: int, world: int, port: int, ckpt: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    finetune(ckpt, data, out, config=FinetuneConfig(**dict(FAST, epochs=1)))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tiny_checkpoint, digits, tmp_path):
    import socket

    import torch.multiprocessing as mp

    single = finetune(tiny_checkpoint, digits, tmp_path / "single", config=FinetuneConfig(**dict(FAST, epochs=1)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    double = tmp_path / "double"
    mp.spawn(_rank_main, args=(2, port, str(tiny_checkpoint), str(digits), str(double)), nprocs=2, join=True)
    a, b = load_checkpoint(single), load_checkpoint(double)  # the same global batch: the same steps
    assert a.config["step"] == b.config["step"] and a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        x, y = a.state_dict[k], b.state_dict[k]
        if k.endswith("attn.qkv.bias"):  # the key bias has no gradient (softmax ignores a constant per
            d = len(x) // 3  # query), so AdamW steps on its rounding noise: compare queries and values only
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        assert torch.allclose(x, y, atol=1e-6), (k, (x - y).abs().max())


def _rank_own_out(rank: int, world: int, port: int, ckpt: str, data: str, outs: list[str], said: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        finetune(ckpt, data, outs[rank], config=FinetuneConfig(**dict(FAST, epochs=1)), resume="auto")
    except InputError as e:
        Path(said, f"rank{rank}").write_text(str(e))


@pytest.mark.slow
def test_ranks_that_see_different_checkpoints_in_out_are_refused(tiny_checkpoint, digits, tmp_path):
    """Nodes without shared storage: rank 0 finds a run to resume in its --out, rank 1 none in its
    own; every rank stops with one line naming the rank, before anything is trained or written."""
    import socket

    import torch.multiprocessing as mp

    done = finetune(tiny_checkpoint, digits, tmp_path / "node0", config=FinetuneConfig(**dict(FAST, epochs=0.5)))
    before = (done / "weights.safetensors").read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    said = tmp_path / "said"
    said.mkdir()
    outs = [str(done), str(tmp_path / "node1")]
    mp.spawn(_rank_own_out, args=(2, port, str(tiny_checkpoint), str(digits), outs, str(said)), nprocs=2, join=True)
    for rank in (0, 1):
        line = (said / f"rank{rank}").read_text()
        assert "rank 1 sees no checkpoint there but rank 0 sees the checkpoint of step" in line, line
    assert (done / "weights.safetensors").read_bytes() == before and not (tmp_path / "node1").exists()


def test_mixup_cutmix_randaugment_and_bf16_run(tiny_checkpoint, digits, tmp_path):
    """The recipe's optional parts (timm's Mixup / CutMix with soft targets, RandAugment, crops) and
    bf16 autocast train to finite losses; bf16 changes the figures (autocast ran)."""
    heavy = dict(FAST, epochs=1, mixup=0.8, cutmix=1.0, randaugment="rand-m9-mstd0.5", crop_scale=(0.35, 1.0),
                 hflip=0.5, drop_path=0.1, log_every=1)
    losses = {}
    for precision in ("fp32", "bf16"):
        out = finetune(tiny_checkpoint, digits, tmp_path / precision, config=FinetuneConfig(**heavy, precision=precision))
        lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        losses[precision] = [v for line in lines for v in line["loss"].values()]
        assert all(np.isfinite(losses[precision])) and len(lines) == load_checkpoint(out).config["step"]
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=0.1)
