"""Hardware figures no real device has: what ``bim-export profiles check`` warns about.

A profile's figures come from data sheets, and a slip of a unit (MFLOP/s for GFLOP/s, a sparse
figure for a dense one, a socket for a slice) passes the schema and skews every prediction. Each
figure is held against what the best chips of its kind reach, with margin, and a warning says what
the figure implies: compute per watt (with ``power_w``), per core (CPU core, GPU SM, NPU core), and
the bus a bandwidth needs at the fastest rate of its ``memory_type``.

Pure Python: no torch or onnxruntime import.
"""

from __future__ import annotations

from dataclasses import dataclass

# Ceilings per watt of the whole chip or module, dense: H100 SXM 67 TFLOP/s fp32, 989 fp16 and
# 1979 TOP/s int8 at 700 W (96, 1413, 2827 per W); RTX 4090 82.6 TFLOP/s fp32 at 450 W (184 per W).
# About twice the best, so a new generation does not warn; a unit slip is 1000x.
PER_WATT = {"fp32": 400.0, "fp16": 4000.0, "int8": 8000.0}
# Ceilings per core. CPU: two 512-bit FMA units at 4 GHz are 256 fp32 GFLOP/s; AVX512-FP16 doubles
# it; AMX int8 reaches 2048 ops a cycle (4 TOP/s at 2 GHz). GPU SM / NPU core: H100's 132 SMs give
# 507 fp32, 7495 fp16 and 14992 int8 per SM; RTX 4090's 128 give 645 fp32.
PER_CORE = {
    "cpu": {"fp32": 400.0, "fp16": 2500.0, "int8": 5000.0},
    "gpu": {"fp32": 1500.0, "fp16": 16000.0, "int8": 32000.0},
}
# Fastest data rate per pin (MT/s) of each DRAM kind (JEDEC; GDDR as the fastest parts ship) and
# the widest bus a chip gives it (bits): LPDDR 1024 (Apple M2 Ultra), DDR 1536 (two 12-channel
# sockets), GDDR 512 (RTX 5090), HBM 8192 (eight stacks).
MEMORY = {
    "LPDDR4": (4266, 1024), "LPDDR4X": (4266, 1024), "LPDDR5": (6400, 1024), "LPDDR5X": (10700, 1024),
    "DDR4": (3200, 1536), "DDR5": (8800, 1536), "GDDR6": (24000, 512), "GDDR6X": (24000, 512),
    "GDDR7": (32000, 512), "HBM2": (2400, 8192), "HBM2e": (3600, 8192), "HBM3": (6400, 8192),
    "HBM3e": (9800, 8192),
}


@dataclass(frozen=True)
class Implausible:
    """One implausible figure: the field's path, and what its value implies, in a line."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def implausible_figures(profile) -> list[Implausible]:
    """Every figure of ``profile`` (``hardware`` and each of ``accelerators``) beyond what real
    chips reach, with what it implies."""
    out = []
    if profile.hardware is not None:
        kind = "gpu" if profile.device_class == "gpu" else "cpu"
        out += _check("hardware", profile.hardware, kind)
    for ep, hw in profile.accelerators.items():
        out += _check(f"accelerators.{ep}", hw, "gpu")
    return out


def _check(where: str, hw, kind: str) -> list[Implausible]:
    out = []
    unit = "SM" if kind == "gpu" and where == "hardware" else ("core" if kind == "cpu" else "accelerator core")
    for precision, value in hw.peak_gflops.model_dump().items():
        if value is None:
            continue
        field, ops = f"{where}.peak_gflops.{precision}", "GOP/s" if precision == "int8" else "GFLOP/s"
        if hw.power_w is not None and value / hw.power_w > PER_WATT[precision]:
            out.append(Implausible(field, f"{value:g} {ops} on {hw.power_w:g} W is {value / hw.power_w:,.0f} {ops} "
                                       f"per watt; the most efficient chips reach about {PER_WATT[precision] / 2:,.0f} "
                                       "(a unit slip, a sparse figure, or the power of a part?)"))
        per_core = value / hw.cores
        if per_core > PER_CORE[kind][precision]:
            out.append(Implausible(field, f"{value:g} {ops} on {hw.cores} cores is {per_core:,.0f} {ops} per {unit}; "
                                       f"no {unit} reaches {PER_CORE[kind][precision]:,.0f} (a unit slip, or "
                                       "cores counting something else?)"))
    if hw.memory_type is not None:
        rate, widest = MEMORY[hw.memory_type]
        bits = hw.mem_bandwidth_gbs * 8e3 / rate
        if bits > widest:
            out.append(Implausible(f"{where}.mem_bandwidth_gbs",
                                f"{hw.mem_bandwidth_gbs:g} GB/s of {hw.memory_type} needs a {bits:,.0f}-bit bus at "
                                f"its fastest {rate} MT/s; the widest {hw.memory_type} buses are {widest} bits "
                                "(the whole machine's bandwidth, or another memory type?)"))
    return out
