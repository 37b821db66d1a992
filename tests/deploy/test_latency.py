"""Cost model, measured latency, prediction and calibration files (tiny graphs, fast on 2 cores)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bim_export.cli import main as cli_main
from bim_export.core.errors import InputError
from bim_export.deploy.latency import measure
from bim_export.deploy.latency import predict as latency
from bim_export.deploy.latency.calibration import calibrate, describe_calibration, load_calibration
from bim_export.deploy.latency.costmodel import graph_cost, predict_memory
from bim_export.deploy.latency.roofline import CostFactors, Hardware, fit_factors, roofline_features, roofline_seconds
from bim_export.deploy.latency.stats import FLOOR_MARGIN, MIN_ERROR, QUIET, causes, stated_error
from bim_export.deploy.latency.worker import PeakMemory
from bim_export.deploy.profiles import load_profile, profiles_dir
from bim_export.runtime.machine import machine_description

TINY = {"embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """Tiny timm ViTs through the TorchScript exporter (0.2 s each; the real exporter takes seconds)."""
    import timm
    import torch

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("vits")
    out = {}
    for depth in (1, 2, 4):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=depth, **TINY).eval()
        out[depth] = d / f"vit-d{depth}.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), out[depth], input_names=["pixels"],
                          output_names=["embedding"], dynamic_axes={"pixels": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return out


@pytest.fixture(autouse=True)
def calibration_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BIM_EXPORT_CALIBRATION_DIR", str(tmp_path / "calibration"))
    return tmp_path / "calibration"


# --------------------------------------------------------------------------------- cost model


def test_matmul_and_gemm_flops_are_analytic(tmp_path):
    w = numpy_helper.from_array(np.ones((8, 16), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 16])], [w])
    cost = graph_cost(_save(g, tmp_path / "mm.onnx"), batch=3)
    (node,) = cost.nodes
    assert (node.cls, node.precision) == ("gemm", "fp32")
    assert node.flops == 2 * 3 * 4 * 8 * 16
    assert node.bytes == 4 * (3 * 4 * 8 + 8 * 16 + 3 * 4 * 16)
    assert cost.weights_bytes == 8 * 16 * 4

    b = numpy_helper.from_array(np.ones((16, 8), np.float32), "b")  # used transposed
    c = numpy_helper.from_array(np.ones((16,), np.float32), "c")
    g = helper.make_graph([helper.make_node("Gemm", ["x", "b", "c"], ["y"], transB=1)], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [b, c])
    (node,) = graph_cost(_save(g, tmp_path / "gemm.onnx"), batch=5).nodes
    assert node.flops == 2 * 5 * 8 * 16 + 5 * 16  # multiply-adds plus the bias
    (node,) = graph_cost(tmp_path / "gemm.onnx", batch=1).nodes  # a 16-value output is still a GEMM
    assert (node.cls, node.flops) == ("gemm", 2 * 8 * 16 + 16)


def test_matmul_integer_is_int8_class(tmp_path):
    w = numpy_helper.from_array(np.ones((8, 16), np.int8), "w")
    g = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "mmi",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 16])], [w])
    (node,) = graph_cost(_save(g, tmp_path / "mmi.onnx"), batch=2).nodes
    assert (node.cls, node.precision, node.flops) == ("gemm_int8", "int8", 2 * 2 * 8 * 16)


def test_qdq_matmul_is_costed_as_int8(tmp_path):
    inits = [numpy_helper.from_array(np.ones((8, 16), np.int8), "w_q"),
             numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["w"]),
             helper.make_node("MatMul", ["x_dq", "w"], ["y"])]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits)
    cost = graph_cost(_save(g, tmp_path / "qdq.onnx"), batch=4)
    by_op = {n.op_type: n for n in cost.nodes}
    assert [n.cls for n in cost.nodes] == ["quant", "quant", "free", "gemm_int8"]
    assert by_op["MatMul"].bytes == 4 * 8 + 8 * 16 + 4 * 16 * 4  # int8 operands, fp32 output


def test_vit_cost_scales_with_depth_and_batch(vits):
    c = {d: graph_cost(p, batch=1) for d, p in vits.items()}
    assert c[4].flops - c[2].flops == pytest.approx(2 * (c[2].flops - c[1].flops))

    def matmul_flops(cost):
        return sum(n.flops for n in cost.nodes if n.cls in ("gemm", "matmul"))

    per_block = matmul_flops(c[2]) - matmul_flops(c[1])
    # the linear layers of one block: qkv, proj, fc1, fc2 on 17 tokens of width 32
    tokens, dim = (32 // 8) ** 2 + 1, 32
    linear = 2 * tokens * dim * (3 * dim + dim + 4 * dim + 4 * dim)
    attention = 2 * 2 * tokens * tokens * dim  # q @ k^T and attn @ v over all heads
    assert per_block == linear + attention
    assert graph_cost(vits[2], batch=4).flops == pytest.approx(4 * c[2].flops, rel=1e-6)
    classes = c[4].by_class()
    assert {"gemm", "matmul", "softmax", "norm"} <= set(classes)
    assert classes["softmax"]["nodes"] == 4 and classes["matmul"]["nodes"] == 8
    assert c[4].unknown_shapes <= 4  # the class-token concat is the only gap of shape inference


def test_nodes_out_of_order_are_costed_in_running_order(vits, tmp_path):
    """ONNX allows nodes in any order (onnxruntime's fp16 converter appends its input Casts at the
    end): the cost must not depend on it."""
    from bim_export.deploy.quantize import convert_precision

    m = onnx.load(str(vits[2]))
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes[len(nodes) // 2:] + nodes[:len(nodes) // 2])
    onnx.save(m, tmp_path / "rotated.onnx")
    base, rotated = graph_cost(vits[2], 2), graph_cost(tmp_path / "rotated.onnx", 2)
    assert (rotated.flops, rotated.bytes, rotated.unknown_shapes) == (base.flops, base.bytes, base.unknown_shapes)
    assert sorted(n.name for n in rotated.nodes) == sorted(n.name for n in base.nodes)
    convert_precision(vits[2], tmp_path / "fp16.onnx", "fp16")
    half = graph_cost(tmp_path / "fp16.onnx", 2)
    assert half.unknown_shapes == base.unknown_shapes and half.flops == pytest.approx(base.flops, rel=1e-2)  # + its Casts
    assert half.bytes < 0.6 * base.bytes and sum(n.fp32_bytes for n in half.nodes) < 0.1 * half.bytes
    cyclic = onnx.load(str(vits[1]))
    cyclic.graph.node[0].input.append(cyclic.graph.node[-1].output[0])
    onnx.save(cyclic, tmp_path / "cyclic.onnx")
    with pytest.raises(InputError, match="cycle"):
        graph_cost(tmp_path / "cyclic.onnx", 1)


def test_predict_memory_counts_weights_and_activations(vits):
    cost = graph_cost(vits[2], batch=1)
    inits = onnx.load(str(vits[2])).graph.initializer
    assert cost.weights_bytes == sum(numpy_helper.to_array(i).nbytes for i in inits)
    assert predict_memory(vits[2], 1) > cost.weights_bytes / 1e6
    assert predict_memory(vits[2], 8) > predict_memory(vits[2], 1)


def test_graph_cost_bad_input(tmp_path):
    with pytest.raises(InputError, match="not found"):
        graph_cost(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx at all")
    with pytest.raises(InputError, match="junk.onnx"):
        graph_cost(tmp_path / "junk.onnx")


def test_roofline_features_split_cache_and_dram(vits):
    cost = graph_cost(vits[1], batch=1)
    in_cache = roofline_features(cost, Hardware({"fp32": 50.0}, 10.0, cache_mb=1e3))
    spilled = roofline_features(cost, Hardware({"fp32": 50.0}, 10.0, cache_mb=0.0))
    assert "gemm" in in_cache and not any(k.endswith("_dram") for k in in_cache)
    assert "gemm_dram" in spilled and "gemm" not in spilled
    assert sum(v for k, v in in_cache.items() if k != "nodes") == pytest.approx(
        sum(v for k, v in spilled.items() if k != "nodes"))
    fast = roofline_seconds(in_cache, CostFactors({"gemm": 1.0, "gemm_dram": 0.5}, 0.0, 0.0))
    assert roofline_seconds(spilled, CostFactors({"gemm": 1.0, "gemm_dram": 0.5}, 0.0, 0.0)) > fast


def test_fit_factors_recovers_known_factors():
    truth = CostFactors(efficiency={"gemm": 0.6, "matmul": 0.3, "softmax": 0.5, "norm": 0.5, "elementwise": 0.5,
                                    "quant": 0.5, "layout": 0.5}, node_overhead_us=5.0, fixed_overhead_us=40.0)
    rng = np.random.default_rng(0)
    feats = [{"gemm": g, "matmul": m, "elementwise": e, "nodes": n} for g, m, e, n in
             rng.uniform([1e-3, 1e-4, 1e-4, 20], [1e-2, 1e-3, 1e-3, 400], size=(12, 4))]
    samples = [(f, roofline_seconds(f, truth)) for f in feats]
    # classes of one group keep the prior's ratios: only each group's scale is fitted
    prior = CostFactors(efficiency={k: 1.6 * v for k, v in truth.efficiency.items()}, node_overhead_us=2.0,
                        fixed_overhead_us=10.0)
    fit = fit_factors(samples, prior, ridge=1e-9)
    for f, t in samples:
        assert roofline_seconds(f, fit) == pytest.approx(t, rel=1e-3)
    assert fit.eff("gemm") == pytest.approx(0.6, rel=1e-2) and fit.eff("matmul") == pytest.approx(0.3, rel=1e-2)
    assert fit.node_overhead_us == pytest.approx(5.0, rel=1e-2)


# ---------------------------------------------------------------------------------- measuring


@pytest.mark.timing
def test_measure_onnx_returns_sane_stats(vits):
    r = measure.measure_onnx(vits[1], batch=2, threads=1, warmup=1, repeats=3, rounds=2)
    assert r.source == "measured" and r.batch == 2
    assert 0 < r.p50 <= r.p90 <= r.p99 and r.mean > 0
    assert r.providers == ["CPUExecutionProvider"]
    assert r.settings["threads"] == 1 and r.settings["rounds"] == 2
    medians, used = r.settings["round_medians_ms"], r.settings["rounds_used"]
    assert 2 <= len(medians) <= r.settings["max_rounds"] == 4 and 2 <= len(used) <= len(medians)  # every quiet round
    assert r.p50 == pytest.approx(statistics.median(medians[i] for i in used))  # not the lowest: unbiased
    assert r.settings["processes"] == measure.PROCESSES  # rounds from several workers, each its own level shift
    floor = stated_error(0.0, r.settings["processes"])
    assert set(r.errors) == {"p50", "p90", "p99", "mean"} and min(r.errors.values()) >= floor
    assert r.expected_error == max(r.errors["p50"], r.errors["p90"]) and r.error("p90") == r.errors["p90"]
    assert r.note == ("busy machine" if r.disturbed else "")
    assert r.peak_memory_mb is None or r.peak_memory_mb > 0  # a real peak or none, never 0.0
    assert r.machine["onnxruntime"] and r.machine["logical_cores"] >= 1
    assert json.loads(json.dumps(r.to_dict()))["source"] == "measured"


@pytest.mark.timing
def test_measure_many_interleaves_and_thread_clock(vits):
    rs = measure.measure_many([(vits[1], 1), (vits[4], 1)], threads=1, warmup=1, repeats=2, rounds=2,
                              clock="thread_cpu")
    assert [r.settings["clock"] for r in rs] == ["thread_cpu"] * 2 and rs[0].settings["interleaved_with"] == 2
    assert rs[1].p50 > rs[0].p50  # four blocks take longer than one
    # the second session is created after the first one peaked: it still gets a peak of its own
    assert all(r.peak_memory_mb is None or r.peak_memory_mb > 0 for r in rs)
    with pytest.raises(InputError, match="thread_cpu' with threads=1"):
        measure.measure_many([(vits[1], 1)], threads=2, clock="thread_cpu")


@pytest.mark.slow
@pytest.mark.timing
def test_busy_machine_is_detected_and_its_error_reaches_the_floor(vits):
    """Other processes spinning on every core: the measurement says so, re-measures, and states an
    error that reaches down to the single-thread floor instead of a tight band around an inflated figure."""
    import os

    cores = os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        r = measure.measure_onnx(vits[4], threads=cores, warmup=2, repeats=5, rounds=3)
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    assert r.disturbed.startswith("busy machine: ") and r.note == "busy machine"
    assert r.settings["rounds_run"] == r.settings["max_rounds"] == 6 and r.settings["quiet_rounds"] < 3
    # either cause may be the one seen (threads waiting for a core, or other processes' CPU): each
    # named is above the threshold of the quiet test
    found = r.settings["disturbed_by"]
    assert found and set(found) <= {"wait", "others"}
    for name, value in found.items():
        assert causes(**{"wait": None, "others": None, name: value}, threads=cores, cores=cores)[name] > QUIET
    floor = r.settings["floor_ms"]
    assert 0 < floor < r.p50
    for stat in ("p50", "p90"):
        assert r.stat(stat) * (1 - r.error(stat)) == pytest.approx(floor * (1 - FLOOR_MARGIN))


def test_peak_memory_is_each_stretch_s_own_peak_or_none():
    memory = PeakMemory()
    memory.start()
    big = np.ones(64 * 2**20 // 8)  # 64 MB, touched
    first = memory.stop()
    del big
    memory.start()  # below the process's high-water mark from now on
    small = np.ones(16 * 2**20 // 8)
    second = memory.stop()
    del small
    assert first is None or first > 0.8 * 64
    assert second is None or second > 0
    if memory.reset:  # Linux: the high-water mark is reset, so the smaller peak is still seen
        assert 0.8 * 16 < second < 0.8 * 64
    memory.start()
    idle = memory.stop()
    assert idle is None or idle > 0  # nothing allocated: none, or a real rise, never 0.0


def test_measure_onnx_bad_input(tmp_path, vits):
    with pytest.raises(InputError, match="not found"):
        measure.measure_onnx(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.onnx"):
        measure.measure_onnx(tmp_path / "junk.onnx", threads=1, warmup=1, repeats=1, rounds=1)
    with pytest.raises(InputError, match="repeats"):
        measure.measure_onnx(vits[1], repeats=0)


@pytest.mark.timing
def test_host_profile_is_measured_and_fp16_is_labelled_emulated(tmp_path, vits):
    r = latency.latency_for_profile(vits[1], "host", 1, threads=1, warmup=1, repeats=2, rounds=1)
    assert (r.source, r.profile) == ("measured", "host")
    assert r.note == ("busy machine" if r.disturbed else "")  # this machine may be shared
    m = onnx.load(str(vits[1]))
    helper.set_model_props(m, {"precision": "fp16"})
    onnx.save(m, tmp_path / "fp16.onnx")
    r = latency.latency_for_profile(tmp_path / "fp16.onnx", "host", 1, threads=1, warmup=1, repeats=2, rounds=1)
    assert r.note == ("host-emulated fp16, busy machine" if r.disturbed else "host-emulated fp16")
    assert "host-emulated" in r.label


# --------------------------------------------------------------------------------- predicting


def test_gpu_profile_prediction_is_labelled_predicted(vits):
    p1 = latency.predict_latency(vits[4], "server-gpu", batch=1)
    assert p1.source == "predicted" and p1.profile == "h100-sxm"
    assert p1.expected_error == latency.uncalibrated_error("gpu", "fp32").error > 0
    assert f"predicted ±{p1.expected_error * 100:.0f} %" in p1.label
    assert "H100" in p1.error_basis and "held-out" in p1.error_basis
    assert p1.p50 > 0 and p1.peak_memory_mb > 0
    r = latency.latency_for_profile(vits[4], "server-gpu", 1)
    assert r.source == "predicted" and r.p50 == pytest.approx(p1.p50)
    # launch-bound: per-node overhead dominates a tiny graph at batch 1 on a GPU
    hw = Hardware(peak_gflops={"fp32": 66900}, mem_bandwidth_gbs=3350, launch_overhead_us=8)
    feats = roofline_features(graph_cost(vits[4], 1), hw)
    assert feats["nodes"] * 8e-3 > 0.5 * p1.p50
    assert p1.settings["launch_share"] > 0.5  # what the candidate table's reason reads
    assert p1.settings["float_weight_share"] == 1.0  # an fp32 graph
    assert latency.predict_latency(vits[4], "server-gpu", batch=4096).p50 > p1.p50


def test_tensorrt_profile_fuses_qdq_so_int8_beats_fp32(vits, tmp_path):
    """TensorRT folds Q/DQ into int8 kernels: on a Jetson, static int8 must not cost more than fp32."""
    from bim_export.deploy.quantize import convert_precision

    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    q = tmp_path / "int8.onnx"
    convert_precision(vits[4], q, "int8", calib_x=x, method="static")
    cost = graph_cost(q, 1)
    assert any(n.cls == "quant" for n in cost.nodes)
    hw = Hardware(peak_gflops={"fp32": 1280, "int8": 20480}, mem_bandwidth_gbs=68, launch_overhead_us=10)
    fused, unfused = roofline_features(cost, hw, fuse_qdq=True), roofline_features(cost, hw)
    assert fused["nodes"] < unfused["nodes"] and "quant" not in fused
    fp32 = latency.predict_latency(vits[4], "jetson", batch=1).p50
    int8 = latency.predict_latency(q, "jetson", batch=1)
    assert int8.p50 < fp32
    assert int8.settings["float_weight_share"] < 0.5  # this QDQ graph stores its weights as int8


# -------------------------------------------------------------------------------- calibration


def _pi_copy(tmp_path, name: str, device: dict) -> "Path":
    """The Raspberry Pi 5 profile under another name, describing another device."""
    import yaml

    data = yaml.safe_load((profiles_dir() / "raspberry-pi-5.yaml").read_text())
    data["device"] = device
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _this_machine() -> dict:
    here = machine_description()
    return {"architecture": here["architecture"], "logical_cores": here["logical_cores"]}


def _other_machine() -> dict:
    return {"architecture": "aarch64" if machine_description()["architecture"] == "x86_64" else "x86_64",
            "cpu": "Cortex-A76", "logical_cores": 4}


@pytest.mark.slow
@pytest.mark.timing
def test_calibration_round_trip(calibration_dir, vits, tmp_path):
    profile = _pi_copy(tmp_path, "this-box", _this_machine())
    text = calibrate(profile, specs=[{**TINY, "depth": 1}], batches=[1, 2], threads=1, warmup=1,
                             repeats=2, rounds=2)
    path = calibration_dir / "this-box.json"
    assert str(path) in text and path.is_file() and "FORCED" not in text
    data = json.loads(path.read_text())
    assert data["profile"] == "this-box" and len(data["measurements"]) == 2 and data["forced"] is False
    assert data["measurements"][0]["model"] == "vit-w32-h2-d1-p8-32px"
    assert data["factors"]["node_overhead_us"] >= 0 and data["machine"]["cpu"]
    assert data["machine"]["architecture"] == machine_description()["architecture"]
    r = latency.latency_for_profile(vits[2], profile, 1)
    assert r.source == "calibrated" and r.note == f"on {data['machine']['cpu']}"
    assert r.expected_error >= 0.1 and r.expected_error >= data["fit_error"]["max"]
    assert r.error_basis.startswith("calibrated: worst residual of the fit on 2 measurements")
    assert r.settings["calibration"]["forced"] is False and r.settings["calibration"]["file"] == str(path)
    # another profile is still predicted from defaults
    assert latency.latency_for_profile(vits[2], "jetson", 1).source == "predicted"


def test_calibrate_on_another_device_is_refused_before_any_work(calibration_dir, tmp_path, capsys):
    profile = _pi_copy(tmp_path, "barn-pi", _other_machine())
    with pytest.raises(InputError, match=r"calibrate --profile barn-pi: this machine, .* is not the profile's device "
                                         r"\(.*Cortex-A76, 4 logical cores\): architecture .*add --force"):
        calibrate(profile, specs=[{**TINY, "depth": 1}], batches=[1], threads=1, warmup=1, repeats=1, rounds=1)
    assert cli_main(["calibrate", "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: calibrate --profile barn-pi: this machine") and err.count("\n") == 1
    assert not calibration_dir.exists()  # nothing written


@pytest.mark.slow
def test_forced_calibration_is_labelled_in_every_prediction(calibration_dir, vits, tmp_path, capsys):
    profile = _pi_copy(tmp_path, "barn-pi", _other_machine())
    text = calibrate(profile, force=True, specs=[{**TINY, "depth": 1}], batches=[1], threads=1, warmup=1,
                     repeats=1, rounds=1)
    assert "FORCED: not the profile's device (architecture" in text
    path = calibration_dir / "barn-pi.json"
    data = json.loads(path.read_text())
    assert data["forced"] is True and data["mismatch"][0].startswith("architecture ")
    assert data["device"]["cpu"] == "Cortex-A76"
    r = latency.predict_latency(vits[2], profile, 1)
    assert r.source == "calibrated" and r.note.endswith(", forced: not the profile's device")
    assert "forced" in r.label and r.error_basis.startswith("calibrated (forced on a machine that is not the device: ")
    assert r.settings["calibration"]["forced"] is True
    # profiles show lists it: its file, machine, date, forced
    assert cli_main(["profiles", "show", str(profile)]) == 0
    out = capsys.readouterr().out
    assert f"calibration: {path.absolute()}\n  made {data['created']} on " in out
    assert "FORCED: not the profile's device (architecture" in out


def _write_calibration(calibration_dir, profile_name="raspberry-pi-5", **changes):
    prof = load_profile(profile_name)
    hw = Hardware.from_profile(prof)
    pi = {"cpu": "Raspberry Pi 5 Model B Rev 1.0", "cpu_cores": ["Cortex-A76"], "architecture": "aarch64",
          "logical_cores": 4}
    data = {"kind": "bim-export-calibration", "format_version": 1, "profile": prof.name, "machine": pi,
            "hardware": hw.signature(), "fit_error": {"median": 0.05, "max": 0.08},
            "factors": {"efficiency": {"gemm": 0.7}, "node_overhead_us": 3.0, "fixed_overhead_us": 20.0}}
    data.update(changes)
    calibration_dir.mkdir(parents=True, exist_ok=True)
    path = calibration_dir / "raspberry-pi-5.json"
    path.write_text(json.dumps(data))
    return prof, path


def test_bad_calibration_files(calibration_dir, vits):
    prof, path = _write_calibration(calibration_dir)
    assert load_calibration(prof).factors.eff("gemm") == 0.7
    cases = [
        ({"profile": "jetson-orin-nano"}, "field 'profile' is 'jetson-orin-nano'"),
        ({"hardware": {"peak_gflops": {"fp32": 1.0}, "mem_bandwidth_gbs": 1.0, "launch_overhead_us": 0}},
         "hardware.peak_gflops.fp32' is 1.0.*another device model"),
        ({"factors": {"efficiency": {"gemm": -1}, "node_overhead_us": 1, "fixed_overhead_us": 1}},
         "factors.efficiency.gemm' must be > 0"),
        ({"format_version": 99}, "format_version' must be 1"),
        # made on an x86 server before calibrate refused it, and never forced: not the Pi's figures
        ({"machine": {"cpu": "AMD EPYC", "architecture": "x86_64", "logical_cores": 2}},
         "made on AMD EPYC \\(x86_64, 2 logical cores\\), which is not profile 'raspberry-pi-5''s device "
         "\\(aarch64, Cortex-A76, 4 logical cores\\): architecture x86_64, not aarch64; CPU AMD EPYC, not a Cortex-A76"),
        ({"forced": "yes"}, "field 'forced' must be true or false"),
        ({"factors": {"efficiency": {"gemm": 0.7}, "node_overhead_us": 1, "fixed_overhead_us": 1, "overlap": "x"}},
         "field factors.overlap must be one of sum, queue"),
    ]
    for change, pattern in cases:
        _write_calibration(calibration_dir, **change)
        with pytest.raises(InputError, match=pattern) as e:
            latency.latency_for_profile(vits[1], "raspberry-pi-5", 1)
        assert "raspberry-pi-5.json" in str(e.value)
    # the same file, forced, is used and says so
    _write_calibration(calibration_dir, machine={"cpu": "AMD EPYC", "architecture": "x86_64"}, forced=True)
    cal = load_calibration(prof)
    assert cal.forced and cal.mismatch == ["architecture x86_64, not aarch64", "CPU AMD EPYC, not a Cortex-A76"]
    assert "FORCED" in describe_calibration(prof)
    path.write_text('{"kind": "bim-export-calibration",')
    with pytest.raises(InputError, match="raspberry-pi-5.json: corrupt JSON at line 1"):
        latency.predict_latency(vits[1], "raspberry-pi-5", 1)
    path.write_text(json.dumps({"kind": "bim-export-calibration", "format_version": 1, "profile": "raspberry-pi-5"}))
    with pytest.raises(InputError, match="field 'hardware' is missing"):
        latency.predict_latency(vits[1], "raspberry-pi-5", 1)


def test_calibrate_gpu_profile_needs_the_gpu(calibration_dir):
    # forced past the device check: the GPU's execution providers are still needed
    with pytest.raises(InputError, match="none of execution_providers .* run calibrate on the device"):
        calibrate("server-gpu", force=True, specs=[{**TINY, "depth": 1}], batches=[1], threads=1, warmup=1,
                          repeats=1, rounds=1)
    assert not (calibration_dir / "h100-sxm.json").exists()


def test_cli_calibrate_unknown_profile(capsys):
    assert cli_main(["calibrate", "--profile", "jetsn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "jetson" in err
