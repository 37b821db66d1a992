"""The roofline: per-class efficiency factors and overheads on top of the graph cost, and their fit.

A node's device time is ``max(flops / peak[precision], bytes / bandwidth) / efficiency[class]`` and
its launch costs a per-node overhead (kernel launch / op dispatch); a run adds a fixed overhead. How
the two add up depends on the device (``CostFactors.overlap``):

- ``sum``: a CPU runs each node after dispatching it, so a run takes the sum of both.
- ``queue``: a GPU's host enqueues kernels at its launch rate while the device works through the
  queue; a kernel starts when it has been launched and its predecessor has finished. A run whose
  kernels are shorter than their launches takes the launch time (launch-bound, e.g. a small model
  at any batch), one whose kernels are longer the device time; :func:`path_features` follows the
  queue node by node.

The factors are fitted by least squares on measured latencies (:func:`fit_factors`): by
``bench/latency_model.py`` for the defaults, and by ``bim-export calibrate`` on a device for its
calibration file.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ...core.errors import InputError
from .costmodel import GraphCost
from .measure import measure_host_hardware

if TYPE_CHECKING:
    from ..profiles import Profile

# Classes whose efficiency factors are fitted together, as one scale on their prior ratios (the
# graphs of a ViT family do not separate softmax from layer-norm time well enough to fit each).
# A node whose tensors exceed the cache (Hardware.cache_mb) is costed in a ``_dram`` twin of its
# class: on a CPU the same op runs markedly slower per byte once its operands spill to DRAM
# (ViT-S at batch 8 against batch 1), and a roofline on one bandwidth figure cannot show it.
# GPUs get no split (Hardware.cache_mb None): their roofline already prices bytes at HBM bandwidth,
# and on the recorded H100 run a split at 40 MB put ViT-Ti batch-32 nodes into a class that no
# calibration point had, which predicted them 2-3x too slow.
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


@dataclass
class Hardware:
    """The figures the roofline needs: peak compute per precision and memory bandwidth."""

    peak_gflops: dict[str, float]  # fp32 / fp16 / int8
    mem_bandwidth_gbs: float
    launch_overhead_us: float = 0.0
    # A node moving more bytes than this is costed as DRAM-bound (``_dram`` classes); None: no split.
    cache_mb: float | None = 4.0

    def peak(self, precision: str) -> float:
        """Peak GFLOP/s for a precision; a precision the device lacks runs at its fp32 rate."""
        value = self.peak_gflops.get(precision) or self.peak_gflops.get("fp32")
        if not value or value <= 0:
            raise InputError(f"hardware.peak_gflops.{precision} must be > 0 (got {value})")
        return float(value)

    @classmethod
    def measured(cls, threads: int | None = None, clock: str = "wall") -> Hardware:
        """This machine's figures: measured GEMM throughput and bandwidth, no launch overhead."""
        figures = measure_host_hardware(threads, clock)
        peaks = dict(figures["peak_gflops"])
        peaks.setdefault("fp16", peaks["fp32"])  # CPU EPs run fp16 graphs through fp32 kernels
        return cls(peak_gflops=peaks, mem_bandwidth_gbs=figures["mem_bandwidth_gbs"])

    @classmethod
    def from_profile(cls, profile: Profile) -> Hardware:
        """A device's figures: its profile's data-sheet figures, or for a measured profile without
        any (``host``), this machine's measured ones (:meth:`measured`)."""
        hw = profile.hardware
        if hw is None:
            return cls.measured(profile.threads)
        return cls(peak_gflops={k: v for k, v in hw.peak_gflops.model_dump().items() if v},
                   mem_bandwidth_gbs=hw.mem_bandwidth_gbs, launch_overhead_us=hw.launch_overhead_us,
                   cache_mb=None if profile.device_class == "gpu" else cls.cache_mb)

    def signature(self) -> dict:
        return {"peak_gflops": dict(self.peak_gflops), "mem_bandwidth_gbs": self.mem_bandwidth_gbs,
                "launch_overhead_us": self.launch_overhead_us, "cache_mb": self.cache_mb}


OVERLAPS = ("sum", "queue")


@dataclass
class CostFactors:
    """Efficiency per node class (fraction of the roofline reached) and overheads in microseconds.

    ``overlap`` says how launches and device work add up: ``sum`` (CPU) or ``queue`` (GPU); see the
    module docstring.
    """

    efficiency: dict[str, float]
    node_overhead_us: float
    fixed_overhead_us: float
    fitted_on: list[str] = field(default_factory=list)  # what the factors were fitted on
    overlap: str = "sum"

    def __post_init__(self):
        if self.overlap not in OVERLAPS:
            raise InputError(f"factors.overlap must be one of {', '.join(OVERLAPS)} (got {self.overlap!r})")

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
                   fitted_on=list(d.get("fitted_on", [])), overlap=str(d.get("overlap", "sum")))


# Defaults per device class, as efficiencies against a profile's data-sheet figures (what an
# uncalibrated prediction uses; predict.UNCALIBRATED_ERRORS says how far off they were measured to be).
# cpu: the class ratios fitted by bench/latency_model.py on this project's 2-core AMD EPYC (AVX2,
# ONNX Runtime 1.32, timm ViT-Ti/S graphs, factors against its measured 1024^3 GEMM and streaming
# bandwidth), scaled so that a large GEMM reaches 80 % of peak; node / run overheads as fitted.
# gpu: fitted by bench/latency_model.py on the recorded H100 run (NVIDIA H100 80GB HBM3, torch 2.11
# eager, fp32, timm ViT-Ti/S at depths 3-12, batch 1 and 32; bench/results/latency_model_cuda_h100.md)
# against the h100-sxm profile's figures, starting from GPU_PRIOR; the per-node overhead scales with
# the profile's launch figure (GPU_NODE_OVERHEAD_RATIO).
# mobile / edge: the cpu factors.
DEFAULT_FACTORS: dict[str, CostFactors] = {
    "cpu": CostFactors(efficiency={"gemm": 0.8, "gemm_dram": 0.5, "gemm_int8": 0.5, "gemm_int8_dram": 0.32,
                                   "gemm_fp16": 0.3, "gemm_fp16_dram": 0.19, "matmul": 0.39, "matmul_dram": 0.62,
                                   "softmax": 0.67, "norm": 0.67, "elementwise": 0.67, "quant": 0.56,
                                   "layout": 0.45, "softmax_dram": 1.07, "norm_dram": 1.07,
                                   "elementwise_dram": 1.07, "quant_dram": 0.89, "layout_dram": 0.71},
                       node_overhead_us=3.4, fixed_overhead_us=26.0, fitted_on=["default"]),
    "gpu": CostFactors(efficiency={"gemm": 0.858, "gemm_int8": 0.515, "gemm_fp16": 0.686, "matmul": 0.333,
                                   "softmax": 0.833, "norm": 0.833, "elementwise": 1.0, "quant": 0.833,
                                   "layout": 0.667},
                       node_overhead_us=0.0, fixed_overhead_us=95.8, fitted_on=["default"], overlap="queue"),
}
# Fits keep a GPU's classes at or below its roofline: a GPU profile's figures are data-sheet peaks
# that no kernel beats. (Unbounded, the H100 fit gave the memory classes an efficiency of 500, i.e.
# free: torch eager never runs ONNX's separate bias, GELU-chain and slice nodes, but a device with a
# tenth of the bandwidth still pays for layer norms and softmax.) CPUs are unbounded: their figures
# are measured by a streaming benchmark that cache-resident nodes beat.
MAX_EFFICIENCY: dict[str, float] = {"gpu": 1.0}
# A GPU's per-node overhead over its profile's launch_overhead_us, fitted with DEFAULT_FACTORS["gpu"]:
# torch eager on the H100 run's virtualised Xeon host spent 9.9 us per ONNX node, where the h100-sxm
# profile says 8 us per launch (a figure from H200 timings on a faster host).
GPU_NODE_OVERHEAD_RATIO = 1.24

# The gpu factors as they were before any GPU was measured, chosen so that the server-gpu profile
# reproduced H200 torch-eager ViT-S/16 batch 1 timings (0.77 ms at depth 3, 2.45 ms at depth 12:
# launch-bound) with 0.65 of the profile's launch figure per node. The benchmark's held-out checks
# start their fits from these, never from factors fitted on the figures they hold out.
GPU_PRIOR = CostFactors(efficiency={"gemm": 0.5, "gemm_int8": 0.3, "gemm_fp16": 0.4, "matmul": 0.2,
                                    "softmax": 0.5, "norm": 0.5, "elementwise": 0.6, "quant": 0.5, "layout": 0.4},
                        node_overhead_us=0.0, fixed_overhead_us=50.0, fitted_on=["prior"], overlap="queue")
GPU_PRIOR_NODE_OVERHEAD_RATIO = 0.65


def default_factors(device_class: str, hardware: Hardware) -> CostFactors:
    """The default factors of a device class; a GPU's per-node overhead comes from its profile."""
    base = DEFAULT_FACTORS["gpu" if device_class == "gpu" else "cpu"]
    f = CostFactors.from_dict(base.to_dict())
    if device_class == "gpu":
        f.node_overhead_us = hardware.launch_overhead_us * GPU_NODE_OVERHEAD_RATIO
    return f


def prior_factors(device_class: str, hardware: Hardware) -> CostFactors:
    """The factors a held-out fit starts from: the defaults for CPUs, GPU_PRIOR for GPUs."""
    if device_class != "gpu":
        return default_factors(device_class, hardware)
    f = CostFactors.from_dict(GPU_PRIOR.to_dict())
    f.node_overhead_us = hardware.launch_overhead_us * GPU_PRIOR_NODE_OVERHEAD_RATIO
    return f


@dataclass
class NodeTimes:
    """One graph on one device, node by node in graph order: class, device seconds at efficiency 1
    (the roofline time), and launch weight (1 for a kernel, VIEW_OVERHEAD_WEIGHT for a view)."""

    classes: list[str]
    seconds: list[float]
    launches: list[float]

    def features(self) -> dict[str, float]:
        """Roofline seconds per class summed over the graph, and the launch-weighted node count."""
        feats: dict[str, float] = Counter()
        for cls, sec in zip(self.classes, self.seconds):
            if sec > 0:
                feats[cls] += sec
        out = dict(feats)
        out["nodes"] = float(sum(self.launches))
        return out


def node_times(cost: GraphCost, hw: Hardware, *, fuse_qdq: bool = False, float16: bool = False) -> NodeTimes:
    """Each node's roofline seconds at efficiency 1 and its launch weight, in graph order.

    Args:
        fuse_qdq: the runtime folds QuantizeLinear / DequantizeLinear into its int8 kernels
            (TensorRT does), so they cost neither time nor a launch.
        float16: the runtime runs float32 in fp16 (TensorRT's int8 engines are built with fp16
            enabled: the float layers of a QDQ graph run at the fp16 rate, and every float32 tensor,
            an int8 kernel's output too, moves half its bytes).
    """
    times = NodeTimes([], [], [])
    for n in cost.nodes:
        if n.cls == "free" or (fuse_qdq and n.cls == "quant"):
            continue
        if n.cls == "view":
            cls, sec, launch = "view", 0.0, VIEW_OVERHEAD_WEIGHT
        else:
            cls, precision, nbytes = n.cls, n.precision, n.bytes
            if float16:
                nbytes -= n.fp32_bytes / 2
                if precision == "fp32":
                    precision = "fp16"
                    cls = f"{cls}_fp16" if cls in ("gemm", "matmul") else cls
            spills = hw.cache_mb is not None and nbytes > hw.cache_mb * 1e6
            cls = f"{cls}_dram" if spills else cls
            sec = max(n.flops / (hw.peak(precision) * 1e9), nbytes / (hw.mem_bandwidth_gbs * 1e9))
            launch = 1.0
        times.classes.append(cls)
        times.seconds.append(sec)
        times.launches.append(launch)
    return times


def roofline_features(cost: GraphCost, hw: Hardware, *, fuse_qdq: bool = False) -> dict[str, float]:
    """Roofline seconds per node class at efficiency 1, and the launch-weighted node count
    (:meth:`NodeTimes.features` of :func:`node_times`)."""
    return node_times(cost, hw, fuse_qdq=fuse_qdq).features()


def roofline_seconds(features: dict[str, float], factors: CostFactors) -> float:
    """Predicted seconds from features (every node's, or one path's) and efficiency factors: device
    seconds plus launches plus the fixed overhead."""
    t = sum(v / factors.eff(c) for c, v in features.items() if c != "nodes")
    return t + (features.get("nodes", 0.0) * factors.node_overhead_us + factors.fixed_overhead_us) * 1e-6


def path_features(times: NodeTimes, factors: CostFactors) -> dict[str, float]:
    """The features of the path that decides the run's time under ``factors.overlap``.

    ``sum``: every node's (launches and device work add up). ``queue``: the critical path of the
    launch queue: the host finishes launching node i at ``h_i = sum of launches up to i``; the
    device runs it from ``max(h_i, end of node i-1)``. The run ends when the last kernel ends (or the
    last launch, if later); the path is the launches up to the last kernel that waited for its
    launch, then the device work from there on. The time along it is ``roofline_seconds`` of the
    result, and it is linear in the factors, which is what :func:`fit_factors` uses.
    """
    if factors.overlap == "sum":
        return times.features()
    launch_s = factors.node_overhead_us * 1e-6
    host = launched = 0.0  # host time, launch weight so far
    end = 0.0
    path: dict[str, float] = {"nodes": 0.0}  # features of the path to ``end``
    for cls, sec, weight in zip(times.classes, times.seconds, times.launches):
        host += weight * launch_s
        launched += weight
        if sec <= 0:
            continue  # a view: host work, no kernel
        if host >= end:
            path = {"nodes": launched}  # the kernel waited for its launch
            end = host
        path[cls] = path.get(cls, 0.0) + sec
        end += sec / factors.eff(cls)
    if host > end:
        path = {"nodes": launched}
    return path


def predict_seconds(times: NodeTimes, factors: CostFactors) -> float:
    """Predicted seconds of one run: the time along :func:`path_features`."""
    return roofline_seconds(path_features(times, factors), factors)


def fit_factors(samples: list[tuple[NodeTimes | dict[str, float], float]], prior: CostFactors, *,
                ridge: float = 1e-3, label: str = "", max_efficiency: float | None = None,
                iterations: int = 30) -> CostFactors:
    """Fits one scale per class group plus the per-node and fixed overheads by least squares.

    Minimises the squared *relative* error over ``samples`` (node times, or for the ``sum`` overlap
    their features, with measured seconds), with a small ridge pull toward ``prior`` scaled to the
    measurements (the fit is ill-conditioned on a family of ViTs whose features all grow with
    depth). The result has the prior's overlap. For ``queue`` the time is linear in the factors
    along a fixed critical path, but the path moves with the factors: the fit alternates finding
    each sample's path and the linear fit on those paths (Gauss-Newton on a piecewise-linear
    model), keeping the best factors seen, until the paths stop changing.

    Args:
        max_efficiency: no class of a group may be fitted above this efficiency (MAX_EFFICIENCY
            of the device class): the group's scale is pinned there and the rest refitted.

    Raises:
        InputError: no samples, or feature dicts for a ``queue`` prior (it needs node times).
    """
    if not samples:
        raise InputError("no measurements to fit the cost model on")
    if prior.overlap == "sum":
        feats = [t.features() if isinstance(t, NodeTimes) else t for t, _ in samples]
        return _fit_linear(feats, [y for _, y in samples], prior, ridge, label, max_efficiency)
    if not all(isinstance(t, NodeTimes) for t, _ in samples):
        raise InputError("the queue model is fitted on node times (node_times), not summed features")
    ys = [y for _, y in samples]

    def loss(f: CostFactors) -> float:
        return sum((predict_seconds(t, f) / y - 1.0) ** 2 for t, y in samples)

    current, best, best_loss, paths = prior, prior, loss(prior), None
    for _ in range(iterations):
        new_paths = [path_features(t, current) for t, _ in samples]
        if new_paths == paths:
            break
        paths = new_paths
        current = _fit_linear(paths, ys, prior, ridge, label, max_efficiency)
        current_loss = loss(current)
        if current_loss < best_loss:
            best, best_loss = current, current_loss
    return best


def _fit_linear(feats: list[dict[str, float]], ys: list[float], prior: CostFactors, ridge: float,
                label: str, max_efficiency: float | None = None) -> CostFactors:
    """The linear least-squares fit of :func:`fit_factors` on fixed features. A parameter below its
    bound (zero; for a group's scale under ``max_efficiency``, the scale at which its most efficient
    class reaches that) is pinned there and the rest refitted."""
    groups = [g for g in GROUPS if any(f.get(c, 0) > 0 for f in feats for c in GROUPS[g])]
    names = [*groups, "node_overhead", "fixed_overhead"]
    scale = np.array([1.0] * len(groups) + [max(prior.node_overhead_us, 1.0) * 1e-6,
                                            max(prior.fixed_overhead_us, 10.0) * 1e-6])
    prior_theta = np.array([1.0] * len(groups) + [prior.node_overhead_us * 1e-6, prior.fixed_overhead_us * 1e-6])

    def row(f: dict[str, float]) -> list[float]:
        g_cols = [sum(f.get(c, 0.0) / prior.eff(c) for c in GROUPS[g]) for g in groups]
        return [*g_cols, f.get("nodes", 0.0), 1.0]

    x = np.array([row(f) for f in feats]) * scale  # columns in units of the prior's size
    y = np.array(ys)
    a, b = x / y[:, None], np.ones(len(y))
    # Pull toward the prior rescaled by one well-determined factor (the geometric mean of measured
    # over prior-predicted time), so that a device 10x slower than its figures is not held back.
    k = float(np.exp(np.mean(np.log(y / (x @ (prior_theta / scale))))))
    p0 = k * prior_theta / scale
    lower = np.zeros(len(names))
    if max_efficiency:
        lower[:len(groups)] = [max(prior.eff(c) for c in GROUPS[g]) / max_efficiency for g in groups]
    free = np.ones(len(names), bool)
    theta = np.maximum(p0, lower)
    for _ in range(len(names)):
        aa = np.vstack([a[:, free], math.sqrt(ridge) * np.eye(free.sum())])
        bb = np.concatenate([b - a[:, ~free] @ theta[~free], math.sqrt(ridge) * p0[free]])
        theta[free] = np.linalg.lstsq(aa, bb, rcond=None)[0]
        low = free & (theta < lower)
        if not low.any():
            break
        theta[low] = lower[low]
        free &= ~low
    theta = theta * scale
    eff = dict(prior.efficiency)
    for gi, g in enumerate(groups):
        s = max(theta[gi], 1e-3)
        for c in GROUPS[g]:
            eff[c] = float(prior.eff(c) / s)
    return CostFactors(efficiency=eff, node_overhead_us=float(theta[-2] * 1e6),
                       fixed_overhead_us=float(theta[-1] * 1e6), fitted_on=[label] if label else [],
                       overlap=prior.overlap)
