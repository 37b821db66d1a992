"""parity.py on plain arrays and a hand-built ONNX graph: the figures, the verdict and the batching.

The comparison against PyTorch on an exported ViT is tested in test_validate.py; here every figure is
checked against a value worked out by hand, with no torch and no exporter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bim_export.runtime.parity import (DEFAULT_TOLERANCES, compare_outputs, emulation_note, merge_results,
                                      neighbour_agreement)
from bim_export.runtime.session import fixed_batch, run_onnx, session
from tiny_onnx import SIZE, write_tiny_onnx

N, T, D = 12, 5, 8  # images, tokens, width


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((N, T, D)).astype(np.float32)
    return {"tokens": tokens, "embedding": tokens.mean(1)}


def _copy(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in outputs.items()}


def test_identical_outputs_pass_with_exact_figures(ref):
    r = compare_outputs(ref, _copy(ref))
    assert r.passed and r.failures == []
    assert r.max_abs == 0.0 and r.mean_abs == 0.0
    assert r.cosine == pytest.approx(1.0) and r.cosine_min == pytest.approx(1.0)
    assert r.neighbour_agreement == 1.0 and r.agreement_kind == "nearest_neighbour"
    assert r.images == N and r.tolerances == {**DEFAULT_TOLERANCES, "max_abs": None}
    assert r.per_output["tokens"]["rel_err"] == 0.0


def test_one_perturbed_element_gives_its_own_max_and_mean_abs(ref):
    test = _copy(ref)
    test["tokens"][3, 2, 1] += 0.25
    r = compare_outputs(ref, test, {"cosine": 0.9, "neighbour_agreement": 0.5})
    assert r.per_output["tokens"]["max_abs"] == pytest.approx(0.25)
    assert r.per_output["tokens"]["mean_abs"] == pytest.approx(0.25 / (N * T * D))
    assert r.per_output["embedding"]["max_abs"] == 0.0
    assert r.max_abs == pytest.approx(0.25)
    # the overall mean runs over every element of both outputs
    assert r.mean_abs == pytest.approx(0.25 / (N * T * D + N * D))
    assert r.passed  # a small error within loose tolerances passes ...
    strict = compare_outputs(ref, test, {"cosine": 0.9, "neighbour_agreement": 0.5, "max_abs": 0.1})
    assert not strict.passed  # ... and a max-abs tolerance, when given, catches it
    assert strict.failures == ["tokens: max abs error 0.25 > 0.1"]


def test_an_orthogonal_embedding_gives_cosine_zero_for_that_image(ref):
    test = _copy(ref)
    e = ref["embedding"][0].astype(np.float64)
    other = np.roll(e, 1)
    other -= (other @ e) / (e @ e) * e  # orthogonal to the reference, same length
    test["embedding"][0] = (other / np.linalg.norm(other) * np.linalg.norm(e)).astype(np.float32)
    r = compare_outputs(ref, test)
    assert r.cosine_min == pytest.approx(0.0, abs=1e-6)
    assert r.cosine == pytest.approx((N - 1) / N, abs=1e-6)  # mean over the images
    assert not r.passed
    assert f"embedding: cosine {r.cosine:.5f} < 0.995 (worst image {r.cosine_min:.5f})" in r.failures


def test_a_scaled_output_fails_on_its_relative_error_though_its_direction_is_right(ref):
    test = _copy(ref)
    test["embedding"] = test["embedding"] * 1.2
    r = compare_outputs(ref, test)
    assert r.cosine == pytest.approx(1.0)
    bound = np.sqrt(2 * (1 - 0.995))  # the distance of two unit vectors at the cosine tolerance: 0.1
    assert r.per_output["embedding"]["rel_err"] == pytest.approx(0.2, rel=1e-5)
    assert r.failures == [f"embedding: relative error 0.2 > {bound:.3g} (the cosine tolerance's)"]
    # 5 % longer stays within it
    test["embedding"] = ref["embedding"] * 1.05
    assert compare_outputs(ref, test).passed


def _at(*degrees: float) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], 1)


def test_neighbour_agreement_without_labels_is_the_nearest_other_image():
    # three pairs of directions; each image's nearest other image is its pair
    ref = _at(0, 5, 40, 45, 80, 85)
    assert neighbour_agreement(ref, ref) == (1.0, "nearest_neighbour")
    assert neighbour_agreement(ref, ref * 3.0) == (1.0, "nearest_neighbour")  # cosine: length does not count
    # image 0 moves to 60 degrees: its nearest becomes image 3 (45), image 1's becomes image 2 (40);
    # the other four keep theirs
    agree, kind = neighbour_agreement(ref, _at(60, 5, 40, 45, 80, 85))
    assert kind == "nearest_neighbour" and agree == pytest.approx(4 / 6)
    assert neighbour_agreement(ref[:2], ref[:2]) == (None, "nearest_neighbour")  # under 3 images: no figure


def test_neighbour_agreement_with_labels_is_knn_top1_on_odd_images():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 6)
    feats = np.where(labels[:, None] == 0, [5.0, 0.0], [0.0, 5.0]) + rng.normal(0, 0.1, (12, 2))
    assert neighbour_agreement(feats, feats, labels) == (1.0, "knn_top1")
    flipped = feats.copy()
    flipped[1::2] = flipped[1::2][:, ::-1]  # every query image now looks like the other class
    assert neighbour_agreement(feats, flipped, labels) == (0.0, "knn_top1")
    # a label of -1 (unlabelled) falls back to the nearest-other-image figure
    assert neighbour_agreement(feats, feats, np.full(12, -1))[1] == "nearest_neighbour"


def test_every_miss_is_collected_with_its_output_and_figure(ref):
    test = {"embedding": np.full_like(ref["embedding"], np.nan)}
    r = compare_outputs(ref, test)
    assert r.failures == ["tokens: missing from the tested outputs (got embedding)",
                          f"embedding: {N * D} non-finite values"]
    assert not r.passed and np.isnan(r.cosine) and r.neighbour_agreement is None
    # a reference with no output at all (only its inputs and labels) is a miss too, not a pass
    r = compare_outputs({"pixels": np.zeros((N, 3)), "labels": np.zeros(N)}, {})
    assert not r.passed and r.failures == ["no output to compare"]


def test_multi_exit_outputs_are_each_compared_and_the_worst_embedding_counts(ref):
    multi = {"tokens_2": ref["tokens"], "embedding_2": ref["embedding"],
             "tokens_4": ref["tokens"], "embedding_4": ref["embedding"]}
    test = _copy(multi)
    test["embedding_4"] = -test["embedding_4"]
    r = compare_outputs(multi, test)
    assert r.per_output["embedding_2"]["cosine"] == pytest.approx(1.0)
    assert r.per_output["embedding_4"]["cosine"] == pytest.approx(-1.0)
    assert r.cosine == pytest.approx(-1.0)  # the worst exit
    assert all(f.startswith("embedding_4: ") for f in r.failures)


def test_merge_keeps_each_run_by_name_and_the_worst_figures(ref):
    good = compare_outputs(ref, _copy(ref), label="int8 batch 8")
    slightly = _copy(ref)
    slightly["embedding"] = slightly["embedding"] + 0.01
    fair = compare_outputs(ref, slightly, label="int8 batch 1", note="int8 for arm64 on CPUExecutionProvider: host-emulated")
    m = merge_results({"batch1": fair, "batchN": good}, label="int8")
    assert m.passed and m.max_abs == fair.max_abs and m.cosine == fair.cosine
    assert m.note == fair.note and m.label == "int8"
    d = json.loads(json.dumps(m.to_dict()))
    assert d["batch1"]["label"] == "int8 batch 1" and d["batchN"]["max_abs"] == 0.0
    assert m.brief() == f"cosine {m.cosine:.5f}, agreement 100% ({fair.note})"
    assert m.summary().startswith("int8: PASS cosine")


def test_brief_of_a_failed_result_is_its_misses(ref):
    test = _copy(ref)
    test["embedding"] = -test["embedding"]
    r = compare_outputs(ref, test)
    assert r.brief() == "; ".join(r.failures) and r.brief().startswith("embedding: cosine -1.00000 < 0.995")


@pytest.mark.parametrize("precision, preset, provider, machine, note", [
    ("fp16", None, "CPUExecutionProvider", "x86_64", "fp16 on CPUExecutionProvider: host-emulated"),
    ("fp16", None, "CUDAExecutionProvider", "x86_64", ""),
    ("int8", "nnapi", "CPUExecutionProvider", "aarch64", "int8 for nnapi on CPUExecutionProvider: host-emulated"),
    ("int8", "arm64", "CPUExecutionProvider", "x86_64", "int8 for arm64 on CPUExecutionProvider: host-emulated"),
    ("int8", "arm64", "CPUExecutionProvider", "aarch64", ""),
    ("int8", "tensorrt", "CPUExecutionProvider", "arm64", ""),
    ("int8", None, "CPUExecutionProvider", "x86_64", ""),
    ("fp32", None, "CPUExecutionProvider", "x86_64", ""),
])
def test_emulation_note_names_runs_whose_numerics_are_not_the_targets(precision, preset, provider, machine, note):
    from bim_export.deploy.presets import preset as find_preset

    native = find_preset(preset).native_cpus if preset else None  # what quantization stamps into the model
    assert emulation_note(precision, preset, provider, machine, native) == note


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    d = tmp_path_factory.mktemp("parity")
    model = onnx.load(str(write_tiny_onnx(d / "dynamic.onnx")))
    make_dim_param_fixed(model.graph, "batch", 3)
    onnx.save(model, d / "fixed.onnx")
    return d / "dynamic.onnx", d / "fixed.onnx"


def test_run_onnx_fills_up_a_fixed_batch_and_drops_the_copies(graphs):
    dynamic, fixed = session(graphs[0]), session(graphs[1])
    assert fixed_batch(dynamic) is None and fixed_batch(fixed) == 3
    x = np.random.default_rng(2).standard_normal((7, 3, SIZE, SIZE)).astype(np.float32)
    want = run_onnx(dynamic, x, 7)
    got = run_onnx(fixed, x, 1)  # the model's batch of 3 wins; the last chunk is 1 image + 2 copies
    assert set(got) == {"tokens", "embedding"} and got["embedding"].shape == want["embedding"].shape
    r = compare_outputs(want, got, {"cosine": 0.999999, "neighbour_agreement": 1.0, "max_abs": 1e-5})
    assert r.passed, r.failures
    # batch 1 through the dynamic graph gives the same figures as batch 7
    assert compare_outputs(want, run_onnx(dynamic, x, 1), {"max_abs": 1e-5}).passed


def test_session_falls_back_to_the_cpu_for_providers_not_here(graphs):
    sess = session(graphs[0], providers=["NoSuchExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_logits_are_held_to_top1_agreement_and_cosine(ref):
    # top class i % 3 at 4.0, the next one at 3.9: a near tie
    logits = np.stack([np.eye(3)[i % 3] * 4 + np.eye(3)[(i + 1) % 3] * 3.9 for i in range(N)]).astype(np.float32)
    r = compare_outputs({**ref, "logits": logits}, {**_copy(ref), "logits": logits.copy()})
    assert r.passed and r.top1_agreement == 1.0 and r.tolerances["top1_agreement"] == 0.99
    assert r.per_output["logits"]["cosine"] == pytest.approx(1.0) and "top-1 agreement 100%" in r.brief()
    # one image's two top classes swapped: cosine barely moves, the verdict changes
    flipped = logits.copy()
    flipped[0, [0, 1]] = flipped[0, [1, 0]]
    r = compare_outputs({**ref, "logits": logits}, {**_copy(ref), "logits": flipped})
    assert not r.passed and r.top1_agreement == pytest.approx(11 / 12)
    assert r.failures == ["logits: top-1 agreement 91.7% < 99.0%"]
    assert compare_outputs({**ref, "logits": logits}, {**_copy(ref), "logits": flipped},
                           {"top1_agreement": 0.9}).passed
    merged = merge_results([compare_outputs(ref, _copy(ref)), r])
    assert merged.top1_agreement == r.top1_agreement and not merged.passed
