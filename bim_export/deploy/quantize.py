"""fp32 ONNX -> fp16 / int8 ONNX, with ViT-safe defaults.

- fp16: every float tensor to float16 except the graph's inputs and outputs (``keep_io_types``), so a
  device feeds and reads float32 whatever the precision (onnxruntime.transformers.float16).
- int8 dynamic: weights int8 ahead of time, activations quantized per call (no calibration).
- int8 static: QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized op), activation ranges
  calibrated on real images (the user's, else the built-in sample set).

ViT-safe defaults: only the weight GEMMs are quantized (``MatMul`` whose second input is a weight,
``Gemm``, the patch-embedding ``Conv``). LayerNorm, Softmax, GELU/Erf, the residual Adds and the
attention's activation x activation MatMuls (q @ k^T, attn @ v) stay float: they hold the outliers and
the softmax's dynamic range that int8 loses, and they are a small share of the FLOPs. Weights are
quantized per output channel (symmetric int8; on the embedded checkpoint's depth 12 it lifts the worst
image's cosine from 0.99976 to 0.99987 dynamic, 0.99957 to 0.99985 static, at no cost in speed), activations per tensor (uint8 asymmetric: the dynamic
kernel ONNX Runtime has on x86). For x86 targets without VNNI (this AVX2 host, the ``avx2`` /
``avx512`` presets) weights use 7 bits (``reduce_range``), because their u8 x s8 kernel saturates
int16 sums: see :func:`reduce_range_for` for the measurements. (optimum's own defaults quantize
every MatMul, the attention's included; on ViT-S that cost nothing measurable in cosine, but they are
~10 % of the FLOPs at 224 px and hold the softmax's range, so they stay float here.)

Presets (declared in :mod:`bim_export.deploy.presets`): ``nnapi`` (static QDQ, per-tensor, uint8
activations: Android NNAPI's quantized form) is made with onnxruntime.quantization. With optimum's
(avx512_vnni, avx512, avx2, arm64, tensorrt) and optimum installed (``pip install 'bim-export[optimum]'``),
the quantization config is optimum's ``AutoQuantizationConfig.<preset>`` applied through
``ORTQuantizer``, restricted to the same ViT-safe nodes; without optimum the same settings are made with
onnxruntime.quantization directly.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..runtime.machine import cpu_flags
from .presets import QuantPreset, preset as find_preset
from .profiles import PRECISIONS

log = logging.getLogger(__name__)

INT8_METHODS = ("dynamic", "static")
NATIVE_CPUS_KEY = "quantization_native_cpus"  # metadata_props key parity reads on the device
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_INT8_METHOD = "dynamic"


@dataclass
class QuantInfo:
    """What a precision conversion did, for the manifest and the report.

    Attributes:
        precision: fp32, fp16 or int8.
        method: copy | fp16-keep-io | dynamic | static-qdq.
        tool: the library (and version) that did the work.
        preset: optimum preset name, or None.
        per_channel: weights quantized per output channel.
        quantized_nodes: names of the nodes quantized (int8 only).
        kept_float: op types deliberately left in float.
        calibration: images and method of the static calibration, or None.
        weight_bits: 8, or 7 where the target's int8 kernel would saturate (x86 without VNNI).
        size_mb: size of the written model.
        seconds: wall time of the conversion.
    """

    precision: str
    method: str
    tool: str
    preset: str | None = None
    per_channel: bool = False
    quantized_nodes: list[str] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    calibration: dict | None = None
    weight_bits: int = 8
    size_mb: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantized_nodes"] = len(self.quantized_nodes)
        return d


def convert_precision(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: str,
    calib_x: np.ndarray | None = None,
    method: str | None = None,
    preset: str | None = None,
    *,
    per_channel: bool = True,
    calibration_method: str = "minmax",
) -> QuantInfo:
    """Writes ``fp32_path`` at ``precision`` to ``out_path``.

    Args:
        fp32_path: the exported float32 model.
        out_path: where to write (a copy for fp32).
        precision: fp32, fp16 or int8.
        calib_x: calibration images [N, 3, H, W] float32, normalized like the model's input; for
            int8 static. None: the built-in sample set at the model's input size (ImageNet mean/std).
        method: for int8, ``dynamic`` (default) or ``static``.
        preset: a quantization preset's name (:data:`bim_export.deploy.presets.PRESETS`); optimum's are
            used through optimum when it is installed, else mapped onto onnxruntime.quantization settings.
        per_channel: quantize weights per output channel.
        calibration_method: minmax, percentile or entropy (int8 static).

    Raises:
        InputError: unknown precision, method, preset or calibration method, or calibration images
            of the wrong shape.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' unknown; valid: {', '.join(PRECISIONS)}")
    chosen = find_preset(preset)
    t0 = time.perf_counter()
    if precision == "fp32":
        shutil.copyfile(fp32_path, out_path)
        info = QuantInfo("fp32", "copy", "none")
    elif precision == "fp16":
        info = _to_fp16(fp32_path, out_path)
    else:
        method = method or ("static" if chosen and chosen.static else DEFAULT_INT8_METHOD)
        per_channel = per_channel and not (chosen and chosen.per_tensor)
        if method not in INT8_METHODS:
            raise InputError(f"int8 method '{method}' unknown; valid: {', '.join(INT8_METHODS)}")
        if calibration_method not in CALIBRATION_METHODS:
            raise InputError(f"calibration method '{calibration_method}' unknown; "
                             f"valid: {', '.join(CALIBRATION_METHODS)}")
        info = _to_int8(fp32_path, out_path, method, calib_x, chosen, per_channel, calibration_method)
    _stamp_metadata(fp32_path, out_path, info)
    info.size_mb = out_path.stat().st_size / 1e6
    info.seconds = time.perf_counter() - t0
    return info


def _stamp_metadata(src: Path, dst: Path, info: QuantInfo) -> None:
    """Carries the source's metadata_props over (the quantizers drop some) and records the precision."""
    import onnx

    from .export import read_metadata, set_metadata

    model = onnx.load(str(dst))
    props = {**read_metadata(src), **read_metadata(model), "precision": info.precision,
             "precision_method": info.method, "precision_tool": info.tool}
    if info.preset:
        props["quantization_preset"] = info.preset
        native = find_preset(info.preset).native_cpus
        if native is not None:  # where parity on a CPU EP is the device's own int8 (see parity.emulation_note)
            props[NATIVE_CPUS_KEY] = ",".join(native)
    set_metadata(model, props)
    onnx.save_model(model, str(dst))


# ------------------------------------------------------------------------------------- fp16


def _to_fp16(src: Path, dst: Path) -> QuantInfo:
    import onnx
    import onnxruntime
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(dst))
    return QuantInfo("fp16", "fp16-keep-io", f"onnxruntime.transformers.float16 {onnxruntime.__version__}")


# ------------------------------------------------------------------------------------- int8


def weight_gemm_nodes(model) -> list[str]:
    """Names of the nodes that multiply by a weight: MatMul/Gemm with an initializer input, Conv."""
    inits = {t.name for t in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weights = inits | consts
    names = []
    for n in model.graph.node:
        if n.op_type == "Conv" or (n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[:2])):
            names.append(n.name)
    return names


class _ArrayReader:
    """onnxruntime.quantization CalibrationDataReader over an array, a few images per call (or the
    model's fixed batch; a short last batch is filled up with the first images)."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 8, fixed: int | None = None):
        if fixed:
            batch = fixed
            x = np.concatenate([x, x[:(-len(x)) % fixed]])
        else:  # equal batches: onnxruntime's histogram calibrators cannot stack a short last batch
            batch = max(b for b in range(1, batch + 1) if len(x) % b == 0)
        self._batches = iter([x[i:i + batch] for i in range(0, len(x), batch)])
        self._name = input_name

    def get_next(self):
        b = next(self._batches, None)
        return None if b is None else {self._name: b}


def _calibration_images(model, calib_x: np.ndarray | None) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if calib_x is None:
        from ..model.images import load_image_array, sample_images

        calib_x, _ = load_image_array(sample_images(), size=shape[2])
    calib_x = np.asarray(calib_x, dtype=np.float32)
    if calib_x.ndim != 4 or list(calib_x.shape[1:]) != shape[1:]:
        raise InputError(f"calibration images have shape {list(calib_x.shape)}, the model takes "
                         f"[N, {', '.join(map(str, shape[1:]))}]")
    return calib_x


def _to_int8(src: Path, dst: Path, method: str, calib_x, preset: QuantPreset | None, per_channel,
             calibration_method) -> QuantInfo:
    import onnx

    model = onnx.load(str(src))
    nodes = weight_gemm_nodes(model)
    kept = sorted({n.op_type for n in model.graph.node if n.name not in nodes} - {"Constant"})
    calibration = None
    with tempfile.TemporaryDirectory(prefix="bim-quant-") as tmp:
        tmp = Path(tmp)
        prepared = tmp / "prepared.onnx"
        _pre_process(src, prepared)
        if method == "static":
            x = _calibration_images(model, calib_x)
            calibration = {"images": int(len(x)), "method": calibration_method}
        if preset and preset.optimum and _optimum_available():
            tool = _quantize_optimum(prepared, dst, tmp, method, preset, per_channel, nodes,
                                     x if method == "static" else None, calibration_method)
        else:
            if preset and preset.optimum:
                log.info("optimum is not installed: preset %s applied with onnxruntime.quantization", preset.name)
            tool = _quantize_ort(prepared, dst, tmp, method, preset, per_channel, nodes,
                                 x if method == "static" else None, calibration_method)
    name = preset.name if preset else None
    return QuantInfo("int8", "static-qdq" if method == "static" else "dynamic", tool, name,
                     per_channel, nodes, kept, calibration, 7 if reduce_range_for(name) else 8)


def _pre_process(src: Path, dst: Path) -> None:
    """ONNX Runtime's recommended pre-quantization pass (shape inference, constant folding).

    A graph with a fixed batch skips its ORT optimization step: the graph was folded when its batch
    was fixed, and with static shapes ORT's MatMulAddFusion turns each weight MatMul + bias Add into
    Reshape -> Gemm -> Reshape, which dynamic int8 does not quantize (ORT has no dynamic Gemm) and
    whose new node names the ViT-safe node list no longer matches.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True,
                      skip_optimization=_fixed_batch(src) is not None)


def _ort_calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def host_has_vnni() -> bool:
    """Whether this CPU has an int8 dot-product instruction (x86 VNNI, or any arm64: sdot/udot)."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def reduce_range_for(preset: str | None) -> bool:
    """7-bit weights for x86 targets without VNNI.

    Their u8 x s8 kernel (vpmaddubsw) adds pairs of products into int16 and saturates; on ViT-S/16
    (random weights, this AVX2 host) full-range int8 weights gave embedding cosine 0.9977 dynamic and
    0.986 static QDQ, 7-bit weights 0.9989 and 0.9983 at the same speed (u8 x u8 weights: 0.9995,
    about 10 % slower). VNNI and arm64 kernels accumulate in int32: full range there.
    """
    if preset is None:
        return not host_has_vnni()
    return find_preset(preset).reduce_range


def _quantize_ort(src, dst, tmp, method, preset, per_channel, nodes, x, calibration_method) -> str:
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    # arm64 and tensorrt kernels take signed int8 activations; x86 dynamic kernels need uint8
    act_type = QuantType.QInt8 if preset and preset.signed_activations else QuantType.QUInt8
    reduce_range = reduce_range_for(preset.name if preset else None)
    symmetric = bool(preset and preset.symmetric_activations)
    if method == "dynamic":
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8,
                         reduce_range=reduce_range,
                         nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                         extra_options={"MatMulConstBOnly": True})
    else:
        quantize_static(
            str(src), str(dst), _ArrayReader(_input_name(src), x, fixed=_fixed_batch(src)),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel, reduce_range=reduce_range, activation_type=act_type,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            calibrate_method=_ort_calibration_method(calibration_method),
            extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": symmetric,
                           "CalibTensorRangeSymmetric": symmetric},
        )
    return f"onnxruntime.quantization {onnxruntime.__version__}"


def _fixed_batch(path: Path) -> int | None:
    """The model's fixed input batch, or None when its batch axis is dynamic."""
    import onnx

    first = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return first.dim_value if first.HasField("dim_value") else None


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def _optimum_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.onnxruntime") is not None


def _quantize_optimum(src, dst, tmp, method, preset, per_channel, nodes, x, calibration_method) -> str:
    """optimum's ORTQuantizer with ``AutoQuantizationConfig.<preset>``, restricted to ``nodes``."""
    from importlib.metadata import version

    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    make = getattr(AutoQuantizationConfig, preset.name)
    kwargs = dict(per_channel=per_channel, nodes_to_quantize=nodes, operators_to_quantize=["MatMul", "Gemm", "Conv"])
    if not preset.optimum_static_only:
        kwargs["is_static"] = method == "static"
    if preset.reduce_range:
        kwargs["reduce_range"] = True
    config = make(**kwargs)
    # ORTQuantizer looks for a transformers config beside the model and warns when there is none;
    # a timm backbone never has one, so the warning only alarms the user.
    optimum_log = logging.getLogger("optimum.onnxruntime.quantization")
    level = optimum_log.level
    optimum_log.setLevel(logging.ERROR)
    try:
        quantizer = ORTQuantizer.from_pretrained(src.parent, file_name=src.name)
    finally:
        optimum_log.setLevel(level)
    ranges = _calibration_ranges(src, tmp, x, calibration_method) if config.is_static else None
    out_dir = tmp / "optimum"
    written = quantizer.quantize(config, out_dir, calibration_tensors_range=ranges)
    produced = next(Path(written).glob("*.onnx"))
    shutil.move(str(produced), dst)
    return f"optimum-onnx {version('optimum-onnx')} AutoQuantizationConfig.{preset.name}"


def _calibration_ranges(src: Path, tmp: Path, x: np.ndarray, calibration_method: str):
    """Activation ranges from onnxruntime's calibrator, in the form ORTQuantizer takes."""
    from onnxruntime.quantization import create_calibrator

    calibrator = create_calibrator(str(src), ["MatMul", "Gemm", "Conv"],
                                   augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=_ort_calibration_method(calibration_method))
    calibrator.collect_data(_ArrayReader(_input_name(src), x, fixed=_fixed_batch(src)))
    return calibrator.compute_data()
