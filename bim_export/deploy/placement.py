"""Where a candidate runs on a phone, and its latency predicted there.

A phone profile names an accelerator EP (NNAPI, CoreML) before the CPU. ORT's usability checker
(:mod:`bim_export.deploy.usability`) tells whether that EP takes a candidate's graph: >= 99 % of its
nodes in at most 2 partitions. A graph it takes is predicted on the figures of the accelerator's
device (the profile's ``accelerators``); any other graph, or one whose accelerator has no figures,
on the CPU cores' (``hardware``), since that is where ONNX Runtime runs it. The result's note says
which, and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .profiles import Profile


def predict_on_device(model: Path, usability: dict, profile: Profile):
    """The predicted latency of ``model`` where it runs on ``profile``'s device.

    Args:
        model: the candidate's ONNX file.
        usability: ``{ep: EpCoverage}`` of ORT's checker for it (empty: not a phone profile).
        profile: the profile.

    Returns:
        The LatencyResult; ``settings["runs_on"]`` names the EP whose device it was predicted on
        (``CPUExecutionProvider`` for the CPU cores) and ``note`` why.
    """
    from .latency.predict import model_precision, predict_latency, uncalibrated_error
    from .latency.roofline import Hardware, default_factors
    from .usability import runs_on

    ep = runs_on(usability)
    figures = profile.accelerators.get(ep) if ep else None
    short = {e: c.checker.split()[0] for e, c in usability.items()}
    if figures is None:
        result = predict_latency(model, profile, profile.batch)
        where = "CPUExecutionProvider"
        if ep:
            why = f"CPU figures: {short[ep]} takes it, none for its device"
        else:
            why = ("on CPU: " + ", ".join(f"{short[e]} takes {c.coverage:.0%} in {c.partitions}"
                                          for e, c in usability.items())) if usability else ""
    else:
        hw = Hardware(peak_gflops={k: v for k, v in figures.peak_gflops.model_dump().items() if v},
                      mem_bandwidth_gbs=figures.mem_bandwidth_gbs, launch_overhead_us=figures.launch_overhead_us)
        factors = default_factors(profile.device_class, hw)
        factors.node_overhead_us = figures.launch_overhead_us  # inside one compiled program, not ORT's dispatch
        result = predict_latency(model, profile, profile.batch, factors=factors, hardware=hw)
        # no calibration file exists for an accelerator, and none was timed: the device class's
        # measured uncalibrated error stands in, and its basis says so
        expected = uncalibrated_error(profile.device_class, model_precision(model))
        result.expected_error = expected.error
        result.error_basis = f"{expected.basis}; no {short[ep]} accelerator was timed, that figure stands in"
        where, why = ep, f"on {short[ep]}"
    result.settings["runs_on"] = where
    result.note = ", ".join(filter(None, [result.note, why]))
    return result
