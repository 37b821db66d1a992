"""Graph forms for phones: fixed batch and op rewrites, each equal to the exported graph; ORT's
usability checker on them.

The graphs are the tiny checkpoint's (and an avg-pooled register ViT's) real exports; every rewrite
is compared with the graph it came from on the built-in sample images.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bim_export.deploy.candidates import Workshop, load_images
from bim_export.deploy.profiles import load_profile
from bim_export.deploy.rewrite import GraphForm, apply_form, form_for
from bim_export.deploy.usability import EpCoverage, check_model, runs_on
from bim_export.model.checkpoint import load_checkpoint
from export_cache import memoize_exports

ALL = ("layernorm", "erf", "gather", "matmul2d", "qkv4d")


@pytest.fixture(scope="module", params=["tiny", "reg_avg"])
def exported(request, tmp_path_factory):
    """(the plain depth-4 export, parity images) of the tiny checkpoint / an avg-pooled register ViT."""
    ckpt_dir = request.getfixturevalue("tiny_checkpoint" if request.param == "tiny" else "reg_avg_checkpoint")
    ckpt = load_checkpoint(ckpt_dir)
    with pytest.MonkeyPatch.context() as mp:
        memoize_exports(mp, tmp_path_factory.mktemp("store"))
        shop = Workshop(ckpt, load_images(None, ckpt.config), tmp_path_factory.mktemp("work"))
        return shop.model(4, "fp32", load_profile("raspberry-pi-5")), shop.images.parity[:6]


def _outputs(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fixed = sess.get_inputs()[0].shape[0]
    if isinstance(fixed, int):
        return [np.concatenate(o) for o in zip(*[sess.run(None, {"pixels": x[i:i + 1]}) for i in range(len(x))])]
    return sess.run(None, {"pixels": x})


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_profiles_ask_for_the_forms_their_accelerators_need(tmp_path):
    assert form_for(load_profile("mobile")) == GraphForm(1, ("layernorm", "erf", "matmul2d", "qkv4d"))
    assert form_for(load_profile("iphone")) == GraphForm(1, ("gather",))  # CoreML MLProgram lacks only Gather
    assert form_for(load_profile("mobile"), dynamic=True).batch is None
    for name in ("host", "jetson", "server-cpu", "edge-cpu"):
        assert form_for(load_profile(name)).plain


@pytest.mark.parametrize("passes", [(), ("layernorm",), ("gather",), ("matmul2d",), ("qkv4d",),
                                    ("layernorm", "gather", "matmul2d", "qkv4d")])
def test_exact_rewrites_compute_what_the_export_computes(exported, tmp_path, passes):
    src, x = exported
    dst = apply_form(src, tmp_path / "form.onnx", GraphForm(1, passes))
    for got, want in zip(_outputs(dst, x), _outputs(src, x)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    ops = _ops(dst)
    assert not {"Shape", "Expand"} & set(ops)  # the batch arithmetic folded away
    for name, op in (("layernorm", "LayerNormalization"), ("gather", "Gather")):
        assert (op in ops) == (name not in passes and op in _ops(src))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(dst)), strict_mode=True)
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    assert all(d.HasField("dim_value") for vi in values for d in vi.type.tensor_type.shape.dim)
    if "qkv4d" in passes:
        assert max(len(vi.type.tensor_type.shape.dim) for vi in values) <= 4
    if "matmul2d" in passes:
        shapes = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in values}
        inits = {t.name for t in model.graph.initializer}
        assert all(shapes[n.input[0]] == 2 for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)


def test_fixed_batch_graph_takes_only_its_batch(exported, tmp_path):
    src, x = exported
    dst = apply_form(src, tmp_path / "b1.onnx", GraphForm(1, ()))
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [1, 3, x.shape[2], x.shape[3]]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"pixels": x[:2]})


def test_erf_as_the_tanh_form_of_gelu(exported, tmp_path):
    src, x = exported
    dst = apply_form(src, tmp_path / "erf.onnx", GraphForm(1, ("erf",)))
    assert "Erf" not in _ops(dst) and "Tanh" in _ops(dst)
    emb, ref = _outputs(dst, x)[1], _outputs(src, x)[1]
    cos = np.sum(emb * ref, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999  # the fp32 tolerance of the phone profiles

    # the Erf node alone, against math.erf: the tanh form's error stays below 4e-4
    z = np.linspace(-6, 6, 4001, dtype=np.float32)
    graph = helper.make_graph([helper.make_node("Erf", ["z"], ["y"], name="erf")], "g",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [len(z)])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(z)])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "one.onnx")
    apply_form(tmp_path / "one.onnx", tmp_path / "one-tanh.onnx", GraphForm(None, ("erf",)))
    y = ort.InferenceSession(str(tmp_path / "one-tanh.onnx"), providers=["CPUExecutionProvider"]).run(None, {"z": z})[0]
    err = np.abs(y - np.array([math.erf(v) for v in z]))
    assert 1e-5 < err.max() < 4e-4  # an approximation, and a close one


def test_ort_checker_nnapi_takes_the_rewritten_graph_not_the_export(exported, tmp_path):
    src, _ = exported
    android = load_profile("mobile")
    plain = check_model(src, android)["NnapiExecutionProvider"]
    assert plain.verdict == "NO" and plain.dynamic_shape_nodes > 0
    assert {"ai.onnx:LayerNormalization", "ai.onnx:Erf"} <= set(plain.unsupported_ops)
    assert not plain.takes and runs_on({"NnapiExecutionProvider": plain}) is None
    dst = apply_form(src, tmp_path / "android.onnx", form_for(android))
    nnapi = check_model(dst, android)["NnapiExecutionProvider"]
    assert (nnapi.supported, nnapi.partitions, nnapi.verdict, nnapi.unsupported_ops) == (nnapi.nodes, 1, "YES", [])
    assert nnapi.takes and runs_on({"NnapiExecutionProvider": nnapi}) == "NnapiExecutionProvider"


def test_ort_checker_coreml_mlprogram_takes_the_iphone_form(exported, tmp_path):
    src, _ = exported
    iphone = load_profile("iphone")
    before = check_model(apply_form(src, tmp_path / "b1.onnx", GraphForm(1, ())), iphone)["CoreMLExecutionProvider"]
    pooled_by_token = "Gather" in _ops(src)  # class-token pooling; an avg-pooled ViT has none
    assert before.checker == "CoreML MLProgram"
    assert before.unsupported_ops == (["ai.onnx:Gather"] if pooled_by_token else [])
    after = check_model(apply_form(src, tmp_path / "iphone.onnx", form_for(iphone)), iphone)["CoreMLExecutionProvider"]
    assert (after.supported, after.partitions, after.verdict) == (after.nodes, 1, "YES")


def test_takes_needs_nearly_every_node_in_at_most_two_partitions():
    def cov(supported, partitions):
        return EpCoverage("NnapiExecutionProvider", "NNAPI", 100, supported, partitions)

    assert cov(100, 1).takes and cov(99, 2).takes
    assert not cov(98, 1).takes and not cov(100, 3).takes and not cov(0, 0).takes
    assert "lacks" not in cov(100, 1).brief() and "2 partitions" in cov(99, 2).brief()
