"""FLOPs and bytes moved per ONNX node, from shape inference with the batch axis bound.

The one cost model of bim-export: the latency predictor (:mod:`bim_export.deploy.latency.roofline` turns costs into
time), the calibration and the benchmarks use it. Each node gets a class (``gemm``: MatMul / Gemm /
Conv with a weight; ``matmul``: activation x activation, i.e. attention; ``softmax``, ``norm``,
``elementwise``, ``quant``, ``layout``; ``view``: reshapes and shape arithmetic, no data moved;
``free``: constants and what the runtime folds at load time) and a precision (fp32, fp16, int8).
Peak memory (weights + live activations) is predicted from the same shapes.

Only onnx and numpy are needed (no onnxruntime, no torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...core.errors import InputError

_GEMM_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "ConvInteger",
             "QLinearConv", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
_SOFTMAX_OPS = {"Softmax", "LogSoftmax"}
_NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
             "BatchNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean",
             "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_LAYOUT_OPS = {"Transpose", "Concat", "Slice", "Split", "Gather", "Expand", "Tile", "Pad",
               "GatherElements", "GatherND", "ScatterND", "Resize"}
_VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size", "ConstantOfShape", "Range"}
_FREE_OPS = {"Constant", "Identity"}
_FLOAT_TYPES = {1, 10, 11, 16}  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
# FLOPs per output element of elementwise / normalisation ops (rough; these ops are memory-bound).
_FLOPS_PER_ELEM = {"Softmax": 5, "LogSoftmax": 6, "LayerNormalization": 8, "SkipLayerNormalization": 9,
                   "Erf": 10, "Gelu": 12, "FastGelu": 10, "BiasGelu": 13, "Tanh": 8, "Sigmoid": 4,
                   "Exp": 4, "Pow": 4, "Sqrt": 2}


@dataclass
class NodeCost:
    """The cost of one node: FLOPs, bytes read + written, class and precision."""

    name: str
    op_type: str
    cls: str
    precision: str
    flops: float
    bytes: float
    fp32_bytes: float = 0.0  # of ``bytes``, those of float32 tensors (halved by a runtime that runs them in fp16)


@dataclass
class GraphCost:
    """FLOPs / bytes per node of one graph at one batch size, plus its memory footprint."""

    batch: int
    nodes: list[NodeCost]
    weights_bytes: int
    peak_activation_bytes: int
    unknown_shapes: int = 0  # node outputs whose shape inference failed (costed from their inputs)
    float_weights_bytes: int = 0  # of ``weights_bytes``, those stored as float (fp32 / fp16 / bf16)

    @property
    def flops(self) -> float:
        return float(sum(n.flops for n in self.nodes))

    @property
    def bytes(self) -> float:
        return float(sum(n.bytes for n in self.nodes))

    def by_class(self) -> dict[str, dict[str, float]]:
        """Per node class: node count, FLOPs, bytes."""
        out: dict[str, dict[str, float]] = {}
        for n in self.nodes:
            row = out.setdefault(n.cls, {"nodes": 0, "flops": 0.0, "bytes": 0.0})
            row["nodes"] += 1
            row["flops"] += n.flops
            row["bytes"] += n.bytes
        return out

    def to_dict(self) -> dict:
        return {"batch": self.batch, "flops": self.flops, "bytes": self.bytes,
                "weights_mb": self.weights_bytes / 1e6, "peak_activation_mb": self.peak_activation_bytes / 1e6,
                "unknown_shapes": self.unknown_shapes, "by_class": self.by_class()}


# --------------------------------------------------------------------------------- graph cost


def _load(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = os.fspath(path_or_model)
    if not os.path.isfile(path):
        raise InputError(f"{path}: ONNX file not found")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / google.protobuf errors of several kinds
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def _bind_batch(model, batch: int):
    """Copy of ``model`` with the first axis of every graph input set to ``batch``."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    inits = {i.name for i in m.graph.initializer}
    symbols = set()
    for vi in m.graph.input:
        if vi.name in inits or not vi.type.tensor_type.shape.dim:
            continue
        d = vi.type.tensor_type.shape.dim[0]
        if d.HasField("dim_value") and d.dim_value != batch:
            raise InputError(f"input '{vi.name}' has a fixed batch of {d.dim_value}; cannot cost batch {batch}")
        if d.HasField("dim_param"):
            symbols.add(d.dim_param)
        d.Clear()
        d.dim_value = batch
    for vi in m.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.Clear()
                d.dim_value = batch
    _sort_nodes(m.graph)
    return m


def _sort_nodes(g) -> None:
    """Puts the nodes in an order that runs (each after its inputs' producers), keeping the file's
    order where it already does. ONNX allows any order and runtimes sort at load; shape inference
    and the costing walk the list as it is (onnxruntime's fp16 converter appends its input Casts at
    the end, which left every shape after them unknown)."""
    import heapq

    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waits_on = [{producer[t] for t in n.input if t in producer and producer[t] != i} for i, n in enumerate(nodes)]
    if all(all(j < i for j in w) for i, w in enumerate(waits_on)):
        return
    users: dict[int, list[int]] = {}
    for i, w in enumerate(waits_on):
        for j in w:
            users.setdefault(j, []).append(i)
    left = [len(w) for w in waits_on]
    ready = [i for i, n in enumerate(left) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        raise InputError("the graph has a cycle: its nodes cannot be ordered to run")
    del g.node[:]
    g.node.extend(nodes[i] for i in order)


def _shapes(model) -> tuple[dict[str, tuple[int, ...] | None], dict[str, int]]:
    """Shapes (None where unknown) and element types of every tensor, after shape inference."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[int, ...] | None] = {}
    dtypes: dict[str, int] = {}
    g = inferred.graph
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        dtypes[init.name] = init.data_type
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        dtypes.setdefault(vi.name, tt.elem_type)
        dims = tt.shape.dim if tt.HasField("shape") else None
        if dims is not None and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
        else:
            shapes.setdefault(vi.name, None)
    return shapes, dtypes


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape is not None else 0


def _fallback_shape(node, shapes) -> tuple[int, ...] | None:
    """A guess for an output shape inference missed: Concat sums its axis, others take the largest input."""
    ins = [shapes.get(i) for i in node.input if i]
    known = [s for s in ins if s is not None]
    if not known:
        return None
    if node.op_type == "Concat" and len(known) == len(ins):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        out = list(known[0])
        out[axis] = sum(s[axis] for s in known)
        return tuple(out)
    return max(known, key=_numel)


def _precision(node, dtypes) -> str:
    from onnx import TensorProto

    if node.op_type in ("MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv", "DynamicQuantizeMatMul",
                        "MatMulIntegerToFloat"):
        return "int8"
    types = {dtypes.get(i) for i in node.input if i}
    if types & {TensorProto.INT8, TensorProto.UINT8}:
        return "int8"
    if TensorProto.FLOAT16 in types or TensorProto.BFLOAT16 in types:
        return "fp16"
    return "fp32"


def _classify(node, consts: set[str], shapes, dtypes) -> str:
    op = node.op_type
    if op in _FREE_OPS:
        return "free"
    if op in _VIEW_OPS:
        return "view"
    outs = [o for o in node.output if o]
    from onnx import TensorProto

    if op in _GEMM_OPS:
        weight_const = any(i in consts for i in node.input[1:2])
        return "gemm" if (weight_const or op.startswith(("Conv", "Gemm", "QLinearConv"))) else "matmul"
    if outs and all(shapes.get(o) is not None and _numel(shapes[o]) <= 16 for o in outs):
        return "view"  # shape arithmetic on a handful of scalars
    if op in _SOFTMAX_OPS:
        return "softmax"
    if op in _NORM_OPS:
        return "norm"
    if op in _QUANT_OPS or (op == "Cast" and {dtypes.get(node.input[0]), dtypes.get(outs[0] if outs else "")}
                              & {TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8}):
        return "quant"
    if op in _LAYOUT_OPS:
        return "layout"
    return "elementwise"


def _flops(node, shapes, out_shape) -> float:
    op = node.op_type
    n_out = _numel(out_shape)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
        a = shapes.get(node.input[0])
        k = a[-1] if a else 0
        return 2.0 * n_out * k
    if op == "Gemm":
        a = shapes.get(node.input[0]) or (0, 0)
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
        return 2.0 * n_out * k + (n_out if len(node.input) > 2 else 0)
    if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        w = shapes.get(node.input[3 if op == "QLinearConv" else 1]) or ()
        per_out = int(np.prod(w[1:])) if len(w) > 1 else 0  # Cin/groups * kernel
        if op == "ConvTranspose":
            x = shapes.get(node.input[0]) or ()
            return 2.0 * _numel(x) * int(np.prod(w[1:])) if w else 0.0
        return 2.0 * n_out * per_out
    if op in _LAYOUT_OPS or op in _VIEW_OPS or op in _FREE_OPS:
        return 0.0
    return float(_FLOPS_PER_ELEM.get(op, 1) * n_out)


def graph_cost(path_or_model, batch: int = 1) -> GraphCost:
    """FLOPs and bytes moved per node of an ONNX graph, with the batch axis bound to ``batch``.

    Args:
        path_or_model: an ONNX file or a loaded ``onnx.ModelProto``.
        batch: the value of the (first, dynamic) batch axis of every graph input.

    Raises:
        InputError: the file is missing or unreadable, or the graph has a fixed other batch.
    """
    from onnx import TensorProto

    if batch < 1:
        raise InputError(f"batch must be >= 1 (got {batch})")
    model = _bind_batch(_load(path_or_model), batch)
    shapes, dtypes = _shapes(model)
    g = model.graph
    consts = {i.name for i in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    weights_bytes = sum(_numel(tuple(i.dims)) * _itemsize(i.data_type) for i in g.initializer)
    float_weights_bytes = sum(_numel(tuple(i.dims)) * _itemsize(i.data_type) for i in g.initializer
                              if i.data_type in _FLOAT_TYPES)

    nodes: list[NodeCost] = []
    dequantized: set[str] = set()
    unknown = 0
    for node in g.node:
        for o in node.output:
            if o and shapes.get(o) is None:
                unknown += 1
                shapes[o] = _fallback_shape(node, shapes)
                dtypes.setdefault(o, dtypes.get(node.input[0], 1) if node.input else 1)
        if node.input and all(i in consts for i in node.input if i) and node.op_type not in _FREE_OPS:
            consts.update(o for o in node.output if o)  # folded by the runtime at load time
            cls = "free"
        else:
            cls = _classify(node, consts, shapes, dtypes)
        prec = _precision(node, dtypes)
        if node.op_type == "DequantizeLinear":
            dequantized.update(o for o in node.output if o)
        elif node.op_type in _GEMM_OPS and node.input[:2] and all(i in dequantized for i in node.input[:2]):
            prec = "int8"  # QDQ: the runtime fuses DequantizeLinear -> MatMul into an int8 kernel
        out_shape = shapes.get(node.output[0]) if node.output else None
        flops = nbytes = fp32_bytes = 0.0
        if cls not in ("view", "free"):
            flops = _flops(node, shapes, out_shape)
            for t in (*node.input, *node.output):
                if not t:
                    continue
                int8_read = t in dequantized and prec == "int8"  # the fused kernel reads the int8 tensor
                size = _numel(shapes.get(t)) * (1 if int8_read else _itemsize(dtypes.get(t, 1)))
                nbytes += size
                fp32_bytes += size if not int8_read and dtypes.get(t, 1) == TensorProto.FLOAT else 0.0
        if cls in ("gemm", "matmul") and prec != "fp32":
            cls = f"{cls}_{prec}"
        nodes.append(NodeCost(node.name or node.op_type, node.op_type, cls, prec, flops, nbytes, fp32_bytes))
    peak = _peak_activations(g, shapes, dtypes, consts)
    return GraphCost(batch=batch, nodes=nodes, weights_bytes=weights_bytes, peak_activation_bytes=peak,
                     unknown_shapes=unknown, float_weights_bytes=float_weights_bytes)


def _peak_activations(g, shapes, dtypes, consts: set[str]) -> int:
    """Peak bytes of live activations running the nodes in graph order; views alias their input."""
    size = {t: _numel(s) * _itemsize(dtypes.get(t, 1)) for t, s in shapes.items() if s is not None}
    root: dict[str, str] = {}
    for n in g.node:
        if n.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity") and n.input and n.output:
            root[n.output[0]] = root.get(n.input[0], n.input[0])
    last_use: dict[str, int] = {}
    for step, n in enumerate(g.node):
        for t in n.input:
            if t:
                last_use[root.get(t, t)] = step
    for o in g.output:
        last_use[root.get(o.name, o.name)] = len(g.node)
    live = {vi.name: size.get(vi.name, 0) for vi in g.input if vi.name not in consts}
    peak = sum(live.values())
    for step, n in enumerate(g.node):
        for o in n.output:
            if o and o not in root and o not in consts:
                live[o] = size.get(o, 0)
        peak = max(peak, sum(live.values()))
        for t in [t for t in live if last_use.get(t, -1) <= step]:
            del live[t]
    return int(peak)


def predict_memory(path_or_model, batch: int = 1) -> float:
    """Predicted session memory in MB: the weights plus the peak of live activations."""
    cost = graph_cost(path_or_model, batch)
    return (cost.weights_bytes + cost.peak_activation_bytes) / 1e6
