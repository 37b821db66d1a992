"""Serves a bundle's Triton model folder (``triton/<model>/``) with a real Triton server on loopback.

Run by the interpreter of an environment that has PyTriton (``nvidia-pytriton``, which ships
``tritonserver``) and onnxruntime, not the project's: PyTriton pins numpy < 2. The model folder's
``config.pbtxt`` is read with Triton's own protobuf module; its name, inputs, outputs, max batch
size and dynamic batcher are what the server is given, and a Python function runs ``1/model.onnx``
with onnxruntime on the CPU (this machine's Triton has no GPU for the onnxruntime backend's TensorRT).

    python triton_server.py MODEL_FOLDER READY_FILE [--lifetime S]

Writes ``{"http": PORT, "grpc": PORT, "model": NAME}`` to READY_FILE (atomically) once the model is
ready (tritonserver's log goes to stdout), then serves until its standard input closes (the test is
done, or died) or ``--lifetime`` seconds pass.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import sysconfig
import threading
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_folder", type=Path)
    parser.add_argument("ready_file", type=Path)
    parser.add_argument("--lifetime", type=float, default=300.0, help="stop after this many seconds at the latest")
    args = parser.parse_args()
    # PyTriton's Python-backend stub links libpython3.X dynamically: let it find this interpreter's
    # own (a system libpython of another patch release breaks its multiprocessing).
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    import numpy as np
    import onnxruntime as ort
    from google.protobuf import text_format
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((args.model_folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    dtype = {model_config_pb2.TYPE_FP32: np.float32, model_config_pb2.TYPE_FP16: np.float16,
             model_config_pb2.TYPE_INT64: np.int64}
    session = ort.InferenceSession(str(args.model_folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in config.output]
    graph_names = [o.name for o in session.get_outputs()]
    if names != graph_names:
        raise SystemExit(f"error: config.pbtxt outputs {names} are not the graph's {graph_names}")

    @batch
    def infer(**inputs):
        return dict(zip(names, session.run(names, inputs)))

    batcher = None
    if config.HasField("dynamic_batching"):
        batcher = DynamicBatcher(preferred_batch_size=list(config.dynamic_batching.preferred_batch_size),
                                 max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds)
    ports = {"http": free_port(), "grpc": free_port()}
    triton_config = TritonConfig(http_address="127.0.0.1", http_port=ports["http"], grpc_address="127.0.0.1",
                                 grpc_port=ports["grpc"], allow_metrics=False, exit_timeout_secs=5)
    with Triton(config=triton_config) as triton:
        triton.bind(model_name=config.name, infer_func=infer,
                    inputs=[Tensor(name=t.name, dtype=dtype[t.data_type], shape=tuple(t.dims)) for t in config.input],
                    outputs=[Tensor(name=t.name, dtype=dtype[t.data_type], shape=tuple(t.dims)) for t in config.output],
                    config=ModelConfig(max_batch_size=config.max_batch_size, batcher=batcher) if config.max_batch_size
                    else ModelConfig(batching=False),
                    strict=True)
        triton.run()
        partial = args.ready_file.with_suffix(".partial")
        partial.write_text(json.dumps({**ports, "model": config.name}))
        partial.replace(args.ready_file)
        done = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        done.wait(args.lifetime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
