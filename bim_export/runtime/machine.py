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


def machine_description() -> dict:
    """What this machine is, for the record next to every measurement (stdlib only: runs on devices)."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(("model name", "Model"))]
        cpu = names[0] if names else cpu
        have = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith(("flags", "Features"))), set())
        flags = [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return {"cpu": cpu, "cpu_flags": flags, "logical_cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
