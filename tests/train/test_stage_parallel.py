"""Stage-parallel BIM: the stages over groups of gloo ranks train exactly as one process does, the
checkpoint is the single process's, and a rank that dies stops the run with one line naming it."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_train_config
from test_trainer import assert_same_weights

from bim_export.core.errors import BimExportError, InputError
from bim_export.model.checkpoint import load_checkpoint
from bim_export.train.config import load_train_config
from bim_export.train.model import BimModel
from bim_export.train.stage_parallel import plan_layout, split_stages
from bim_export.train.trainer import train

STEPS, BATCH = 3, 8
THREE_STAGES = dict(model_args={"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2},
                    exits=[1, 2, 4])


def _images(n: int = 12) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


class SlowImages(torch.utils.data.Dataset):
    """The images of :func:`_images`, each taking ``delay`` seconds (a run long enough to kill)."""

    def __init__(self, delay: float):
        self.images, self.delay = _images(), delay

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.images[i]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _rank_main(rank: int, world: int, port: int, out: str, settings: dict, resume: bool) -> None:
    _join(rank, world, port)
    res = train(tiny_train_config(out, **settings), dataset=_images(), resume=resume)
    torch.save({k: v for k, v in res.model.state_dict().items() if v.numel()}, f"{out}.rank{rank}.pt")


def _spawn(world: int, out, resume: bool = False, **settings) -> None:
    mp.spawn(_rank_main, args=(world, _free_port(), str(out), settings, resume), nprocs=world, join=True)


# ------------------------------------------------------------------------------ layout


def test_split_keeps_neighbours_together_and_balances():
    assert split_stages([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert split_stages([3, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert split_stages([1, 1, 1, 1, 1, 1], 3) == [[0, 1], [2, 3], [4, 5]]
    assert split_stages([5, 1], 2) == [[0], [1]]


def test_layout_ranks_and_names():
    model = BimModel(tiny_train_config("x", **THREE_STAGES).bim)
    lay = plan_layout(model, 2, 4, 3, "--set stage_parallel")
    assert lay.data == 2 and lay.group == 1 and lay.data_rank == 1
    assert sorted(s for g in lay.groups for s in g) == [0, 1, 2]
    assert lay.peer(0) == 1 and lay.peer(2) is None
    assert lay.describe(3) == "rank 3 (stage 3 of 3: blocks 3-4)"
    with pytest.raises(InputError, match="3 stage groups do not divide the 4 processes"):
        plan_layout(model, 3, 4, 0, "--set stage_parallel")
    with pytest.raises(InputError, match="4 stage groups for 3 stages"):
        plan_layout(model, 4, 4, 0, "--set stage_parallel")


def test_settings_it_cannot_run_are_refused(tmp_path):
    with pytest.raises(InputError, match="--set stage_parallel: stage_parallel 2 needs mode bim"):
        load_train_config(overrides=["stage_parallel=2", "mode=e2e"], out=tmp_path / "o")
    with pytest.raises(InputError, match="global gradient norm.*grad_clip_mode: stage"):
        load_train_config(overrides=["stage_parallel=2", "grad_clip=1.0"], out=tmp_path / "o")
    load_train_config(overrides=["stage_parallel=2", "grad_clip=1.0", "grad_clip_mode=stage"], out=tmp_path / "o")


def test_cli_refusal_is_one_error_line(tmp_path, capsys):
    from bim_export.cli import main

    out = tmp_path / "o"
    assert main(["train", "--out", str(out), "--set", "stage_parallel=2", "--set", "mode=e2e"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set stage_parallel: stage_parallel 2 needs mode bim") and "\n" not in err
    assert not out.exists()


def test_one_process_cannot_hold_two_groups(tmp_path):
    with pytest.raises(InputError, match="2 stage groups do not divide the 1 processes"):
        train(tiny_train_config(tmp_path / "o", stage_parallel=2), dataset=_images())
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ same results


@pytest.mark.slow
def test_two_stage_ranks_match_one_process(tmp_path):
    # a constant learning rate (min_lr = lr), so that a run of more steps starts as this one does
    settings = dict(steps=STEPS, batch_size=BATCH, save_every=2, accum_steps=2, min_lr=1e-3)
    single = tmp_path / "single"
    train(tiny_train_config(single, **settings), dataset=_images())
    sp = tmp_path / "sp"
    _spawn(2, sp, stage_parallel=2, **settings)

    r0, r1 = (torch.load(f"{sp}.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(k.startswith("decoders.1") for k in r1) and not any(k.startswith("encoder.patch_embed") for k in r1)
    ck = load_checkpoint(sp)
    assert ck.config["step"] == STEPS and ck.config["train"]["stage_parallel"] == 2
    assert ck.state_dict.keys() == load_checkpoint(single).state_dict.keys()
    assert all(torch.equal(ck.state_dict[k], r0[k]) for k in r0)  # rank 0 returns the whole model
    assert all(torch.equal(ck.state_dict[k], r1[k]) for k in r1)  # rank 1's stage, gathered to rank 0
    # one rank per stage: the same operations in the same order as one process, to the bit
    assert_same_weights(single, sp)
    # the log has every exit's loss at every logged step, as one process writes it
    a, b = ((single / "log.jsonl").read_text().splitlines(), (sp / "log.jsonl").read_text().splitlines())
    la, lb = ([json.loads(x)["loss"] for x in lines] for lines in (a, b))
    assert len(la) == len(lb) == STEPS and all(x.keys() == y.keys() for x, y in zip(la, lb))
    assert all(abs(x[k] - y[k]) < 1e-5 for x, y in zip(la, lb) for k in x)
    # the optimizer state of both stages is in train_state.pt: resuming in one process goes on exactly,
    # and so does resuming that one's checkpoint on 2 stage ranks again
    overrides = [f"steps={STEPS + 2}", "stage_parallel=1"]
    train(load_train_config(overrides=overrides, out=sp, resume=True), resume=True, dataset=_images())
    assert load_checkpoint(sp).config["train"]["stage_parallel"] == 1
    _spawn(2, sp, resume=True, **dict(settings, steps=STEPS + 4, stage_parallel=2))
    straight = tmp_path / "straight"
    train(tiny_train_config(straight, **dict(settings, steps=STEPS + 4)), dataset=_images())
    assert load_checkpoint(sp).config["step"] == STEPS + 4
    assert_same_weights(straight, sp)


@pytest.mark.slow
def test_two_by_two_ranks_match_one_process(tmp_path):
    # lr 1e-4: the data-parallel halves of the batch sum in another order than one process does,
    # and AdamW turns that rounding into steps of up to about 1e-3 x lr (as in plain data parallel)
    settings = dict(steps=STEPS, batch_size=BATCH, save_every=STEPS, update="stage", lr=1e-4, **THREE_STAGES)
    single = tmp_path / "single"
    train(tiny_train_config(single, **settings), dataset=_images())
    sp = tmp_path / "sp"
    _spawn(4, sp, stage_parallel=2, **settings)
    r0, r1 = (torch.load(f"{sp}.rank{r}.pt", weights_only=True) for r in (2, 3))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # data ranks agree
    assert_same_weights(single, sp, atol=1e-6)
    # sanity: another global batch (seed) is far outside that tolerance
    other = tmp_path / "other"
    train(tiny_train_config(other, **dict(settings, seed=1)), dataset=_images())
    with pytest.raises(AssertionError):
        assert_same_weights(single, other, atol=1e-6)


# ------------------------------------------------------------------------------ faults


def _fault_rank(rank: int, world: int, port: int, out: str, settings: dict, delay: float, note: str) -> None:
    _join(rank, world, port)
    try:
        train(tiny_train_config(out, **settings), dataset=SlowImages(delay))
    except BimExportError as e:  # what the CLI prints after "error: "
        with open(note, "w") as f:
            f.write(str(e))
        raise SystemExit(e.exit_code) from None
    except BaseException:
        with open(note, "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.slow
def test_killed_rank_stops_the_run_with_one_line_and_resume_completes(tmp_path):
    steps, timeout = 8, 30.0
    settings = dict(steps=steps, batch_size=BATCH, save_every=2, stage_parallel=2, comm_timeout=timeout)
    out, port = tmp_path / "sp", _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fault_rank, args=(r, 2, port, str(out), settings, 0.04, f"{out}.note{r}"))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():  # the first checkpoint (step 2) is written
            assert time.monotonic() < deadline and procs[0].is_alive(), "no checkpoint was written"
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        procs[0].join(timeout=timeout + 60)
        took = time.monotonic() - killed
        note = open(f"{out}.note0").read() if os.path.exists(f"{out}.note0") else "(no line)"
        assert procs[0].exitcode == 2, (procs[0].exitcode, took, note)  # not a hang, not a traceback
        # within the timeout, plus the heartbeat lookup and the exit (slack for a loaded 2-core host)
        assert took < timeout + 20, (took, note)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    line = open(f"{out}.note0").read()
    assert "\n" not in line
    assert line.startswith("stage-parallel training stopped: rank 1 (stage 2 of 2: blocks 3-4) stopped (its "
                           "heartbeat stopped: the process is gone or frozen); seen by rank 0 (stage 1 of 2: "
                           "blocks 1-2) while "), line
    saved = load_checkpoint(out)  # the last checkpoint is whole, and the line names it
    assert 2 <= saved.config["step"] < steps
    assert f"the last checkpoint {out} (step {saved.config['step']}) is intact" in line

    # --resume (here in one process) completes, equal to an uninterrupted run
    train(load_train_config(overrides=["stage_parallel=1"], out=out, resume=True), resume=True, dataset=_images())
    straight = tmp_path / "straight"
    train(tiny_train_config(straight, **dict(settings, stage_parallel=1)), dataset=_images())
    assert_same_weights(straight, out)


@pytest.mark.slow
def test_sigterm_with_no_rank_gone_ends_the_ranks_as_sigterm_does(tmp_path):
    # scancel or Ctrl-C of the launcher: every rank gets SIGTERM, no rank failed; no fault line may
    # name a rank that was only stopped, and each process ends as SIGTERM ends it
    settings = dict(steps=40, batch_size=BATCH, save_every=2, stage_parallel=2, comm_timeout=30.0)
    out, port = tmp_path / "sp", _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fault_rank, args=(r, 2, port, str(out), settings, 0.04, f"{out}.note{r}"))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "no checkpoint was written"
            time.sleep(0.02)
        for p in procs:
            os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    notes = [open(f"{out}.note{r}").read() for r in range(2) if os.path.exists(f"{out}.note{r}")]
    assert [p.exitcode for p in procs] == [-signal.SIGTERM, -signal.SIGTERM], notes
    assert load_checkpoint(out).config["step"] < 40
