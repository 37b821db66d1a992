"""What every bim-export inference script shares: manifest, images, timing, top-k (labels of a
classifier, or nearest gallery images).

Ships inside each bundle next to ``infer.py`` and needs only onnxruntime, numpy and Pillow: a
device never installs bim-export, torch or the checkpoint. Preprocessing and the execution
providers' fallback come from the bundle's ``runtime/`` package (``bim_export/runtime`` in the
package), the very code the export's parity check runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _find_runtime() -> None:
    """Makes ``runtime`` importable. A bundle ships it beside this file (its folder is on the path
    when a script runs); from ``targets/`` in the repository or an installed package it is the
    package's ``bim_export/runtime``, loaded under the same name."""
    here = Path(__file__).resolve().parent
    if (here / "runtime").is_dir() or "runtime" in sys.modules:
        return
    for folder in (here.parent / "runtime", here.parent / "bim_export" / "runtime"):
        if (folder / "__init__.py").is_file():
            spec = importlib.util.spec_from_file_location("runtime", folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
            module = importlib.util.module_from_spec(spec)
            sys.modules["runtime"] = module
            spec.loader.exec_module(module)
            return


_find_runtime()

from runtime.labels import softmax, top_labels  # noqa: E402
from runtime.preprocess import UNREADABLE_IMAGE, image_extensions, preprocess  # noqa: E402
from runtime.session import (CPU, choose_providers, fallback_warning, fixed_batch, make_session,  # noqa: E402
                             provider_name)

__all__ = ["CPU", "UNREADABLE_IMAGE", "choose_providers", "fallback_warning", "fixed_batch", "image_extensions",
           "make_session", "preprocess", "provider_name", "softmax", "top_labels"]

# ------------------------------------------------------------------------------ bundle and images


def load_manifest(bundle: str | Path) -> dict:
    """Reads ``manifest.json`` of a bundle folder."""
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no manifest.json (is {bundle} a bim-export bundle?)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) under the folders named: files of
    every still-image format Pillow reads (:func:`image_extensions`)."""
    found: list[Path] = []
    extensions = image_extensions()
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        elif item.is_file():
            found.append(item)
        else:
            raise SystemExit(f"error: {item}: no such image file or folder")
    if not found:
        raise SystemExit(f"error: no images found in {', '.join(map(str, inputs))}")
    return found


def load_images(paths: Sequence[Path], manifest: dict) -> tuple[list[Path], np.ndarray]:
    """Preprocesses image files as the manifest says.

    Files that cannot be decoded (truncated, corrupt, over Pillow's pixel limit) are skipped and
    named on stderr, as bim-export does with its image folders.

    Returns:
        the paths read, and their pixels: float32 [N, 3, S, S].
    """
    pre = manifest["preprocessing"]
    kept, arrays, skipped = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(preprocess(im.convert("RGB"), pre["img_size"], pre["mean"], pre["std"]))
            kept.append(p)
        except Image.DecompressionBombError:
            skipped.append(f"{p} (decompression bomb: over Pillow's pixel limit)")
        except UNREADABLE_IMAGE as e:
            skipped.append(f"{p} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not kept:
        raise SystemExit(f"error: none of the {len(paths)} images is readable (first: {skipped[0]})")
    if skipped:
        print(f"warning: {len(skipped)} of {len(paths)} images unreadable and skipped: {'; '.join(skipped)}",
              file=sys.stderr)
    return kept, np.stack(arrays)


# ------------------------------------------------------------------------------------- sessions


def embedding_output(session, exit_depth: int | None = None, kind: str = "embedding") -> str:
    """Name of the pooled-embedding output (``embedding``; ``embedding_<d>`` in a multi-exit graph,
    the deepest unless ``exit_depth``); with ``kind="logits"``, of a classifier's logits."""
    names = [o.name for o in session.get_outputs()]
    found = [n for n in names if n == kind or n.startswith(f"{kind}_")]
    if exit_depth is not None:
        wanted = f"{kind}_{exit_depth}"
        if wanted not in names:
            raise SystemExit(f"error: the model has no exit {exit_depth} (outputs: {', '.join(names)})")
        return wanted
    if kind in names:
        return kind
    if not found:
        raise SystemExit(f"error: the model has no {kind} output (outputs: {', '.join(names)})")
    return max(found, key=lambda n: int(n.rsplit("_", 1)[-1]) if n.rsplit("_", 1)[-1].isdigit() else -1)


def has_output(session, kind: str) -> bool:
    """Whether the model has an output ``kind`` (or ``kind_<d>``), e.g. a classifier's ``logits``."""
    return any(o.name == kind or o.name.startswith(f"{kind}_") for o in session.get_outputs())


class Runner:
    """Runs a session batch by batch and times each ``run`` call.

    Args:
        session: the onnxruntime session.
        output: the output to fetch.
        run: optional replacement for ``session.run`` (IO binding), taking [B,3,H,W] and returning [B,D].
    """

    def __init__(self, session, output: str, run: Callable[[np.ndarray], np.ndarray] | None = None):
        self.session = session
        self.input = session.get_inputs()[0].name
        self.output = output
        self._run = run or (lambda x: session.run([output], {self.input: x})[0])
        self.times_ms: list[float] = []

    def __call__(self, x: np.ndarray, batch: int) -> np.ndarray:
        fixed = fixed_batch(self.session)
        batch = fixed or batch
        out = []
        for i in range(0, len(x), batch):
            xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
            short = batch - len(xb) if fixed else 0
            if short:  # a model with a fixed batch takes only that many images: fill up, drop the extra
                xb = np.concatenate([xb, np.repeat(xb[-1:], short, axis=0)])
            t0 = time.perf_counter()
            y = np.asarray(self._run(xb), dtype=np.float32)
            self.times_ms.append((time.perf_counter() - t0) * 1e3)
            out.append(y[:len(y) - short])
        return np.concatenate(out)


# ------------------------------------------------------------------------------------ .ort models


def convert_to_ort(model: Path) -> Path:
    """Writes ``<model>.ort`` next to ``model`` with onnxruntime's converter (bundles made before
    bim-export shipped model.ort); returns its path."""
    import shutil
    import subprocess
    import tempfile

    target = model.with_suffix(".ort")
    if target.is_file() and target.stat().st_mtime >= model.stat().st_mtime:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / model.name
        shutil.copy2(model, src)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
               "--output_dir", tmp, "--optimization_style", "Fixed"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        produced = Path(tmp) / target.name
        if done.returncode != 0 or not produced.is_file():
            raise SystemExit(f"error: .ort conversion failed:\n{done.stdout}\n{done.stderr}")
        shutil.copy2(produced, target)
    return target


def check_ort(onnx_model: Path, ort_model: Path, bundle: Path, manifest: dict) -> str:
    """Runs both models on the bundle's reference inputs and compares their embeddings: the worst
    image's cosine must meet the manifest's parity tolerance (int8 graphs may run fused int8 kernels
    in one file and not in the other, so they are not held to float noise)."""
    ref = bundle / "reference.npz"
    if ref.is_file():
        x = np.load(ref)["pixels"][:4].astype(np.float32)
    else:
        s = make_session(onnx_model, [CPU]).get_inputs()[0].shape[-1]
        x = np.random.default_rng(0).standard_normal((2, 3, int(s), int(s))).astype(np.float32)
    outs = []
    for m in (onnx_model, ort_model):
        sess = make_session(m, [CPU])
        outs.append(Runner(sess, embedding_output(sess))(x, len(x)))
    a, b = outs
    cos = float(np.min(np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))
    err = float(np.abs(a - b).max())
    wanted = float((manifest.get("tolerances") or {}).get("cosine", 0.9999))
    if cos < wanted:
        raise SystemExit(f"error: {ort_model.name} differs from {onnx_model.name}: worst cosine {cos:.6f} < {wanted} "
                         f"(max abs error {err:.3g})")
    return f"check: {ort_model.name} matches {onnx_model.name} (worst cosine {cos:.6f}, max abs error {err:.2e})"


def phone_model(args: argparse.Namespace, bundle: Path, manifest: dict) -> tuple[Path, str]:
    """The model a phone app loads: ``--model`` if given, else the bundle's ``model.ort`` (made
    from model.onnx here when the bundle has none), checked against ``model.onnx``."""
    onnx_model = Path(bundle) / manifest.get("model", "model.onnx")
    if args.model is not None and args.model.suffix != ".onnx":
        return args.model, ""
    onnx_model = args.model or onnx_model
    shipped = onnx_model.with_suffix(".ort")
    ort_model = shipped if shipped.is_file() else convert_to_ort(onnx_model)
    return ort_model, check_ort(onnx_model, ort_model, Path(bundle), manifest)


def timing_line(times_ms: Sequence[float], batch: int, providers: Sequence[str]) -> str:
    t = np.asarray(times_ms)
    return (f"timing: {len(t)} runs of batch <= {batch} on {', '.join(providers)}: "
            f"p50 {np.percentile(t, 50):.2f} ms, p90 {np.percentile(t, 90):.2f} ms, mean {t.mean():.2f} ms")


# ------------------------------------------------------------------------------------- results


def cosine_topk(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows by cosine similarity. Returns (indices [Q,k], similarities [Q,k])."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    sim = q @ g.T
    k = min(k, g.shape[0])
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1)


def label_report(paths: Sequence[Path], logits: np.ndarray, labels: Sequence[str], k: int = 5) -> str:
    """The top-k labels of each image with their probabilities (softmax of the logits), most likely first."""
    return "\n".join(f"{p}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in row)
                     for p, row in zip(paths, top_labels(logits, labels, k)))


def report(paths: Sequence[Path], emb: np.ndarray, gallery_paths=None, gallery=None, k: int = 5,
           show: int = 6) -> str:
    """Embeddings (first ``show`` values) per image, or the top-k gallery neighbours per image."""
    lines = []
    if gallery is not None:
        idx, sim = cosine_topk(emb, gallery, k)
        for p, row, srow in zip(paths, idx, sim):
            hits = ", ".join(f"{gallery_paths[j].name} ({s:.3f})" for j, s in zip(row, srow))
            lines.append(f"{p}: {hits}")
    else:
        for p, e in zip(paths, emb):
            head = " ".join(f"{v:+.4f}" for v in e[:show])
            lines.append(f"{p}: [{head}{' ...' if len(e) > show else ''}] (dim {len(e)}, norm {np.linalg.norm(e):.3f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog=(
        "A classifier's bundle (manifest.json lists its labels) prints each image's top-k labels with their "
        "probabilities; any other prints the embeddings, or with --gallery the nearest gallery images."))
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="bundle folder holding model.onnx and manifest.json (default: this script's folder)")
    p.add_argument("--model", type=Path, default=None, help="model file (default: the bundle's model.onnx)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the profile's)")
    p.add_argument("--gallery", type=Path, default=None, help="folder of images: print the top-k nearest instead")
    p.add_argument("--top-k", type=int, default=5,
                   help="labels per image of a classifier (at most its classes), or gallery neighbours (default 5)")
    p.add_argument("--embeddings", action="store_true",
                   help="of a classifier: print the embeddings instead of its labels")
    p.add_argument("--exit", dest="exit_depth", type=int, default=None, help="exit depth of a multi-exit model")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--save", type=Path, default=None,
                   help="also write the outputs to this .npy file (a classifier's logits, else the embeddings)")
    p.add_argument("--early-exit", action="store_true",
                   help="run the bundle's stage segments in turn, each image stopping at its first confident exit; "
                        "prints the exit taken and the label per image (bundles exported with --early-exit)")
    return p


def run_main(args: argparse.Namespace, providers: Sequence, *, runner_factory=None, script_dir: Path,
             requested: Sequence | None = None, session_factory=None) -> int:
    """Loads the bundle, runs the images (and gallery) and prints a classifier's top-k labels with their
    probabilities (when the manifest has ``labels``), else the embeddings or the top-k gallery
    neighbours, then timing.

    Args:
        args: parsed :func:`build_parser` arguments.
        providers: execution providers to try, best first (already filtered by availability).
        runner_factory: optional ``(session, output_name) -> Runner`` (IO binding); default plain run.
        script_dir: the folder of the calling script (the bundle, when run from one).
        requested: the providers the device should run on, best first (default: ``providers``); one
            the session runs without is named on stderr (:func:`fallback_warning`).
        session_factory: optional ``(model, providers, threads) -> session`` (a TensorRT engine behind
            the session's calls); default an onnxruntime session.
    """
    bundle = args.bundle or script_dir
    manifest = load_manifest(bundle)
    if getattr(args, "early_exit", False):
        return early_exit_main(args, bundle, manifest, providers)
    model = args.model or Path(bundle) / "model.onnx"
    batch = args.batch or int(manifest.get("batch", 1))
    session = (session_factory or make_session)(model, providers, args.threads)
    used = session.get_providers()
    warning = fallback_warning(requested if requested is not None else providers, used)
    if warning:
        print(warning, file=sys.stderr)
    labels = manifest.get("labels")
    classify = bool(labels) and args.gallery is None and not args.embeddings and has_output(session, "logits")
    output = embedding_output(session, args.exit_depth, "logits" if classify else "embedding")
    runner = (runner_factory or Runner)(session, output)
    paths, x = load_images(collect_images(args.images), manifest)
    runner(x[:batch], batch)  # warm-up: engine builds and allocations happen here, not in the timing
    runner.times_ms.clear()
    emb = runner(x, batch)
    gallery_paths = gallery = None
    if args.gallery is not None:
        gallery_paths, gallery_x = load_images(collect_images([args.gallery]), manifest)
        gallery = runner(gallery_x, batch)
    print(label_report(paths, emb, labels, args.top_k) if classify
          else report(paths, emb, gallery_paths, gallery, args.top_k))
    pooled = f", {manifest['pooling']} pooling" if manifest.get("pooling") else ""
    classes = f", classifier of {len(labels)} labels" if classify else ""
    print(f"model: {model} ({manifest.get('precision', '?')}, depth {manifest.get('depth', '?')}{pooled}{classes})")
    print(timing_line(runner.times_ms, batch, used))
    if args.save is not None:
        np.save(args.save, emb)
    return 0


def early_exit_main(args: argparse.Namespace, bundle: Path, manifest: dict, providers: Sequence) -> int:
    """``infer.py --early-exit``: the segments in turn; per image the exit taken, the label and its
    probability; then how many images left at each exit, and timing."""
    from runtime.early_exit import Cascade
    from runtime.errors import InputError

    try:
        cascade = Cascade.from_manifest(bundle, manifest, providers, args.threads)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    labels = manifest["early_exit"].get("labels") or []
    batch = args.batch or int(manifest.get("batch", 1))
    paths, x = load_images(collect_images(args.images), manifest)
    cascade(x[:batch], batch)  # warm-up
    result = cascade(x, batch)
    for p, d, i, c in zip(paths, result.exit_depth, result.logits.argmax(-1), result.confidence):
        name = labels[i] if i < len(labels) else str(i)
        print(f"{p}: exit {d}, {name} ({c:.3f})")
    shares = ", ".join(f"{d}: {int((result.exit_depth == d).sum())}" for d in cascade.exits)
    print(f"exits taken (depth: images): {shares}")
    print(f"timing: {len(x)} images in {result.ms:.1f} ms ({result.ms / len(x):.2f} ms per image) at batch <= {batch} "
          f"on {', '.join(cascade.providers)}")
    return 0


def script_main(description: str, preferred: Sequence, argv=None, script_file: str = __file__, **kw) -> int:
    """Entry point of the simple scripts: parse, pick providers, run."""
    args = build_parser(description).parse_args(argv)
    return run_main(args, choose_providers(preferred), script_dir=Path(script_file).resolve().parent, **kw)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("common.py is a library for the bundle's infer.py; run infer.py")
