"""A hand-built ONNX model with the bundle contract's names, for tests that need no exporter.

pixels [batch, 3, 32, 32] -> patch conv -> tokens [batch, 16, 16] -> embedding = token mean [batch, 16].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

SIZE, PATCH, DIM = 32, 8, 16


def write_tiny_onnx(path: Path, metadata: dict[str, str] | None = None) -> Path:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [DIM, 3, PATCH, PATCH],
                           (rng.standard_normal((DIM, 3, PATCH, PATCH)) * 0.1).astype(np.float32).ravel())
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, DIM, -1])
    nodes = [
        helper.make_node("Conv", ["pixels", "w"], ["conv"], strides=[PATCH, PATCH]),
        helper.make_node("Reshape", ["conv", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["tokens"], ["embedding"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", None, DIM]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, path)
    return path
