"""Device scripts: the ``targets/`` inference scripts a bundle ships as ``infer.py``, declared once each.

A profile names its script (``target_script``); the schema accepts the registered names, the bundle
copies ``targets/<name>.py`` (with ``targets/common.py``, which every script imports), and the report
says how to install its runtime and what the script does. A new script is its file in ``targets/``
and one :func:`register_script` call here (and its test). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry

COMMON = "common.py"  # what every script imports, shipped beside it


@dataclass(frozen=True)
class DeviceScript:
    """One inference script of ``targets/``.

    Attributes:
        name: what a profile's ``target_script`` says; the file is ``targets/<name>.py``.
        runtime: the onnxruntime package the script needs (``onnxruntime-gpu`` for CUDA / TensorRT).
        install_note: a comment for the install line of the report, or "".
        note: what the script does on the device, for the report.
    """

    name: str
    runtime: str
    note: str
    install_note: str = ""

    @property
    def file(self) -> str:
        return f"{self.name}.py"


SCRIPTS: Registry[DeviceScript] = Registry("device script")
register_script = SCRIPTS.register

register_script(DeviceScript(
    "cpu", "onnxruntime",
    "infer.py runs on onnxruntime's CPU execution provider; `--threads N` fixes the thread count."))
register_script(DeviceScript(
    "jetson", "onnxruntime-gpu",
    "infer.py tries TensorRT (fp16 on, engine cached in `trt_cache/` next to the model: the first run builds it, "
    "which takes minutes on an Orin Nano), then CUDA, then the CPU, and prints which one ran.",
    install_note="on Jetson: the onnxruntime-gpu wheel for your JetPack"))
register_script(DeviceScript(
    "server_gpu", "onnxruntime-gpu",
    "infer.py runs on the CUDA execution provider with IO binding (inputs copied to the GPU once, outputs "
    "fetched at the end), else on the CPU. `python infer.py --serve --port 8000` serves it over HTTP instead "
    "(`pip install starlette uvicorn`; POST /v1/infer, GET /health, GET /v1/model), batching concurrent requests "
    "up to the profile's batch."))
register_script(DeviceScript(
    "mobile", "onnxruntime",
    "infer.py runs the bundle's model.ort (what onnxruntime-android loads) after checking it against model.onnx "
    "on the reference inputs, through NNAPI, then XNNPACK, where this onnxruntime build has them (on the phone "
    "under Termux), else the CPU."))
register_script(DeviceScript(
    "ios", "onnxruntime",
    "infer.py runs the bundle's model.ort (what onnxruntime-objc loads) after checking it against model.onnx on "
    "the reference inputs, through the CoreML provider with the profile's options where this onnxruntime build "
    "has it (a Mac), else the CPU."))


def script_for_file(file_name: str) -> DeviceScript | None:
    """The script a bundle's manifest names by file (``jetson.py``), or None if unknown."""
    return SCRIPTS.get(file_name.removesuffix(".py"))
