"""quantize.py: each precision runs, keeps the float I/O contract, quantizes only weight GEMMs,
and stays close to the fp32 model on real images."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import timm
import torch

from bim_export.core.errors import InputError
from bim_export.deploy import quantize
from bim_export.deploy.export import export_onnx, read_metadata
from bim_export.deploy.quantize import convert_precision
from bim_export.model.images import load_image_array, sample_images
from bim_export.runtime.parity import compare_outputs
from bim_export.runtime.session import run_onnx

SIZE = 32


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE,
                                 patch_size=8, depth=4, embed_dim=32, num_heads=2).eval()
    path = tmp_path_factory.mktemp("quant") / "fp32.onnx"
    return export_onnx(backbone, path, opset=17, img_size=SIZE, metadata={"depth": 4, "precision": "fp32"})


@pytest.fixture(scope="module")
def images():
    """Real photo crops: even ones calibrate, odd ones test (no image is both)."""
    x, y = load_image_array(sample_images(), SIZE)
    return x[::2], x[1::2], y[1::2]


def outputs(path, x):
    import onnxruntime as ort

    return run_onnx(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), x, 8)


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def float_io(path) -> bool:
    g = onnx.load(str(path)).graph
    return all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*g.input, *g.output])


def test_fp16_keeps_float32_io_and_matches(fp32_model, images, tmp_path):
    _, test, labels = images
    info = convert_precision(fp32_model, tmp_path / "fp16.onnx", "fp16")
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert float_io(tmp_path / "fp16.onnx")
    big = [t for t in model.graph.initializer if np.prod(t.dims) >= 32 * 32]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert info.precision == "fp16" and info.size_mb < 0.7 * (fp32_model.stat().st_size / 1e6)
    r = compare_outputs(outputs(fp32_model, test), outputs(tmp_path / "fp16.onnx", test), labels=labels)
    assert r.passed and r.cosine > 0.9999, r.summary()


def test_int8_dynamic_quantizes_weight_gemms_only(fp32_model, images, tmp_path):
    _, test, labels = images
    out = tmp_path / "dyn.onnx"
    info = convert_precision(fp32_model, out, "int8", method="dynamic")
    counts, fp32_counts = ops(out), ops(fp32_model)
    n_weight_gemms = 4 * 4 + 1  # qkv, proj, fc1, fc2 per block + patch conv
    assert info.method == "dynamic" and len(info.quantized_nodes) == n_weight_gemms
    assert counts["MatMulInteger"] + counts["ConvInteger"] == n_weight_gemms
    # ViT-safe: norms, softmax, GELU, residual adds and the attention's own MatMuls stay float
    for op in ("LayerNormalization", "Softmax", "Erf"):
        assert counts[op] == fp32_counts[op] > 0
    assert counts["MatMul"] == 2 * 4  # q @ k^T and attn @ v of each block
    assert {"LayerNormalization", "Softmax", "Erf", "Add"} <= set(info.kept_float)
    assert float_io(out)
    assert out.stat().st_size < 0.6 * fp32_model.stat().st_size
    r = compare_outputs(outputs(fp32_model, test), outputs(out, test), labels=labels)
    assert r.cosine > 0.99 and r.cosine_min > 0.97, r.summary()
    meta = read_metadata(out)
    assert meta["precision"] == "int8" and meta["precision_method"] == "dynamic" and meta["depth"] == "4"


def test_int8_static_qdq_calibrated_on_real_images(fp32_model, images, tmp_path):
    calib, test, labels = images
    out = tmp_path / "static.onnx"
    info = convert_precision(fp32_model, out, "int8", calib_x=calib, method="static")
    counts = ops(out)
    assert info.method == "static-qdq" and info.calibration == {"images": len(calib), "method": "minmax"}
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    # no Q/DQ feeds a LayerNorm or Softmax: they compute in float
    model = onnx.load(str(out))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert producer.get(n.input[0]) != "DequantizeLinear", n.name
    r = compare_outputs(outputs(fp32_model, test), outputs(out, test), labels=labels)
    assert r.cosine > 0.98, r.summary()


def test_int8_static_defaults_to_the_sample_images(fp32_model, tmp_path):
    info = convert_precision(fp32_model, tmp_path / "s.onnx", "int8", method="static",
                             calibration_method="percentile")
    assert info.calibration == {"images": len(sample_images()), "method": "percentile"}


def test_fp32_is_a_copy_with_precision_recorded(fp32_model, tmp_path):
    info = convert_precision(fp32_model, tmp_path / "copy.onnx", "fp32")
    assert info.method == "copy" and read_metadata(tmp_path / "copy.onnx")["precision"] == "fp32"


@pytest.mark.parametrize("kwargs, match", [
    ({"precision": "int4"}, "precision 'int4' unknown"),
    ({"precision": "int8", "method": "qat"}, "int8 method 'qat' unknown"),
    ({"precision": "int8", "preset": "avx9000"}, "preset 'avx9000' unknown; valid: avx512_vnni"),
    ({"precision": "int8", "method": "static", "calib_x": np.zeros((4, 3, 16, 16), np.float32)},
     r"calibration images have shape \[4, 3, 16, 16\], the model takes \[N, 3, 32, 32\]"),
])
def test_bad_arguments_name_the_value(fp32_model, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        convert_precision(fp32_model, tmp_path / "x.onnx", **kwargs)


def test_preset_without_optimum_uses_onnxruntime(fp32_model, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "_optimum_available", lambda: False)
    info = convert_precision(fp32_model, tmp_path / "arm.onnx", "int8", preset="arm64")
    assert info.preset == "arm64" and info.tool.startswith("onnxruntime.quantization")


@pytest.mark.skipif(not quantize._optimum_available(), reason="optimum extra not installed")
def test_optimum_preset_is_applied_to_the_same_nodes(fp32_model, images, tmp_path):
    _, test, labels = images
    out = tmp_path / "vnni.onnx"
    info = convert_precision(fp32_model, out, "int8", preset="avx512_vnni")
    assert info.tool.startswith("optimum-onnx") and "avx512_vnni" in info.tool
    counts = ops(out)
    assert counts["MatMulInteger"] + counts["ConvInteger"] == len(info.quantized_nodes) == 17
    r = compare_outputs(outputs(fp32_model, test), outputs(out, test), labels=labels)
    assert r.cosine > 0.99, r.summary()


def test_seven_bit_weights_only_where_the_int8_kernel_saturates(fp32_model, tmp_path, monkeypatch):
    assert quantize.reduce_range_for("avx2") and quantize.reduce_range_for("avx512")
    assert not any(quantize.reduce_range_for(p) for p in ("avx512_vnni", "arm64", "tensorrt"))
    monkeypatch.setattr(quantize, "_optimum_available", lambda: False)
    monkeypatch.setattr(quantize, "host_has_vnni", lambda: False)
    assert convert_precision(fp32_model, tmp_path / "a.onnx", "int8").weight_bits == 7
    monkeypatch.setattr(quantize, "host_has_vnni", lambda: True)
    assert convert_precision(fp32_model, tmp_path / "b.onnx", "int8").weight_bits == 8
    # 7-bit symmetric weights: every stored int8 weight lies in [-64, 64]
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "a.onnx")).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 64]
    assert weights and all(np.abs(w.astype(int)).max() <= 64 for w in weights)
    full = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "b.onnx")).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) > 64]
    assert max(np.abs(w.astype(int)).max() for w in full) == 127


def test_a_registered_preset_is_made_and_labelled_from_its_declaration(fp32_model, tmp_path, monkeypatch):
    """A new preset is one registration: conversion takes its settings from it, and parity on a CPU EP
    labels its int8 as host-emulated on the CPUs it does not name."""
    import onnxruntime as ort

    from bim_export.runtime.parity import session_emulation_note
    from bim_export.deploy.presets import PRESETS, QuantPreset

    monkeypatch.setattr(quantize, "_optimum_available", lambda: False)
    PRESETS.register(QuantPreset("npu_test", "a test's NPU", static=True, per_tensor=True, native_cpus=()))
    try:
        info = convert_precision(fp32_model, tmp_path / "npu.onnx", "int8", preset="npu_test")
    finally:
        PRESETS.unregister("npu_test")
    assert (info.preset, info.method, info.per_channel) == ("npu_test", "static-qdq", False)
    sess = ort.InferenceSession(str(tmp_path / "npu.onnx"), providers=["CPUExecutionProvider"])
    assert session_emulation_note(sess) == "int8 for npu_test on CPUExecutionProvider: host-emulated"
    plain = convert_precision(fp32_model, tmp_path / "x86.onnx", "int8", preset="avx512_vnni")
    assert plain.preset == "avx512_vnni"
    sess = ort.InferenceSession(str(tmp_path / "x86.onnx"), providers=["CPUExecutionProvider"])
    assert session_emulation_note(sess) == ""
