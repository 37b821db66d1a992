"""The Triton model repository of GPU bundles: config.pbtxt read back with Triton's own protobuf
schema (a misspelled field fails here, not on the server), built from the graph and the profile;
then served by a real Triton server on loopback and checked against reference.npz."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from profile_copy import profile_copy
from bundle_spec import bundle_spec
from google.protobuf import text_format
from tiny_onnx import write_tiny_onnx
from tritonclient.grpc import model_config_pb2

from bim_export.core.errors import BimExportError, InputError
from bim_export.deploy import triton
from bim_export.deploy.bundle import write_bundle
from bim_export.deploy.pipeline import run_export
from bim_export.deploy.profiles import load_profile
from bim_export.runtime.machine import sha256_file

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "tools" / "triton_server.py"


pytestmark = pytest.mark.usefixtures("shared_exports")  # exports memoized across the module


@pytest.fixture(scope="module")
def server_gpu(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real server-gpu bundle of the tiny checkpoint."""
    out = tmp_path_factory.mktemp("gpu")
    run_export("server-gpu", tiny_checkpoint, out)
    return out / "h100-sxm"


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_server_gpu_bundle_has_a_repository_triton_reads(server_gpu):
    manifest = json.loads((server_gpu / "manifest.json").read_text())
    folder = server_gpu / "triton" / "h100-sxm"
    for name in ("triton/h100-sxm/config.pbtxt", "triton/h100-sxm/1/model.onnx"):
        assert manifest["files"][name] == sha256_file(server_gpu / name)
    assert (folder / "1" / "model.onnx").read_bytes() == (server_gpu / "model.onnx").read_bytes()
    config = parse(folder / "config.pbtxt")
    assert config.name == "h100-sxm" and config.platform == "onnxruntime_onnx"
    # batch 32, budget 10 ms p99: batches up to 32, preferred 8/16/32, a tenth of the budget in the queue
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    assert [i.name for i in config.input] == [i.name for i in graph.input] == ["pixels"]
    assert list(config.input[0].dims) == [3, 32, 32] and config.input[0].data_type == model_config_pb2.TYPE_FP32
    ref = np.load(server_gpu / "reference.npz")
    assert {o.name: list(o.dims) for o in config.output} == {"tokens": list(ref["tokens"].shape[1:]),
                                                             "embedding": list(ref["embedding"].shape[1:])}
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)]
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt"
    assert trt.parameters["precision_mode"] == {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}[manifest["precision"]]
    assert int(trt.parameters["max_workspace_size_bytes"]) == 4096e6 / 4  # a quarter of peak_memory_mb
    assert manifest["triton"]["model_name"] == "h100-sxm" and manifest["triton"]["max_batch_size"] == 32
    # standard ONNX only: no ORT-internal ops (com.microsoft NHWC convolutions, fused kernels)
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    report = (server_gpu / "report.md").read_text()  # the report says how to serve it
    assert "tritonserver --model-repository=$PWD/triton" in report and "perf_analyzer -m h100-sxm -b 32" in report


@pytest.mark.parametrize("precision,mode", [("fp32", "FP32"), ("fp16", "FP16"), ("int8", "INT8")])
def test_precision_mode_follows_the_precision(precision, mode):
    inputs = [triton.Tensor("pixels", "TYPE_FP32", (None, 3, 32, 32))]
    outputs = [triton.Tensor("embedding", "TYPE_FP32", (None, 16))]
    text = triton.model_config(load_profile("jetson-orin-nano"), precision, inputs, outputs)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["precision_mode"] == mode
    # batch 1: nothing to gather, so no dynamic batcher
    assert config.max_batch_size == 1 and not config.HasField("dynamic_batching")


def test_fixed_batch_graph_gets_its_full_shape_and_no_batching():
    inputs = [triton.Tensor("pixels", "TYPE_FP32", (4, 3, 32, 32))]
    outputs = [triton.Tensor("embedding", "TYPE_FP32", (4, 16)), triton.Tensor("logits", "TYPE_FP32", (4, 3))]
    config = text_format.Parse(triton.model_config(load_profile("h100-sxm"), "fp16", inputs, outputs, labels=True),
                               model_config_pb2.ModelConfig())
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [4, 3, 32, 32] and list(config.output[1].dims) == [4, 3]
    assert config.output[1].label_filename == "labels.txt" and config.output[0].label_filename == ""


def test_classifier_ships_labels_and_a_fixed_batch_profile_serves_its_dynamic_file(tmp_path):
    profile = profile_copy(tmp_path, "h100-sxm", fixed_batch=True, dynamic_batch_file=True)
    spec = bundle_spec(tmp_path, profile=str(profile))
    spec.dynamic_model = write_tiny_onnx(tmp_path / "dynamic.onnx")
    spec.checkpoint = {**spec.checkpoint, "finetune": {"labels": ["cat", "dog"]}}
    dest = write_bundle(tmp_path / "out", spec)
    folder = dest / "triton" / "h100-sxm-test"
    assert (folder / "labels.txt").read_text() == "cat\ndog\n"
    assert (folder / "1" / "model.onnx").read_bytes() == (dest / "model.dynamic.onnx").read_bytes()
    assert parse(folder / "config.pbtxt").max_batch_size == 32
    assert json.loads((dest / "manifest.json").read_text())["triton"]["labels"] == "triton/h100-sxm-test/labels.txt"


def test_only_gpu_profiles_or_triton_true_get_a_repository(tmp_path):
    pi = write_bundle(tmp_path / "a", bundle_spec(tmp_path, profile="raspberry-pi-5"))
    assert not (pi / "triton").exists() and "triton" not in json.loads((pi / "manifest.json").read_text())
    asked = write_bundle(tmp_path / "b", bundle_spec(tmp_path, profile=str(profile_copy(tmp_path, "raspberry-pi-5",
                                                                                   triton=True))))
    assert parse(asked / "triton" / "raspberry-pi-5-test" / "config.pbtxt").max_batch_size == 1
    off = write_bundle(tmp_path / "c",
                       bundle_spec(tmp_path, profile=str(profile_copy(tmp_path, "h100-sxm", triton=False))))
    assert not (off / "triton").exists()


def test_graph_with_onnxruntime_internal_ops_is_refused(tmp_path):
    model = onnx.load(str(write_tiny_onnx(tmp_path / "m.onnx")))
    model.graph.node[0].domain = "com.microsoft"
    model.graph.node[0].op_type = "NhwcConv"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(tmp_path / "ort.onnx"))
    with pytest.raises(BimExportError, match="com.microsoft:NhwcConv"):
        triton.write_repository(tmp_path / "out", load_profile("h100-sxm"), "fp16", tmp_path / "ort.onnx")
    assert not (tmp_path / "out").exists()


def test_profile_triton_and_tensorrt_fields_are_checked(tmp_path):
    assert load_profile(profile_copy(tmp_path, "jetson-orin-nano", tensorrt="8.5")).tensorrt == "8.5"
    with pytest.raises(InputError, match="tensorrt"):
        load_profile(profile_copy(tmp_path, "jetson-orin-nano", tensorrt="eight"))
    with pytest.raises(InputError, match="triton"):
        load_profile(profile_copy(tmp_path, "jetson-orin-nano", triton="maybe"))


# ------------------------------------------------------------------------- a real Triton server


def triton_python() -> str | None:
    """The interpreter of the environment with PyTriton (it pins numpy < 2, so it is not this one):
    $BIM_EXPORT_TRITON_PYTHON, else the repository's .venv-triton (made by .ci/run)."""
    named = os.environ.get("BIM_EXPORT_TRITON_PYTHON")
    if named:
        return named
    local = REPO / ".venv-triton" / "bin" / "python"
    return str(local) if local.is_file() else None


@pytest.fixture(scope="module")
def served(server_gpu, tmp_path_factory):
    """The server-gpu bundle's Triton model served by tritonserver (PyTriton) on loopback; stops
    when its standard input closes."""
    python = triton_python()
    if python is None:
        pytest.skip("no PyTriton environment: python3 -m venv .venv-triton && .venv-triton/bin/pip install "
                    "nvidia-pytriton onnxruntime (or set BIM_EXPORT_TRITON_PYTHON)")
    folder = tmp_path_factory.mktemp("triton")
    log, ready = folder / "server.log", folder / "ready.json"
    with open(log, "w") as out:
        proc = subprocess.Popen([python, str(SERVER), str(server_gpu / "triton" / "h100-sxm"), str(ready),
                                 "--lifetime", "240"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ready.is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the Triton server did not start (exit {proc.wait()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield json.loads(ready.read_text())
    proc.stdin.close()  # the server's cue to stop
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]


def _clients(ports: dict):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    def http(x: np.ndarray, request_id: str):
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}")
        inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(ports["model"], [inp], request_id=request_id,
                              outputs=[httpclient.InferRequestedOutput("embedding")])
        return result.get_response()["id"], result.as_numpy("embedding")

    def grpc(x: np.ndarray, request_id: str):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
        inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(ports["model"], [inp], request_id=request_id,
                              outputs=[grpcclient.InferRequestedOutput("embedding")])
        return result.get_response().id, result.as_numpy("embedding")

    return {"http": http, "grpc": grpc}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_serves_the_bundle_within_its_parity(served, server_gpu, protocol):
    ref = np.load(server_gpu / "reference.npz")
    tolerance = json.loads((server_gpu / "manifest.json").read_text())["tolerances"]["cosine"]
    request_id, emb = _clients(served)[protocol](ref["pixels"], "whole-reference")
    assert request_id == "whole-reference" and emb.shape == ref["embedding"].shape
    assert _cosines(emb, ref["embedding"]).min() >= tolerance


def test_eight_clients_fifty_requests_each_every_answer_its_own(served, server_gpu):
    import onnxruntime as ort

    ref = np.load(server_gpu / "reference.npz")
    tolerance = json.loads((server_gpu / "manifest.json").read_text())["tolerances"]["cosine"]
    local = ort.InferenceSession(str(server_gpu / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = local.run(["embedding"], {"pixels": ref["pixels"]})[0]
    clients, n = _clients(served), len(ref["pixels"])
    failures: list[str] = []

    def client(k: int) -> None:
        call = clients["http" if k % 2 else "grpc"]
        rng = np.random.default_rng(k)
        for i in range(50):
            rows = rng.choice(n, size=1 + i % 3, replace=False)  # 1 to 3 images per request
            rid = f"c{k}-r{i}-" + "-".join(map(str, rows))
            try:
                got_id, emb = call(ref["pixels"][rows], rid)
            except Exception as e:  # collected: every failure is reported, not only the first
                failures.append(f"{rid}: {e}")
                continue
            if got_id != rid or not np.allclose(emb, expected[rows], atol=1e-4):
                failures.append(f"{rid}: answered as {got_id}, max error {np.abs(emb - expected[rows]).max():.3g}")
            elif _cosines(emb, ref["embedding"][rows]).min() < tolerance:
                failures.append(f"{rid}: cosine to the reference below {tolerance}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not failures, f"{len(failures)} of 400 requests failed: {failures[:5]}"
