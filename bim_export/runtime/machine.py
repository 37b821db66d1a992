"""What a measurement ran on, whether that is a profile's device, and file digests: standard library only.

Both halves record the machine next to their figures (latency, training benchmarks), and a bundle's
standalone validator does the same on a device, so this file also ships inside every bundle.

A profile's ``device`` block (architecture, cpu, accelerator, cpu_flags, logical_cores) says which
machines are that device; :func:`device_mismatches` compares it with :func:`machine_description`.
The rules, each applied only where the profile states the field:

- ``architecture`` must be equal (``x86_64`` / ``aarch64``; ``amd64`` and ``arm64`` are the same).
- ``cpu`` must occur in the CPU's model name, its Arm core names (decoded from /proc/cpuinfo's
  ``CPU part``: a Raspberry Pi 5 reports no model name, only four Cortex-A76 parts) or the board's
  model (device tree), compared in lower case without spaces or punctuation.
- ``accelerator`` must occur, compared the same way, in the name of one of the machine's NVIDIA GPUs
  or in the board's model (a Jetson's GPU is part of the module the board names).
- every one of ``cpu_flags`` must be among the CPU's flags.
- ``logical_cores`` must equal the machine's count (``os.cpu_count()``).

A profile without a ``device`` block matches no machine; the ``host`` profile (measured on whatever
machine runs the command) matches every one, which the callers decide, not this module.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

# CPU features that decide the speed of ViT kernels (int8 dot products, wide vectors, matrix units).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "asimddp", "i8mm", "sve")

# Arm Ltd. core designs by /proc/cpuinfo "CPU part" (implementer 0x41), as Linux's
# arch/arm64/include/asm/cputype.h names them.
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd0e": "Cortex-A76AE", "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710", "0xd48": "Cortex-X2", "0xd49": "Neoverse-N2", "0xd4b": "Cortex-A78C",
    "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720", "0xd82": "Cortex-X4", "0xd84": "Neoverse-V3",
}
_ARCHITECTURES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


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
    values = _cpuinfo_values(keys)
    return values[0] if values else ""


def _cpuinfo_values(keys: tuple[str, ...]) -> list[str]:
    """The values of every /proc/cpuinfo line starting with one of ``keys`` (none without the file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return [ln.split(":", 1)[1] for ln in f if ln.startswith(keys) and ":" in ln]
    except OSError:
        return []


def normalize_architecture(name: str) -> str:
    """``x86_64`` or ``aarch64`` for the names platforms give them; other names lower-cased."""
    name = (name or "").lower()
    return _ARCHITECTURES.get(name, name)


def machine_description() -> dict:
    """What this machine is, for the record next to every measurement (stdlib only: runs on devices)."""
    have = cpu_flags()
    parts = [p.strip().lower() for p in _cpuinfo_values(("CPU part",))]
    cores = list(dict.fromkeys(ARM_PARTS[p] for p in parts if p in ARM_PARTS))
    out = {"cpu": cpu_model(), "cpu_flags": [f for f in CPU_FLAGS if f in have], "logical_cores": os.cpu_count(),
           "architecture": normalize_architecture(platform.machine()),
           "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}
    if cores:
        out["cpu_cores"] = cores
    board = _board()
    if board:
        out["board"] = board
    gpus = _nvidia_gpus()
    if gpus:
        out["accelerators"] = gpus
    return out


def _board() -> str:
    """The board's model from the device tree (a Raspberry Pi, a Jetson), else ''."""
    try:
        return Path("/proc/device-tree/model").read_text(encoding="utf-8", errors="replace").strip("\x00 \n")
    except OSError:
        return ""


def _nvidia_gpus() -> list[str]:
    """Names of the NVIDIA GPUs the driver reports (its /proc files, else nvidia-smi), else []."""
    names = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            text = Path(info).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        names += [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model:")]
    if names or not shutil.which("nvidia-smi"):
        return names
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def describe_machine(machine: dict) -> str:
    """A machine record in a few words: ``AMD EPYC (x86_64, 2 logical cores)``, with its GPUs."""
    name = machine.get("board") or machine.get("cpu") or "an unknown machine"
    details = [machine.get("architecture"), ", ".join(machine.get("cpu_cores") or []) or None,
               f"{machine['logical_cores']} logical cores" if machine.get("logical_cores") else None,
               ", ".join(machine.get("accelerators") or []) or None]
    details = [d for d in details if d]
    return f"{name} ({', '.join(details)})" if details else name


def describe_device(device: dict | None) -> str:
    """A profile's ``device`` block in a few words: ``aarch64, Cortex-A76, 4 logical cores``."""
    if not device:
        return "undescribed"
    parts = [device.get("architecture"), device.get("cpu"), device.get("accelerator"),
             " ".join(device.get("cpu_flags") or []) or None,
             f"{device['logical_cores']} logical cores" if device.get("logical_cores") else None]
    return ", ".join(str(p) for p in parts if p)


def device_mismatches(device: dict | None, machine: dict) -> list[str]:
    """How ``machine`` (a :func:`machine_description`) differs from a profile's ``device`` block;
    empty when it is that device (the rules are in this module's docstring). A field the machine
    record lacks (one made by an older version) is not held against it."""
    if not device:
        return ["the profile has no device block to compare with"]
    out = []
    want = device.get("architecture")
    have = normalize_architecture(machine.get("architecture", ""))
    if want and have and normalize_architecture(want) != have:
        out.append(f"architecture {have}, not {want}")
    if device.get("cpu"):
        names = [machine.get("cpu", ""), *(machine.get("cpu_cores") or []), machine.get("board", "")]
        if not any(_squash(device["cpu"]) in _squash(n) for n in names if n):
            out.append(f"CPU {' / '.join(n for n in names if n) or 'unknown'}, not a {device['cpu']}")
    if device.get("accelerator"):
        names = [*(machine.get("accelerators") or []), machine.get("board", "")]
        if not any(_squash(device["accelerator"]) in _squash(n) for n in names if n):
            out.append(f"accelerator {' / '.join(n for n in names if n) or 'none found'}, not a {device['accelerator']}")
    missing = [f for f in device.get("cpu_flags") or [] if f not in (machine.get("cpu_flags") or [])]
    if missing and "cpu_flags" in machine:
        out.append(f"CPU lacks {', '.join(missing)}")
    want, have = device.get("logical_cores"), machine.get("logical_cores")
    if want and have and int(want) != int(have):
        out.append(f"{have} logical cores, not {want}")
    return out
