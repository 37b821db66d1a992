"""Training under torchrun itself, the way clusters launch it: two launchers on loopback, each its own
"node" (c10d rendezvous, gloo on the CPU), the CLI as the entry point.

- data parallel, stage-parallel and 2 stage groups x 2 data ranks over 2 nodes x 2 processes end with
  the single process's weights; the checkpoint is written once, by global rank 0, and any node count
  resumes it;
- ``--max-restarts`` with ``--resume auto``: a worker killed with SIGKILL, torchrun restarts the group,
  and the run ends with the weights of an uninterrupted one;
- a stage-parallel rank killed: torchrun's own output carries the one line naming it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import assert_same_weights

import bim_export
from bim_export.model.checkpoint import load_checkpoint
from bim_export.train.config import load_train_config
from bim_export.train.run_state import saved_step
from bim_export.train.trainer import train

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="finds a worker to kill by its environment in /proc (Linux)")

REPO = Path(bim_export.__file__).resolve().parents[1]
# four stages (exits 1-4) so that 4 ranks can hold one each; a constant learning rate (min_lr = lr),
# so that a run of 4 steps is the start of a run of 6; the built-in sample images
SETTINGS = dict(model="vit_tiny_patch16_224", model_args=dict(img_size=32, patch_size=8, depth=4, embed_dim=32,
                num_heads=2), exits=[1, 2, 3, 4], decoder_width=32, decoder_heads=2, batch_size=8, lr=1e-4,
                min_lr=1e-4, warmup_steps=1, num_workers=0, save_every=2, log_every=1, progress=False)


def _config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({**SETTINGS, **changes}))
    return path


def _single(config: Path, out: Path, steps: int) -> Path:
    """The reference: one process, in this one."""
    train(load_train_config(config, out=out, overrides=[f"steps={steps}"]))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, outs: list[Path], nproc: int, *args: str, restarts: int = 0, run_id: str = "bim",
            launcher: tuple[str, ...] = (), env: dict | None = None) -> list[subprocess.Popen]:
    """One torchrun per entry of ``outs`` (each its own node, writing that ``--out``), all meeting at
    one c10d rendezvous on loopback."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(outs)), "--nproc_per_node", str(nproc),
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
         "--max-restarts", str(restarts), *launcher,
         "-m", "bim_export.cli", "train", "--config", str(config), "--out", str(out), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    return results


def _run(config: Path, outs: list[Path], nproc: int, *args: str, **kw) -> list[tuple[int, str, str]]:
    results = _finish(_launch(config, outs, nproc, *args, **kw))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return results


def _worker_pids(run_id: str, rank: int) -> list[int]:
    """The processes torchrun started as global rank ``rank`` of the run ``run_id``."""
    want = {f"TORCHELASTIC_RUN_ID={run_id}".encode(), f"RANK={rank}".encode()}
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                env = set(Path(f"/proc/{d}/environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= env:
                pids.append(int(d))
    return pids


def _kill_after_first_save(procs: list[subprocess.Popen], out: Path, run_id: str, rank: int, steps: int) -> float:
    """SIGKILLs global rank ``rank`` as soon as the first checkpoint is in ``out``; returns when."""
    deadline = time.monotonic() + 240
    while not (out / "config.json").exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint was written"
        time.sleep(0.01)
    pids = _worker_pids(run_id, rank)
    assert pids, f"no worker of rank {rank}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.time()
    assert (saved_step(out) or 0) < steps  # killed before the run's end
    return killed


# ------------------------------------------------------------------------------ multi-node


@pytest.mark.slow
def test_two_nodes_data_parallel_match_one_process_and_resume_on_one_node(tmp_path):
    config = _config(tmp_path)
    single = _single(config, tmp_path / "single", 4)
    # each node its own --out, as without shared storage: only global rank 0's gets the checkpoint
    nodes = [tmp_path / "node_a", tmp_path / "node_b"]
    results = _run(config, nodes, 2, "--set", "steps=4")
    written = [n for n in nodes if n.exists()]
    assert len(written) == 1 and load_checkpoint(written[0]).config["step"] == 4
    assert len((written[0] / "log.jsonl").read_text().splitlines()) == 4  # each step logged once
    assert sum("started from scratch" in out for _, out, _ in results) == 1  # one summary: rank 0's
    assert_same_weights(single, written[0], atol=1e-6)  # 4 data ranks: the sums' order differs
    # another node count resumes it (here one process) and ends as an uninterrupted run does
    train(load_train_config(out=written[0], overrides=["steps=6"], resume=True), resume=True)
    assert_same_weights(_single(config, tmp_path / "straight", 6), written[0], atol=1e-6)
    # resuming on 2 nodes that see different --out folders is refused on every rank, before training
    results = _finish(_launch(config, nodes, 2, "--resume", "auto", "--set", "steps=8"))
    assert all(code != 0 for code, _, _ in results)
    assert "--out must be one folder every node reads (shared storage)" in "".join(err for _, _, err in results)
    assert load_checkpoint(written[0]).config["step"] == 6


@pytest.mark.slow
def test_two_nodes_stage_parallel_layouts_match_one_process(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "shared"  # one folder both nodes write to, as on shared storage
    # 4 stage groups of 1 rank over 2 nodes: the single process's operations in its order, to the bit
    _run(config, [out, out], 2, "--set", "steps=4", "--set", "stage_parallel=4")
    ck = load_checkpoint(out)
    assert ck.config["step"] == 4 and ck.config["train"]["stage_parallel"] == 4
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert_same_weights(_single(config, tmp_path / "single", 4), out)
    # resumed by 2 stage groups x 2 data ranks over 2 nodes: the end of an uninterrupted run, within
    # the data-parallel sums' rounding
    _run(config, [out, out], 2, "--resume", "auto", "--set", "steps=6", "--set", "stage_parallel=2")
    assert load_checkpoint(out).config["train"]["stage_parallel"] == 2
    assert_same_weights(_single(config, tmp_path / "straight", 6), out, atol=1e-6)


# ------------------------------------------------------------------------------ elastic restarts and faults


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_killed_worker_is_restarted_by_torchrun_and_the_run_ends_as_uninterrupted(tmp_path, nodes):
    steps = 16
    config = _config(tmp_path, steps=steps)
    out = tmp_path / "run"
    # stage-parallel, one rank per stage: the survivor names the killed one, then torchrun restarts
    # both (across nodes with torchrun's fresh store per attempt, as the documented launch sets it)
    procs = _launch(config, [out] * nodes, 2 // nodes, "--resume", "auto", "--set", "stage_parallel=2", restarts=2,
                    run_id=f"elastic{nodes}", env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if nodes > 1 else None)
    _kill_after_first_save(procs, out, f"elastic{nodes}", 1, steps)
    results = _finish(procs)
    assert all(code == 0 for code, _, _ in results), [err[-3000:] for _, _, err in results]
    err, stdout = "".join(e for _, _, e in results), "".join(o for _, o, _ in results)
    # the survivor said why before torchrun restarted the group
    assert "error: stage-parallel training stopped: rank 1 (stages 3-4 of 4: blocks 3-4) stopped" in err, err[-3000:]
    assert "resumed from step" in stdout
    assert load_checkpoint(out).config["step"] == steps
    assert_same_weights(_single(config, tmp_path / "straight", steps), out)  # one rank per stage: to the bit


@pytest.mark.slow
def test_killed_stage_rank_is_named_in_torchruns_own_report(tmp_path):
    steps = 40
    config = _config(tmp_path, steps=steps)
    out = tmp_path / "run"
    # the workers' output goes to files (--redirects): the line reaches the user through torchrun's
    # failure report, read from the survivor's error file
    procs = _launch(config, [out], 2, "--set", "stage_parallel=2", run_id="fault",
                    launcher=("--redirects", "3", "--log-dir", str(tmp_path / "logs")))
    _kill_after_first_save(procs, out, "fault", 1, steps)
    [(code, _, err)] = _finish(procs)
    assert code != 0
    line = ("error: stage-parallel training stopped: rank 1 (stages 3-4 of 4: blocks 3-4) stopped (its heartbeat "
            "stopped: the process is gone or frozen); seen by rank 0 (stages 1-2 of 4: blocks 1-2) while ")
    report = err[err.index("ChildFailedError"):]
    assert f"traceback : {line}" in report, err[-3000:]
    assert "Signal 9 (SIGKILL)" in report  # and torchrun's own account of the killed one
    step = load_checkpoint(out).config["step"]  # the checkpoint the line names is whole
    assert f"the last checkpoint {out} (step {step}) is intact" in report
