"""The SLURM recipe (examples/slurm/train.sbatch) is valid bash, and the command it runs on each node
parses: its torchrun arguments by torch's own parser, its bim-export arguments by the CLI's."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from bim_export.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "slurm" / "train.sbatch"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _dry_run(tmp_path: Path) -> list[str]:
    """The command the script runs on each node, inside a fake 3-node allocation."""
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"  # `scontrol show hostnames` as SLURM answers it
    scontrol.write_text("#!/bin/sh\nprintf 'gpu-a017\\ngpu-a018\\ngpu-b002\\n'\n")
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[017-018],gpu-b002",
           "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bim-train"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, check=True)
    return shlex.split(done.stdout)


def test_torchrun_and_bim_export_arguments_parse(tmp_path):
    argv = _dry_run(tmp_path)
    assert argv[0] == "torchrun"
    split = argv.index("-m")
    args = get_args_parser().parse_args([*argv[1:split], "--module", *argv[split + 1:]])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("3", "8", "c10d")
    assert args.rdzv_endpoint == "gpu-a017:29500" and args.rdzv_id == "4242"  # the first node
    assert args.max_restarts == 3 and args.module and args.training_script == "bim_export.cli"
    assert args.log_dir.endswith("bim-train-4242/torchrun") and args.tee == "3"  # logs per rank

    train = build_parser().parse_args(args.training_script_args)
    assert train.command == "train" and train.resume == "auto"  # requeued jobs continue
    assert str(train.out).startswith("/shared/") and str(train.data).startswith("/shared/")


def test_requeue_on_preemption_is_set_up():
    text = SCRIPT.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    assert "trap requeue USR1 TERM" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
