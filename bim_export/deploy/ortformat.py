"""The file an app loads: ``model.ort`` and ``required_operators.config``, made at export time.

onnxruntime-android and onnxruntime-objc load ONNX Runtime's own model format (``.ort``, a
flatbuffer: no protobuf parser and no graph conversion on the phone), and ORT's reduced-size builds
take the list of operators a model needs (``--include_ops_by_config required_operators.config``).
:func:`make_ort` makes both with ORT's converter (``onnxruntime.tools.convert_onnx_models_to_ort``)
and checks that the ``.ort`` model loads and computes what the ``.onnx`` one computes on the
bundle's reference inputs, within the profile's parity tolerances against PyTorch too.

Optimization style, as ORT's guidance puts it: ``Runtime`` for a profile with NNAPI or CoreML (only
the BASIC optimizations are applied in the file, so the compiling EP sees plain ONNX ops; the others
are recorded for the nodes left to the CPU EP), ``Fixed`` otherwise (every optimization baked in for
the CPU EP of an ARM device). The check loads the file without replaying the recorded optimizations
(``session.enable_saved_runtime_optimizations``): they only speed up nodes left to the CPU EP, and
with onnxruntime 1.32 replaying the record of a QDQ int8 graph fails at session creation ("Not
enough produced nodes in the runtime optimization record"), so apps should not set it either.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import ValidationError
from ..runtime.parity import ParityResult, compare_outputs
from ..runtime.session import run_onnx, session

if TYPE_CHECKING:
    from .profiles import Profile

ORT_MODEL, OPS_CONFIG = "model.ort", "required_operators.config"
# The .ort graph is the .onnx graph after ORT's optimizations: fused kernels round differently, so
# the round trip is held to float32 noise on the outputs' scale, not to bit equality.
ROUND_TRIP_RTOL = 1e-3


@dataclass
class OrtFormat:
    """What :func:`make_ort` made and how the ``.ort`` model compared.

    Attributes:
        model: file name of the ``.ort`` model in the bundle.
        config: file name of the operator list for ORT's reduced-size builds.
        style: ORT's optimization style, ``Runtime`` or ``Fixed``.
        target_platform: the converter's target (``arm``: int8 QDQ kept in signed form).
        onnxruntime: version of the converter (an app's runtime must be this version or newer).
        max_abs: largest difference of the ``.ort`` outputs from the ``.onnx`` ones, reference inputs.
        parity: the ``.ort`` outputs against PyTorch's, under the profile's tolerances.
        operators: the config's operator lines (``ai.onnx;17;Add,Conv,...``).
    """

    model: str
    config: str
    style: str
    target_platform: str
    onnxruntime: str
    max_abs: float
    parity: ParityResult
    operators: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "optimization_style": self.style,
                "target_platform": self.target_platform, "onnxruntime": self.onnxruntime,
                "max_abs_vs_onnx": self.max_abs, "parity": self.parity.to_dict(), "operators": self.operators}


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def optimization_style(profile: Profile) -> str:
    """``Runtime`` for a profile with a compiling accelerator EP (NNAPI, CoreML), else ``Fixed``."""
    from .usability import checked_eps

    return "Runtime" if checked_eps(profile) else "Fixed"


def make_ort(onnx_model: str | Path, out_dir: str | Path, reference: dict[str, np.ndarray], precision: str,
             profile: Profile) -> OrtFormat:
    """Writes ``model.ort`` and ``required_operators.config`` for ``onnx_model`` into ``out_dir``.

    Args:
        onnx_model: the bundle's ONNX model.
        out_dir: where the two files go (the bundle being written).
        reference: ``pixels`` and the PyTorch outputs for them (reference.npz's arrays).
        precision: the model's precision: an fp32 ``.ort`` must equal the ``.onnx`` up to float noise,
            another within the profile's tolerances (ORT may fuse its Q/DQ pairs in one file and
            not in the other).
        profile: the profile (its EPs choose the optimization style; its tolerances apply).

    Raises:
        ValidationError: the ``.ort`` model differs from the ``.onnx`` one beyond float noise, or
            misses the parity tolerances against PyTorch; nothing is written.
    """
    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    onnx_model, out_dir = Path(onnx_model), Path(out_dir)
    style, platform, tolerance = optimization_style(profile), "arm", profile.tolerance(precision)
    with tempfile.TemporaryDirectory(prefix="bim-ort-") as tmp:
        src, made = Path(tmp) / "in" / "model.onnx", Path(tmp) / "out"
        src.parent.mkdir()
        shutil.copyfile(onnx_model, src)
        with contextlib.redirect_stdout(io.StringIO()), _quiet("ort_format_model.utils"):  # it reports every step
            convert_onnx_models_to_ort(src, output_dir=made, optimization_styles=[OptimizationStyle[style]],
                                       target_platform=platform)
        ort_file, config = next(made.glob("*.ort")), next(made.glob("*.config"))
        check = _compare(onnx_model, ort_file, reference, tolerance, exact=precision == "fp32")
        operators = [ln.strip() for ln in config.read_text(encoding="utf-8").splitlines()
                     if ln.strip() and not ln.startswith("#")]
        shutil.copyfile(ort_file, out_dir / ORT_MODEL)
        shutil.copyfile(config, out_dir / OPS_CONFIG)
    return OrtFormat(ORT_MODEL, OPS_CONFIG, style, platform, ort.__version__, *check, operators)


def _compare(onnx_model: Path, ort_model: Path, reference: dict[str, np.ndarray], tolerance,
             exact: bool) -> tuple[float, ParityResult]:
    """(max abs difference .ort vs .onnx, parity of .ort vs PyTorch); raises when the two files
    differ (beyond float noise where ``exact``, else beyond the tolerances) or parity fails."""
    x = reference["pixels"].astype(np.float32)
    expected = run_onnx(session(onnx_model), x, 1)
    got = run_onnx(session(ort_model), x, 1)
    if set(got) != set(expected):
        raise ValidationError(f"{ORT_MODEL}: outputs {sorted(got)} differ from the .onnx model's {sorted(expected)}")
    labels = reference.get("labels")
    labels = labels if labels is not None and (labels >= 0).all() else None
    worst = max(float(np.abs(got[n] - want).max()) for n, want in expected.items())
    if exact:
        for name, want in expected.items():
            err = float(np.abs(got[name] - want).max())
            if err > ROUND_TRIP_RTOL * max(1.0, float(np.abs(want).max())):
                raise ValidationError(f"{ORT_MODEL}: output {name} differs from the .onnx model's by {err:.3g} "
                                      f"(more than float noise); no bundle written")
    else:  # int8 QDQ: the .onnx session fuses Q/DQ into int8 kernels, the .ort one may not; both are the graph
        same = compare_outputs(expected, got, tolerance, labels=labels, label=".ort vs .onnx")
        if not same.passed:
            raise ValidationError(f"{ORT_MODEL}: differs from the .onnx model ({same.brief()}); no bundle written")
    ref = {k: v for k, v in reference.items() if k in got}
    parity = compare_outputs(ref, got, tolerance, labels=labels, label=".ort vs PyTorch")
    if not parity.passed:
        raise ValidationError(f"{ORT_MODEL}: parity with PyTorch failed ({parity.brief()}); no bundle written")
    return worst, parity
