"""Every GPU figure of the training benchmarks in one command, sized for about 11 minutes on an H100.

In order, most important first; each part gets a share of the time budget, and a variant that would
start after its part's share is skipped and marked so in the results (never silently dropped):

1. ViT-L/16, exits 6/12/18/24, batch 256, bf16 (3 warm-up + 10 timed steps per variant): standard MAE,
   checkpointed MAE, BIM with update: step / stage, + checkpointing, 8 stages, then with compile
   -> bench/results/train_memory_vitl_cuda.{json,md}
2. ViT-B/16, exits 3/6/9/12, the same variants (no 8 stages)
   -> bench/results/train_memory_vitb_cuda.{json,md}

Estimate from the figures measured before (ViT-B step 60-90 ms, ViT-L 110-180 ms at batch 256):
each variant is a fresh process (about 8 s to start and build on the GPU) plus 13 steps (1-3 s);
a compile variant adds one to two minutes. ViT-L: 7 x ~12 s + 2 compiles ~ 4-5 min; ViT-B:
5 x ~10 s + 2 compiles ~ 3-4 min; a GEMM rate measurement in each variant ~ 1 s. The default budget (660 s) leaves
a minute of margin within 12; a variant running past 240 s is abandoned.

Usage::

    python bench/gpu_train.py                # on the GPU machine
    python bench/gpu_train.py --dry-run      # the same sequence on CPU at tiny size, into a temp folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_memory  # noqa: E402

PARTS = [("vit_large_patch16_224", 0.55), ("vit_base_patch16_224", 0.45)]  # model, share of the budget


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=660.0, help="total seconds for all parts")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, results to a temporary folder")
    ap.add_argument("--out", type=Path, default=train_memory.RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="gpu-train-dry-")) if args.dry_run else args.out
    common = (["--device", "cpu", "--quick", "--threads", "2"] if args.dry_run
              else ["--device", "cuda", "--warmup", "3", "--steps", "10"])
    used = 0.0
    for arch, share in PARTS:
        used += share * args.budget_s
        left = used - (time.perf_counter() - t0)  # what a part leaves unused goes to the next
        rc = train_memory.main([*common, "--arch", arch, "--suite", "scale", "--compile",
                                "--no-real-images", "--budget-s", f"{max(left, 0):.0f}",
                                "--variant-timeout-s", "240", "--out", str(out)])
        if rc:
            return rc
    print(f"gpu_train: {time.perf_counter() - t0:.0f} s in all; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
