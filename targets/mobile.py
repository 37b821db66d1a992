"""Prepare and check a bim-export bundle for a phone: convert to the .ort format, then a check run.

Usage, from the bundle folder (on a workstation, or on the phone under Termux):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5]

The first run converts ``model.onnx`` to ``model.ort`` (onnxruntime's mobile format, loaded by
onnxruntime-mobile / onnxruntime-android without the ONNX parser) with
``python -m onnxruntime.tools.convert_onnx_models_to_ort``, checks that the .ort model computes
what the .onnx model computes on the bundle's reference inputs, then embeds the images with it,
through XNNPACK or NNAPI where this onnxruntime build has them, else the CPU provider.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import CPU, build_parser, choose_providers, embedding_output, make_session, run_main

HERE = Path(__file__).resolve().parent
PREFERRED = [("XnnpackExecutionProvider", {}), "NnapiExecutionProvider", CPU]


def convert_to_ort(model: Path) -> Path:
    """Writes ``<model>.ort`` next to ``model`` with onnxruntime's converter; returns its path."""
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


def check_ort(onnx_model: Path, ort_model: Path, bundle: Path, atol: float = 1e-3) -> str:
    """Runs both models on reference inputs (the bundle's reference.npz, else noise) and compares."""
    ref = bundle / "reference.npz"
    if ref.is_file():
        x = np.load(ref)["pixels"][:2].astype(np.float32)
    else:
        s = make_session(onnx_model, [CPU]).get_inputs()[0].shape[-1]
        x = np.random.default_rng(0).standard_normal((2, 3, int(s), int(s))).astype(np.float32)
    outs = []
    for m in (onnx_model, ort_model):
        sess = make_session(m, [CPU])
        outs.append(sess.run([embedding_output(sess)], {sess.get_inputs()[0].name: x})[0])
    err = float(np.abs(outs[0] - outs[1]).max())
    scale = float(np.abs(outs[0]).max()) or 1.0
    if err > atol * max(1.0, scale):
        raise SystemExit(f"error: {ort_model.name} differs from {onnx_model.name}: max abs error {err:.3g}")
    return f"check: {ort_model.name} matches {onnx_model.name} (max abs error {err:.2e})"


def main(argv=None, available=None) -> int:
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    bundle = Path(args.bundle or HERE)
    onnx_model = args.model or bundle / "model.onnx"
    ort_model = convert_to_ort(onnx_model) if onnx_model.suffix == ".onnx" else onnx_model
    if ort_model != onnx_model:
        print(check_ort(onnx_model, ort_model, bundle))
    args.model = ort_model
    return run_main(args, choose_providers(PREFERRED, available), script_dir=HERE)


if __name__ == "__main__":
    sys.exit(main())
