"""FLOPs and bytes moved per ONNX node, and a roofline with fitted efficiency factors.

The one cost model of bim-export: the latency predictor, the calibration and the benchmarks use it.
A graph is costed from ONNX shape inference with the batch axis bound; each node gets a class
(``gemm``, ``matmul``, ``softmax``, ``norm``, ``elementwise``, ``quant``, ``layout``, ``view``,
``free``) and a precision (fp32, fp16, int8). Its roofline time is
``max(flops / peak[precision], bytes / bandwidth) / efficiency[class]``, plus a per-node overhead
(the kernel launch / dispatch cost that dominates GPUs at batch 1) and a fixed per-run overhead.

Only onnx and numpy are needed (no onnxruntime, no torch).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import InputError

# Classes whose efficiency factors are fitted together, as one scale on their prior ratios (the
# graphs of a ViT family do not separate softmax from layer-norm time well enough to fit each).
# A node whose tensors exceed the cache (Hardware.cache_mb) is costed in a ``_dram`` twin of its
# class: on a CPU the same op runs markedly slower per byte once its operands spill to DRAM
# (ViT-S at batch 8 against batch 1), and a roofline on one bandwidth figure cannot show it.
_GEMM = ("gemm", "gemm_fp16", "gemm_int8")
_MATMUL = ("matmul", "matmul_fp16", "matmul_int8")
_MEMORY = ("softmax", "norm", "elementwise", "quant", "layout")
# Attention's activation x activation MatMuls are small and cache-bound: they share the memory
# classes' group (fitted apart, they trade time with softmax and elementwise ops and drift to
# unphysical values).
GROUPS = {
    "gemm": _GEMM,
    "gemm_dram": tuple(f"{c}_dram" for c in _GEMM),
    "memory": _MEMORY + _MATMUL,
    "memory_dram": tuple(f"{c}_dram" for c in _MEMORY + _MATMUL),
}
# Views and shape arithmetic cost a dispatch but move no data; constants cost nothing.
VIEW_OVERHEAD_WEIGHT = 0.25

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


@dataclass
class GraphCost:
    """FLOPs / bytes per node of one graph at one batch size, plus its memory footprint."""

    batch: int
    nodes: list[NodeCost]
    weights_bytes: int
    peak_activation_bytes: int
    unknown_shapes: int = 0  # node outputs whose shape inference failed (costed from their inputs)

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


@dataclass
class Hardware:
    """The figures the roofline needs: peak compute per precision and memory bandwidth."""

    peak_gflops: dict[str, float]  # fp32 / fp16 / int8
    mem_bandwidth_gbs: float
    launch_overhead_us: float = 0.0
    cache_mb: float = 4.0  # a node moving more bytes than this is costed as DRAM-bound (``_dram`` classes)

    def peak(self, precision: str) -> float:
        """Peak GFLOP/s for a precision; a precision the device lacks runs at its fp32 rate."""
        value = self.peak_gflops.get(precision) or self.peak_gflops.get("fp32")
        if not value or value <= 0:
            raise InputError(f"hardware.peak_gflops.{precision} must be > 0 (got {value})")
        return float(value)

    def signature(self) -> dict:
        return {"peak_gflops": dict(self.peak_gflops), "mem_bandwidth_gbs": self.mem_bandwidth_gbs,
                "launch_overhead_us": self.launch_overhead_us, "cache_mb": self.cache_mb}


@dataclass
class CostFactors:
    """Efficiency per node class (fraction of the roofline reached) and overheads in microseconds."""

    efficiency: dict[str, float]
    node_overhead_us: float
    fixed_overhead_us: float
    fitted_on: list[str] = field(default_factory=list)  # what the factors were fitted on

    def eff(self, cls: str) -> float:
        """Efficiency of a class; ``gemm_int8_dram`` falls back to ``gemm_int8``, then ``gemm``."""
        while cls not in self.efficiency and "_" in cls:
            cls = cls.rsplit("_", 1)[0]
        return self.efficiency.get(cls, 0.5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostFactors:
        return cls(efficiency={str(k): float(v) for k, v in d["efficiency"].items()},
                   node_overhead_us=float(d["node_overhead_us"]), fixed_overhead_us=float(d["fixed_overhead_us"]),
                   fitted_on=list(d.get("fitted_on", [])))


# Defaults per device class, as efficiencies against a profile's data-sheet figures.
# cpu: the class ratios fitted by bench/latency_model.py on this project's 2-core AMD EPYC (AVX2,
# ONNX Runtime 1.32, timm ViT-Ti/S graphs, factors against its measured 1024^3 GEMM and streaming
# bandwidth), scaled so that a large GEMM reaches 80 % of peak; node / run overheads as fitted.
# gpu: chosen so that the server-gpu profile reproduces H200 torch-eager ViT-S/16 batch 1 timings
# (0.77 ms at depth 3, 2.45 ms at depth 12: launch-bound); the per-node overhead is the profile's.
# mobile / edge: the cpu factors.
DEFAULT_FACTORS: dict[str, CostFactors] = {
    "cpu": CostFactors(efficiency={"gemm": 0.8, "gemm_dram": 0.5, "gemm_int8": 0.5, "gemm_int8_dram": 0.32,
                                   "gemm_fp16": 0.3, "gemm_fp16_dram": 0.19, "matmul": 0.39, "matmul_dram": 0.62,
                                   "softmax": 0.67, "norm": 0.67, "elementwise": 0.67, "quant": 0.56,
                                   "layout": 0.45, "softmax_dram": 1.07, "norm_dram": 1.07,
                                   "elementwise_dram": 1.07, "quant_dram": 0.89, "layout_dram": 0.71},
                       node_overhead_us=3.4, fixed_overhead_us=26.0, fitted_on=["default"]),
    "gpu": CostFactors(efficiency={"gemm": 0.5, "gemm_int8": 0.3, "gemm_fp16": 0.4, "matmul": 0.2,
                                   "softmax": 0.5, "norm": 0.5, "elementwise": 0.6, "quant": 0.5,
                                   "layout": 0.4},
                       node_overhead_us=0.0, fixed_overhead_us=50.0, fitted_on=["default"]),
}


# A timm ViT block is ~31 compute nodes in ONNX but ~20 kernel launches on a GPU (fused bias adds,
# GELU and attention): the profile's per-launch overhead counts this fraction per node.
GPU_KERNELS_PER_NODE = 0.65


def default_factors(device_class: str, hardware: Hardware) -> CostFactors:
    """The default factors of a device class; a GPU's per-node overhead comes from its profile."""
    base = DEFAULT_FACTORS["gpu" if device_class == "gpu" else "cpu"]
    f = CostFactors.from_dict(base.to_dict())
    if device_class == "gpu":
        f.node_overhead_us = hardware.launch_overhead_us * GPU_KERNELS_PER_NODE
    return f


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
    return m


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

    if outs and all(shapes.get(o) is not None and _numel(shapes[o]) <= 16 for o in outs):
        return "view"  # shape arithmetic on a handful of scalars
    if op in _GEMM_OPS:
        weight_const = any(i in consts for i in node.input[1:2])
        return "gemm" if (weight_const or op.startswith(("Conv", "Gemm", "QLinearConv"))) else "matmul"
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
    if batch < 1:
        raise InputError(f"batch must be >= 1 (got {batch})")
    model = _bind_batch(_load(path_or_model), batch)
    shapes, dtypes = _shapes(model)
    g = model.graph
    consts = {i.name for i in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    weights_bytes = sum(_numel(tuple(i.dims)) * _itemsize(i.data_type) for i in g.initializer)

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
        if cls in ("view", "free"):
            flops, nbytes = 0.0, 0.0
        else:
            flops = _flops(node, shapes, out_shape)
            tensors = [t for t in (*node.input, *node.output) if t]
            nbytes = float(sum(_numel(shapes.get(t)) * (1 if t in dequantized and prec == "int8" else
                                                         _itemsize(dtypes.get(t, 1))) for t in tensors))
        if cls in ("gemm", "matmul") and prec != "fp32":
            cls = f"{cls}_{prec}"
        nodes.append(NodeCost(node.name or node.op_type, node.op_type, cls, prec, flops, nbytes))
    peak = _peak_activations(g, shapes, dtypes, consts)
    return GraphCost(batch=batch, nodes=nodes, weights_bytes=weights_bytes, peak_activation_bytes=peak,
                     unknown_shapes=unknown)


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


# ------------------------------------------------------------------------------------ roofline


def roofline_features(cost: GraphCost, hw: Hardware) -> dict[str, float]:
    """Roofline seconds per node class at efficiency 1, and the overhead-weighted node count."""
    feats: dict[str, float] = Counter()
    nodes = 0.0
    for n in cost.nodes:
        if n.cls == "free":
            continue
        if n.cls == "view":
            nodes += VIEW_OVERHEAD_WEIGHT
            continue
        nodes += 1.0
        cls = f"{n.cls}_dram" if n.bytes > hw.cache_mb * 1e6 else n.cls
        feats[cls] += max(n.flops / (hw.peak(n.precision) * 1e9), n.bytes / (hw.mem_bandwidth_gbs * 1e9))
    out = dict(feats)
    out["nodes"] = nodes
    return out


def roofline_seconds(features: dict[str, float], factors: CostFactors) -> float:
    """Predicted seconds from roofline features and efficiency factors."""
    t = sum(v / factors.eff(c) for c, v in features.items() if c != "nodes")
    return t + (features.get("nodes", 0.0) * factors.node_overhead_us + factors.fixed_overhead_us) * 1e-6


def fit_factors(samples: list[tuple[dict[str, float], float]], prior: CostFactors, *,
                ridge: float = 1e-3, label: str = "") -> CostFactors:
    """Fits one scale per class group plus the per-node and fixed overheads by least squares.

    Minimises the squared *relative* error over ``samples`` (roofline features, measured seconds),
    with a small ridge pull toward ``prior`` scaled to the measurements (the fit is ill-conditioned
    on a family of ViTs whose features all grow with depth). Negative parameters are pinned to zero
    and the rest refitted.
    """
    if not samples:
        raise InputError("no measurements to fit the cost model on")
    groups = [g for g in GROUPS if any(f.get(c, 0) > 0 for f, _ in samples for c in GROUPS[g])]
    names = [*groups, "node_overhead", "fixed_overhead"]
    scale = np.array([1.0] * len(groups) + [max(prior.node_overhead_us, 1.0) * 1e-6,
                                            max(prior.fixed_overhead_us, 10.0) * 1e-6])
    prior_theta = np.array([1.0] * len(groups) + [prior.node_overhead_us * 1e-6, prior.fixed_overhead_us * 1e-6])

    def row(f: dict[str, float]) -> list[float]:
        g_cols = [sum(f.get(c, 0.0) / prior.eff(c) for c in GROUPS[g]) for g in groups]
        return [*g_cols, f.get("nodes", 0.0), 1.0]

    x = np.array([row(f) for f, _ in samples]) * scale  # columns in units of the prior's size
    y = np.array([t for _, t in samples])
    a, b = x / y[:, None], np.ones(len(y))
    # Pull toward the prior rescaled by one well-determined factor (the geometric mean of measured
    # over prior-predicted time), so that a device 10x slower than its figures is not held back.
    k = float(np.exp(np.mean(np.log(y / (x @ (prior_theta / scale))))))
    p0 = k * prior_theta / scale
    free = np.ones(len(names), bool)
    theta = p0.copy()
    for _ in range(len(names)):
        aa = np.vstack([a[:, free], math.sqrt(ridge) * np.eye(free.sum())])
        bb = np.concatenate([b - a[:, ~free] @ theta[~free], math.sqrt(ridge) * p0[free]])
        theta[free] = np.linalg.lstsq(aa, bb, rcond=None)[0]
        neg = free & (theta < 0)
        if not neg.any():
            break
        theta[neg] = 0.0
        free &= ~neg
    theta = theta * scale
    eff = dict(prior.efficiency)
    for gi, g in enumerate(groups):
        s = max(theta[gi], 1e-3)
        for c in GROUPS[g]:
            eff[c] = float(prior.eff(c) / s)
    return CostFactors(efficiency=eff, node_overhead_us=float(theta[-2] * 1e6),
                       fixed_overhead_us=float(theta[-1] * 1e6), fitted_on=[label] if label else [])
