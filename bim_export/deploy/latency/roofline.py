"""The roofline: per-class efficiency factors and overheads on top of the graph cost, and their fit.

A node's time is ``max(flops / peak[precision], bytes / bandwidth) / efficiency[class]`` plus a
per-node overhead (the kernel launch / dispatch cost that dominates GPUs at batch 1); a run adds a
fixed overhead. The factors are fitted by least squares on measured latencies
(:func:`fit_factors`): by ``bench/latency_model.py`` on the host for the defaults, and by
``bim-export calibrate`` on a device for its calibration file.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from ...errors import InputError
from .costmodel import GraphCost
from .measure import measure_host_hardware

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
# GPUs are launch-bound at the batch sizes of an embedding service; their L2 (40-50 MB on A100 /
# H100) keeps a ViT's activations on chip, so no node is costed as DRAM-bound below that.
GPU_CACHE_MB = 40.0


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

    @classmethod
    def measured(cls, threads: int | None = None, clock: str = "wall") -> Hardware:
        """This machine's figures: measured GEMM throughput and bandwidth, no launch overhead."""
        figures = measure_host_hardware(threads, clock)
        peaks = dict(figures["peak_gflops"])
        peaks.setdefault("fp16", peaks["fp32"])  # CPU EPs run fp16 graphs through fp32 kernels
        return cls(peak_gflops=peaks, mem_bandwidth_gbs=figures["mem_bandwidth_gbs"])

    @classmethod
    def from_profile(cls, profile) -> Hardware:
        """A device's figures: its profile's data-sheet figures, or for a measured profile without
        any (``host``), this machine's measured ones (:meth:`measured`)."""
        hw = profile.hardware
        if hw is None:
            return cls.measured(profile.threads)
        return cls(peak_gflops={k: v for k, v in hw.peak_gflops.model_dump().items() if v},
                   mem_bandwidth_gbs=hw.mem_bandwidth_gbs, launch_overhead_us=hw.launch_overhead_us,
                   cache_mb=GPU_CACHE_MB if profile.device_class == "gpu" else cls.cache_mb)

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


def roofline_features(cost: GraphCost, hw: Hardware, *, fuse_qdq: bool = False) -> dict[str, float]:
    """Roofline seconds per node class at efficiency 1, and the overhead-weighted node count.

    Args:
        fuse_qdq: the runtime folds QuantizeLinear / DequantizeLinear into its int8 kernels
            (TensorRT does), so they cost neither time nor a launch.
    """
    feats: dict[str, float] = Counter()
    nodes = 0.0
    for n in cost.nodes:
        if n.cls == "free" or (fuse_qdq and n.cls == "quant"):
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
