"""What a measurement ran on, and file digests: standard library only.

Both halves record the machine next to their figures (latency, training benchmarks), and a bundle's
standalone validator does the same on a device, so this file also ships inside every bundle.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

# CPU features that decide the speed of ViT kernels (int8 dot products, wide vectors, matrix units).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd",
             "asimddp", "i8mm", "sve")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the bundle's manifest and its check use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_flags() -> set[str]:
    """Every feature flag this CPU reports (``flags`` on x86, ``Features`` on ARM in /proc/cpuinfo);
    empty where there is no /proc/cpuinfo. The one reader of CPU flags: quantization presets and the
    benchmarks ask it too."""
    return set(_cpuinfo_field(("flags", "Features")).split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    return _cpuinfo_field(("model name", "Model")).strip() or platform.processor() or platform.machine()


def _cpuinfo_field(keys: tuple[str, ...]) -> str:
    """The value of the first /proc/cpuinfo line starting with one of ``keys`` ("" if none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1] for ln in f if ln.startswith(keys) and ":" in ln), "")
    except OSError:
        return ""


def machine_description() -> dict:
    """What this machine is, for the record next to every measurement (stdlib only: runs on devices)."""
    have = cpu_flags()
    return {"cpu": cpu_model(), "cpu_flags": [f for f in CPU_FLAGS if f in have], "logical_cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
