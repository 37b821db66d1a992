"""model.ort and required_operators.config made at export time, and the round trip that guards them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from tiny_onnx import SIZE, write_tiny_onnx

from bim_export.core.errors import ValidationError
from bim_export.deploy.ortformat import OPS_CONFIG, ORT_MODEL, make_ort, optimization_style
from bim_export.deploy.profiles import load_profile


@pytest.fixture
def reference(tmp_path):
    """The tiny model, and reference.npz-like arrays: its own outputs on a few inputs."""
    model = write_tiny_onnx(tmp_path / "model.onnx")
    x = np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    tokens, emb = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})
    return model, {"pixels": x, "tokens": tokens, "embedding": emb, "labels": np.full(4, -1)}


def test_ort_model_and_operator_config_round_trip(tmp_path, reference):
    model, ref = reference
    out = tmp_path / "bundle"
    out.mkdir()
    made = make_ort(model, out, ref, "fp32", load_profile("mobile"))
    assert sorted(p.name for p in out.iterdir()) == sorted([OPS_CONFIG, ORT_MODEL])
    assert made.style == "Runtime" and made.target_platform == "arm" and made.onnxruntime == ort.__version__
    assert made.max_abs < 1e-5 and made.parity.passed
    config = (out / OPS_CONFIG).read_text()
    assert "Conv" in config and "ReduceMean" in config
    assert any(line.startswith("ai.onnx;") for line in made.operators)
    # the .ort file is ONNX Runtime's format, and computes what the .onnx file computes
    assert (out / ORT_MODEL).read_bytes()[4:8] == b"ORTM"
    sess = ort.InferenceSession(str(out / ORT_MODEL), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixels": ref["pixels"]})
    np.testing.assert_allclose(got[1], ref["embedding"], atol=1e-6)


def test_optimization_style_follows_the_accelerators():
    assert optimization_style(load_profile("mobile")) == "Runtime"
    assert optimization_style(load_profile("iphone")) == "Runtime"
    assert optimization_style(load_profile("edge-cpu")) == "Fixed"


def test_ort_model_that_misses_parity_writes_nothing(tmp_path, reference):
    model, ref = reference
    out = tmp_path / "bundle"
    out.mkdir()
    wrong = {**ref, "embedding": -ref["embedding"]}  # what PyTorch would have said, were it different
    with pytest.raises(ValidationError, match="model.ort: parity with PyTorch failed"):
        make_ort(model, out, wrong, "fp32", load_profile("mobile"))
    assert list(out.iterdir()) == []
