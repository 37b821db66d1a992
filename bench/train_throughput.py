"""Training throughput: the train CLI's images/s against the model's compute-only step rate, the
loader's images/s per worker, and how long a folder of a million files takes to list.

Images: ImageNet-like JPEGs (500 x 375, quality 90) cut at random from the real photos that ship in
the scikit-image and scikit-learn wheels (``tools/make_assets.py``), ten class folders; where those
wheels are not installed, from generated images (see :func:`photos`).

* compute-only: the model's training step (BIM forward and per-stage backward, AdamW step) on one
  batch already on the device; images/s from the median step after warm-up.
* loader: the training stream alone (loader workers, then the device stage: GPU decode on the gpu
  pipeline, normalization), images/s in all and per worker, for each pipeline. On a machine without
  CUDA the gpu pipeline's tensor path runs on the CPU: a check of the code, not a figure to quote.
* CLI: ``bim-export train`` in a subprocess on the JPEG folder, images/s between its log lines after
  warm-up (``elapsed_s`` in log.jsonl), for each pipeline, and its share of the compute-only rate.
* listing: ``list_image_files`` on a synthetic tree of empty files (1,000 folders), after writing it
  (so the directory entries are in the page cache: a warm listing).

Every measurement but the listing runs in a fresh process. The CPU configuration gives the model one
torch thread and the loader one worker, so neither spins against the other on a 2-core machine.

Usage::

    python bench/train_throughput.py --quick            # every part at tiny size on the CPU (< 2 min)
    python bench/train_throughput.py                    # CPU configuration (ViT-Tiny, 64 px), 1 M-file listing
    python bench/train_throughput.py --device cuda      # ViT-B/16, 224 px, batch 256, 15 workers, 3,000 JPEGs
    python bench/train_throughput.py --list-files 1000000 --skip-training   # the listing alone

Writes bench/results/train_throughput{,_cuda,_quick}{,_listing}.json and .md (figures + machine
description; ``_listing`` when run with ``--skip-training``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"
EXITS = {"vit_base_patch16_224": "3,6,9,12", "vit_tiny_patch16_224": "3,6,9,12"}

SIZES = {
    "cuda": dict(arch="vit_base_patch16_224", model_args={}, batch=256, workers=15, images=3000, steps=80,
                 warm=20, log_every=10, compute_steps=20, loader_batches=30, pipelines=["cpu", "gpu"],
                 precision="bf16", threads=None, list_files=1_000_000),
    # one core computes (one torch thread: more would spin against the loader), one loads
    "cpu": dict(arch="vit_tiny_patch16_224", model_args={"img_size": 64, "patch_size": 8}, batch=32, workers=1,
                images=300, steps=30, warm=10, log_every=5, compute_steps=10, loader_batches=10,
                pipelines=["cpu"], precision="fp32", threads=1, list_files=1_000_000),
    "quick": dict(arch="vit_tiny_patch16_224", model_args={"img_size": 32, "patch_size": 8, "depth": 4,
                                                          "embed_dim": 64, "num_heads": 2},
                  exits="2,4", batch=8, workers=1, images=40, steps=8, warm=2, log_every=2, compute_steps=3,
                  loader_batches=4, pipelines=["cpu"], precision="fp32", threads=1, list_files=20_000),
}


# ------------------------------------------------------------------------------ inputs


def photos(seed: int = 0) -> tuple[list, str]:
    """The real photos that ship in the scikit-image and scikit-learn wheels, or where those are not
    installed (a bare GPU image), generated ones: smooth random colour fields with pixel noise, so
    that a JPEG of them costs about what a photo's does to decode. Returns (name, array) pairs and
    which of the two it is."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_assets import _wheel_photos

    from bim_export.core.errors import InputError

    try:
        return list(_wheel_photos().items()), "real photos from the scikit-image and scikit-learn wheels"
    except InputError:
        rng = np.random.default_rng(seed)
        out = []
        for k in range(8):
            field = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
            arr = np.asarray(field, dtype=np.int16) + rng.normal(0, 8, (600, 800, 3)).astype(np.int16)
            out.append((f"generated{k}", arr.clip(0, 255).astype(np.uint8)))
        return out, "generated images (smooth colour fields with noise; the wheels' photos are not installed)"


def make_jpegs(dest: Path, n: int, seed: int = 0) -> Path:
    """``n`` 500 x 375 JPEGs (quality 90) cut from :func:`photos`, ten class folders; kept if there."""
    import numpy as np
    from PIL import Image

    if dest.is_dir() and sum(1 for _ in dest.rglob("*.jpg")) == n:
        return dest
    photos_, _ = photos(seed)
    photos_ = list(photos_)
    rng = np.random.default_rng(seed)
    for k in range(n):
        name, arr = photos_[k % len(photos_)]
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        s = rng.uniform(0.5, 1.0)
        cw, ch = int(min(w, h * 4 / 3) * s), int(min(w, h * 4 / 3) * s * 3 / 4)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = dest / f"class_{k % 10}"
        out.mkdir(parents=True, exist_ok=True)
        tile = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375), Image.BICUBIC)
        tile.save(out / f"{name}_{k:06d}.jpg", quality=90)
    return dest


def make_tree(dest: Path, n: int, folders: int = 1000) -> float:
    """Writes ``n`` empty .jpg files in ``folders`` folders; returns the seconds it took."""
    t0 = time.perf_counter()
    per = -(-n // folders)
    for f in range(folders):
        d = dest / f"n{f:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(f * per, min(n, (f + 1) * per)):
            open(d / f"img_{i:08d}.jpg", "wb").close()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ measurements (workers)


def _config(spec: dict, out: Path, data: Path | None = None, pipeline: str = "cpu"):
    from bim_export.train.config import TrainConfig

    exits = [int(e) for e in spec.get("exits", EXITS[spec["arch"]]).split(",")]
    return TrainConfig(out=out, data=data, model=spec["arch"], model_args=spec["model_args"], exits=exits,
                       batch_size=spec["batch"], num_workers=spec["workers"], precision=spec["precision"],
                       device=spec["device"], data_pipeline=pipeline, progress=False)


def compute_only(spec: dict) -> dict:
    """The model's step rate on one batch already on the device: the ceiling the loader should reach."""
    import torch

    from bim_export.train.model import BimModel
    from bim_export.train.optim import param_groups

    cfg = _config(spec, Path("unused"))
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = BimModel(cfg.bim).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.peak_lr, betas=cfg.betas)
    size = model.encoder.patch_embed.img_size[0]
    x = torch.randn(cfg.batch_size, 3, size, size, device=device)
    amp = torch.bfloat16 if spec["precision"] == "bf16" else None
    times = []
    for i in range(spec["compute_steps"] + 3):
        t0 = time.perf_counter()
        noise = model.mask_noise(cfg.batch_size, torch.Generator().manual_seed(i))
        losses = model.forward_backward(x, noise, 1.0, amp)
        opt.step()
        opt.zero_grad(set_to_none=True)
        [float(v) for v in losses.losses.values()]  # the trainer syncs once per step the same way
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[3:])
    out = {"img_per_s": cfg.batch_size / step, "ms_per_step": step * 1000}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def loader_rate(spec: dict) -> dict:
    """The training stream alone: workers, then the device stage; images/s after the first batches."""
    import torch

    from bim_export.train.bad_images import BadImages
    from bim_export.train.distributed import DistInfo
    from bim_export.train.images import training_images
    from bim_export.train.loader import TrainStream

    device = torch.device(spec["device"])
    size = spec["model_args"].get("img_size", 224)
    images = training_images(Path(spec["data"]), size, decode_on_device=spec["pipeline"] == "gpu", seed=0)
    n = spec["loader_batches"]
    stream = TrainStream(images, batch_size=spec["batch"], accum_steps=1, seed=0, steps=n + 3, start_step=0,
                         num_workers=spec["workers"], info=DistInfo(), device=device, mean=(0.5,) * 3,
                         std=(0.25,) * 3, bad=BadImages(spec["data"]))
    it = iter(stream)
    for _ in range(3):  # worker start-up
        next(it)
    t0 = time.perf_counter()
    for x in it:
        if device.type == "cuda":
            torch.cuda.current_stream().synchronize()
    rate = n * spec["batch"] / (time.perf_counter() - t0)
    return {"img_per_s": rate, "img_per_s_per_worker": rate / max(1, spec["workers"])}


def cli_rate(spec: dict, tmp: Path) -> dict:
    """``bim-export train`` on the JPEG folder: images/s between log lines after warm-up."""
    out = tmp / f"run-{spec['pipeline']}"
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "bim_export.cli", "train", "--data", spec["data"], "--model", spec["arch"],
            "--exits", spec.get("exits", EXITS[spec["arch"]]), "--out", str(out),
            "--set", f"model_args={json.dumps(spec['model_args'])}", "--set", f"steps={spec['steps']}",
            "--set", f"batch_size={spec['batch']}", "--set", f"num_workers={spec['workers']}",
            "--set", f"data_pipeline={spec['pipeline']}", "--set", f"precision={spec['precision']}",
            "--set", f"device={spec['device']}", "--set", f"log_every={spec['log_every']}",
            "--set", f"save_every={spec['steps']}", "--set", "save_train_state=false", "--set", "progress=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(spec))
    if proc.returncode:
        raise SystemExit(f"train CLI failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first = next(x for x in lines if x["step"] >= spec["warm"])
    last = lines[-1]
    rate = (last["step"] - first["step"]) * spec["batch"] / (last["elapsed_s"] - first["elapsed_s"])
    shutil.rmtree(out, ignore_errors=True)
    return {"img_per_s": rate, "wall_s": time.perf_counter() - t0,
            "steps_measured": f"{first['step']}-{last['step']}"}


def _env(spec: dict) -> dict:
    env = dict(os.environ)
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])  # torch's intra-op threads in the child
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _in_process(kind: str, spec: dict) -> dict:
    """Runs a measurement in a fresh interpreter (its own CUDA context and page of memory)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"kind": kind, **spec})],
                          capture_output=True, text=True, env=_env(spec))
    if proc.returncode:
        raise SystemExit(f"{kind} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_rates(size: dict, data: Path, tmp: Path, loader: bool = True) -> dict:
    """Compute-only, then per data pipeline the loader alone (with ``loader``) and the train CLI, each
    in a fresh process. Where the CLI cannot run a pipeline (gpu without CUDA), the loader's tensor
    path is measured instead, as a check of its code."""
    spec = {**size, "data": str(data)}
    out = {"compute": _in_process("compute", spec), "pipelines": {}}
    print(f"compute-only {out['compute']['img_per_s']:.1f} img/s", flush=True)
    for p in list(size["pipelines"]) + (["gpu"] if size["device"] == "cpu" else []):
        r = {}
        if loader or p not in size["pipelines"]:
            r["loader"] = _in_process("loader", {**spec, "pipeline": p})
        if p in size["pipelines"]:
            r["cli"] = cli_rate({**spec, "pipeline": p}, tmp)
        out["pipelines"][p] = r
        print(f"{p}: " + ", ".join(f"{k} {v['img_per_s']:.1f} img/s" for k, v in r.items()), flush=True)
    return out


def listing(n: int, tmp: Path) -> dict:
    from bim_export.model.images import list_image_files

    tree = tmp / "tree"
    write_s = make_tree(tree, n)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        names = list_image_files(tree)
        times.append(time.perf_counter() - t0)
    assert len(names) == n
    t0 = time.perf_counter()
    shutil.rmtree(tree)
    return {"files": n, "folders": 1000, "write_s": write_s, "list_s": min(times), "list_s_runs": times,
            "remove_s": time.perf_counter() - t0, "filesystem": filesystem(tmp)}


# ------------------------------------------------------------------------------ report


def filesystem(path: Path) -> dict:
    """The mount holding ``path``: device, type, and whether its disk is rotational (Linux)."""
    real, best = os.path.realpath(path), ("", "", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if real.startswith(mnt.rstrip("/") + "/") or real == mnt:
                    if len(mnt) >= len(best[1]):
                        best = (dev, mnt, fstype)
    except OSError:
        return {}
    info = {"device": best[0], "mount": best[1], "type": best[2]}
    block = Path("/sys/block") / os.path.basename(best[0]).rstrip("0123456789")
    try:
        info["rotational"] = (block / "queue" / "rotational").read_text().strip() == "1"
    except OSError:
        pass
    return info


def machine(device: str) -> dict:
    import torch

    from bim_export.runtime.machine import cpu_flags, cpu_model

    info = {"cpu": cpu_model(), "cores": os.cpu_count(),
            "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_1min": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(report: dict) -> str:
    m, s = report["machine"], report["size"]
    where = (f"{m['gpu']}, " if "gpu" in m else "") + f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), " \
            f"{m['cores']} cores (load {m['load_avg_1min']} at the start), torch {m['torch']}, {m['date']}"
    lines = [f"Training throughput ({report['mode']}; {where})."]
    if report.get("compute"):
        c = report["compute"]
        lines += ["", f"{s['arch']} {s['model_args'] or ''}, batch {s['batch']}, {s['precision']}, "
                  f"{s['workers']} loader worker(s), {s['images']} JPEGs of 500 x 375 px.", "",
                  f"Compute-only (model step on a batch already on the device): {c['img_per_s']:.1f} img/s "
                  f"({c['ms_per_step']:.1f} ms/step).", "",
                  "| pipeline | loader img/s | per worker | train CLI img/s | CLI / compute-only |", "|---|---|---|---|---|"]
        for p, r in report["pipelines"].items():
            cli = r.get("cli")
            ld = r.get("loader")
            lines.append(f"| {p}{' (tensor path on the CPU)' if p == 'gpu' and report['device'] == 'cpu' else ''} | "
                         + (f"{ld['img_per_s']:.1f} | {ld['img_per_s_per_worker']:.1f} | " if ld else "- | - | ")
                         + (f"{cli['img_per_s']:.1f} | {cli['img_per_s'] / c['img_per_s']:.0%} |" if cli else "- | - |"))
    ls = report.get("listing")
    if ls:
        fs = ls["filesystem"]
        disk = f"{fs.get('type', '?')} on {fs.get('device', '?')}" + (
            f", {'rotational' if fs['rotational'] else 'non-rotational'}" if "rotational" in fs else "")
        lines += ["", f"Listing {ls['files']:,} empty .jpg files in {ls['folders']:,} folders ({disk}; directory "
                  f"entries cached after writing them): {ls['list_s']:.1f} s (writing the tree took "
                  f"{ls['write_s']:.0f} s, removing it {ls['remove_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="every part at tiny size on the CPU (a dry run)")
    ap.add_argument("--images", type=Path, default=None, help="folder for the JPEGs (kept; default: temporary)")
    ap.add_argument("--tmp", type=Path, default=None, help="where the listing tree and runs go (default: $TMPDIR)")
    ap.add_argument("--list-files", type=int, default=None, help="files in the listing tree (default per mode)")
    ap.add_argument("--skip-training", action="store_true", help="the listing alone")
    ap.add_argument("--skip-listing", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps({"compute": compute_only, "loader": loader_rate}[spec["kind"]](spec)))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    mode = "quick" if args.quick else args.device
    size = dict(SIZES[mode], device="cpu" if args.quick else args.device)
    report = {"device": size["device"], "mode": mode, "size": size, "machine": machine(size["device"])}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        if not args.skip_training:
            data = make_jpegs(args.images or tmp / "jpegs", size["images"])
            report.update(training_rates(size, data, tmp))
        if not args.skip_listing:
            report["listing"] = listing(args.list_files or size["list_files"], tmp)
            print(f"listing {report['listing']['files']:,} files: {report['listing']['list_s']:.1f} s", flush=True)
    stem = "train_throughput" + {"cpu": "", "cuda": "_cuda", "quick": "_quick"}[mode]
    if args.skip_training:  # the listing alone: its own files, the training figures stay
        stem += "_listing"
    write_results(args.out, stem, report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
