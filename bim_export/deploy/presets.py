"""Quantization presets: what int8 a device's kernels take, declared once each.

A profile names its preset (``int8_preset``); the schema accepts the registered names,
:mod:`bim_export.deploy.quantize` makes the int8 graph from the preset's settings, and parity
labels a run whose int8 is made for kernels this machine lacks. A new preset is one
:func:`register_preset` call here (and its test). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InputError
from .registry import Registry

ARM64_CPUS = ("aarch64", "arm64")  # platform.machine() of an ARM host


@dataclass(frozen=True)
class QuantPreset:
    """How int8 is made for one family of kernels.

    Attributes:
        name: the name a profile gives (``int8_preset``).
        description: the kernels it is for, in a line.
        optimum: optimum has ``AutoQuantizationConfig.<name>``; used when optimum is installed,
            else the same settings are applied with onnxruntime.quantization.
        static: int8 is static QDQ (calibrated) by default, else dynamic.
        optimum_static_only: optimum's config takes no ``is_static`` (it is static by construction).
        per_tensor: weights quantized per tensor (else per output channel).
        signed_activations: int8 activations (the kernels' input type), else uint8.
        symmetric_activations: activation ranges symmetric around zero.
        reduce_range: 7-bit weights: x86 kernels without VNNI saturate their int16 sums
            (see :func:`bim_export.deploy.quantize.reduce_range_for`).
        native_cpus: ``platform.machine()`` values whose ONNX Runtime CPU EP runs this int8 as the
            device does; elsewhere parity on the CPU EP is host-emulated. None: any CPU; ``()``: none
            (the int8 runs on a phone's NPU driver).
    """

    name: str
    description: str
    optimum: bool = False
    static: bool = False
    optimum_static_only: bool = False
    per_tensor: bool = False
    signed_activations: bool = False
    symmetric_activations: bool = False
    reduce_range: bool = False
    native_cpus: tuple[str, ...] | None = None


PRESETS: Registry[QuantPreset] = Registry("quantization preset")
register_preset = PRESETS.register

register_preset(QuantPreset("avx512_vnni", "x86 with VNNI (int8 dot products, int32 sums)", optimum=True))
register_preset(QuantPreset("avx512", "x86 AVX-512 without VNNI", optimum=True, reduce_range=True))
register_preset(QuantPreset("avx2", "x86 AVX2 without VNNI", optimum=True, reduce_range=True))
register_preset(QuantPreset("arm64", "ARM64 CPUs (sdot / udot)", optimum=True, signed_activations=True,
                            native_cpus=ARM64_CPUS))
register_preset(QuantPreset("tensorrt", "TensorRT's explicit int8: static, symmetric, signed", optimum=True,
                            static=True, optimum_static_only=True, signed_activations=True,
                            symmetric_activations=True, native_cpus=ARM64_CPUS))
# What Android's NNAPI runs quantized (ORT's NNAPI EP builds quantized FULLY_CONNECTED / CONV_2D from QDQ
# groups with uint8 activations, uint8 or int8 weights, per-tensor scales for all but Conv weights):
# static QDQ, per tensor, uint8 activations, int8 weights. NNAPI's int8 never runs on an ORT CPU EP.
register_preset(QuantPreset("nnapi", "Android NNAPI: static QDQ, per tensor, uint8 activations", static=True,
                            per_tensor=True, native_cpus=()))


def preset(name: str | None) -> QuantPreset | None:
    """The preset named ``name`` (None for None: onnxruntime.quantization's defaults).

    Raises:
        InputError: no preset has that name.
    """
    if name is None:
        return None
    if name not in PRESETS:
        raise InputError(f"quantization preset '{name}' unknown; valid: {', '.join(PRESETS.names())}")
    return PRESETS[name]


def schema_names() -> tuple[str, ...]:
    """The preset names as a profile's schema lists them: optimum's, alphabetical as optimum lists
    them, then the others in the order they were declared."""
    return (*sorted(PRESETS.names(lambda p: p.optimum)), *PRESETS.names(lambda p: not p.optimum))
