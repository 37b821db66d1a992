"""Sanity of the predictions for every shipped profile: what the hardware implies, at each precision.

The bugs users notice first: a precision with the higher peak predicted slower than one with a lower
peak where compute decides, and a deeper backbone predicted faster than a shallower one.
"""

from __future__ import annotations

import numpy as np
import pytest

from bim_export.deploy.latency.predict import predict_latency, uncalibrated_error
from bim_export.deploy.profiles import list_profiles, load_profile

# Wide enough (ViT-Ti's width) that GEMMs, not elementwise traffic, decide at a large batch.
SPEC = {"embed_dim": 192, "num_heads": 3, "img_size": 64, "patch_size": 8}
DEPTHS = (1, 2, 4)
# A batch at which launches do not dominate on any shipped profile (checked in the test).
COMPUTE_BOUND_BATCH = 1024


def _predicted_profiles():
    names = list_profiles()
    measured = {n for n in names if load_profile(n).measured}
    assert measured == {"host"}  # measured on the machine itself: nothing predicted to check
    return [load_profile(n) for n in names if n not in measured]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{(precision, int8 preset or None, depth): ONNX path} for every precision and preset the shipped
    profiles use, converted the way candidates are (calibrated int8 with the profile's preset)."""
    import timm
    import torch

    from bim_export.deploy.quantize import convert_precision

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("profile-models")
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    paths = {}
    for depth in DEPTHS:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=depth, **SPEC).eval()
        fp32 = out / f"d{depth}-fp32.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), fp32, input_names=["pixels"],
                          output_names=["embedding"], dynamic_axes={"pixels": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        paths[("fp32", None, depth)] = fp32
        for profile in _predicted_profiles():
            for precision in set(profile.precisions) - {"fp32"}:
                preset = profile.int8_preset if precision == "int8" else None
                if (precision, preset, depth) not in paths:
                    path = out / f"d{depth}-{precision}-{preset}.onnx"
                    convert_precision(fp32, path, precision, calib_x=x, preset=preset)
                    paths[(precision, preset, depth)] = path
    return paths


def _model(models, profile, precision, depth):
    return models[(precision, profile.int8_preset if precision == "int8" else None, depth)]


@pytest.fixture(autouse=True)
def no_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("BIM_EXPORT_CALIBRATION_DIR", str(tmp_path / "calibration"))


@pytest.mark.slow
def test_higher_peak_precision_is_not_slower_where_compute_decides(models):
    """int8 <= fp16 <= fp32 on the TensorRT profiles, int8 <= fp32 on the CPU ones: each profile's
    precisions ordered by its data-sheet peak."""
    for profile in _predicted_profiles():
        peaks = profile.hardware.peak_gflops
        order = sorted(profile.precisions, key=lambda p: -getattr(peaks, p))
        depth = DEPTHS[-1]
        fp32_one = predict_latency(_model(models, profile, "fp32", depth), profile, 1).p50
        ms = {p: predict_latency(_model(models, profile, p, depth), profile, COMPUTE_BOUND_BATCH).p50 for p in order}
        assert ms["fp32"] > 3 * fp32_one, (profile.name, "launch-bound: not a compute case")
        for faster, slower in zip(order, order[1:]):
            assert ms[faster] <= ms[slower], (profile.name, ms)


@pytest.mark.slow
def test_latency_grows_with_depth_and_carries_its_measured_error(models):
    for profile in _predicted_profiles():
        for precision in profile.precisions:
            expected = uncalibrated_error(profile.device_class, precision)
            for batch in sorted({1, profile.batch, COMPUTE_BOUND_BATCH}):
                results = [predict_latency(_model(models, profile, precision, d), profile, batch) for d in DEPTHS]
                ms = [r.p50 for r in results]
                assert ms == sorted(ms) and len(set(ms)) == len(ms), (profile.name, precision, batch, ms)
                r = results[0]
                assert (r.source, r.expected_error, r.error_basis) == ("predicted", expected.error, expected.basis)
            assert 0 < expected.error < 1 and "held-out" in expected.basis
