"""Two gloo processes train exactly as one process with the same global batch: stages stepped as
their all-reduce (started when their backward ends) completes equal one step after the backward."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_train_config
from test_trainer import assert_same_weights

from bim_export.model.checkpoint import load_checkpoint
from bim_export.train.trainer import train

STEPS, BATCH = 3, 8


def _images() -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    res = train(tiny_train_config(out, steps=STEPS, batch_size=BATCH, save_every=STEPS, update="stage", accum_steps=2),
                dataset=_images())
    torch.save(res.model.state_dict(), f"{out}.rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    single = tmp_path / "single"
    train(tiny_train_config(single, steps=STEPS, batch_size=BATCH, save_every=STEPS, update="step"), dataset=_images())
    double = tmp_path / "double"
    mp.spawn(_rank_main, args=(2, _free_port(), str(double)), nprocs=2, join=True)

    r0 = torch.load(f"{double}.rank0.pt", weights_only=True)
    r1 = torch.load(f"{double}.rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # ranks never drift apart
    ck = load_checkpoint(double)  # written by rank 0 only, with rank 0's weights
    assert ck.config["step"] == STEPS
    assert all(torch.equal(ck.state_dict[k], r0[k]) for k in r0)
    assert_same_weights(single, double, atol=1e-6)  # same global batch and masks as one process
    # sanity: a different global batch would not pass the comparison above
    other = tmp_path / "other"
    train(tiny_train_config(other, steps=STEPS, batch_size=BATCH, save_every=STEPS, seed=1), dataset=_images())
    with pytest.raises(AssertionError):
        assert_same_weights(single, other, atol=1e-6)
