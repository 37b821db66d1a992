"""A Triton Inference Server model repository for a bundle: ``triton/<model>/``, ready for
``tritonserver --model-repository <bundle>/triton``.

    triton/<model>/config.pbtxt   platform onnxruntime_onnx, the graph's inputs and outputs, batching,
                                  the GPU instance and ORT's TensorRT accelerator at the precision
    triton/<model>/1/model.onnx   the bundle's graph (its dynamic-batch file where it ships one)
    triton/<model>/labels.txt     a classifier's class names, one a line (``label_filename`` of logits)

How the batching is derived from the profile:

- ``max_batch_size`` is the profile's batch: the batch the latency budget was checked at, so the
  server never forms a batch whose latency nobody predicted. A graph whose batch axis is fixed
  (phone-style, without a dynamic-batch file) gets ``max_batch_size: 0`` and its full shape.
- ``dynamic_batching`` (only where max_batch_size > 1): preferred sizes are the profile's batch and
  its halving down to a quarter of it (32 -> 8, 16, 32), sizes TensorRT tunes well;
  ``max_queue_delay_microseconds`` is a tenth of the latency budget (10 ms -> 1000 us), so waiting
  for a batch to fill costs at most 10 % of the budget (100 us where the profile has no budget).
- TensorRT's ``max_workspace_size_bytes`` is a quarter of the profile's peak-memory budget (the
  engine's weights and activations need the rest), else 1 GiB.

Pure Python: the graph is read by the caller (:func:`graph_io`, onnx imported inside it).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import BimExportError

if TYPE_CHECKING:
    from .profiles import Profile

FOLDER = "triton"
CONFIG, LABELS, VERSION = "config.pbtxt", "labels.txt", "1"
# ONNX TensorProto element types -> Triton's DataType names (model_config.proto)
TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
                7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64",
                12: "TYPE_UINT32", 13: "TYPE_UINT64", 16: "TYPE_BF16"}
PRECISION_MODE = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
DEFAULT_QUEUE_DELAY_US = 100
DEFAULT_WORKSPACE = 1 << 30
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: its name, Triton data type and shape (None for a symbolic axis)."""

    name: str
    data_type: str
    shape: tuple[int | None, ...]


def graph_io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's inputs (initializers excluded) and outputs as Triton sees them.

    Raises:
        BimExportError: a tensor has an element type Triton has no data type for.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}

    def tensor(vi) -> Tensor:
        t = vi.type.tensor_type
        if t.elem_type not in TRITON_TYPES:
            raise BimExportError(f"{path.name}: {vi.name} has ONNX element type {t.elem_type}, which Triton lacks")
        return Tensor(vi.name, TRITON_TYPES[t.elem_type],
                      tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim))

    return [tensor(vi) for vi in graph.input if vi.name not in inits], [tensor(vi) for vi in graph.output]


def model_name(profile: Profile) -> str:
    """The model's name in the repository: the profile's canonical name (Triton's names are folder names)."""
    if not _NAME.fullmatch(profile.name):
        raise BimExportError(f"profile name {profile.name!r} cannot name a Triton model")
    return profile.name


def batching(profile: Profile, batch_is_dynamic: bool) -> dict[str, Any]:
    """``max_batch_size``, and the dynamic batcher's preferred sizes and queue delay (or None): the
    rule in the module docstring."""
    if not batch_is_dynamic:
        return {"max_batch_size": 0, "preferred": [], "queue_delay_us": None}
    top = profile.batch
    preferred = sorted({b for b in (top // 4, top // 2, top) if b >= 2 and top % b == 0})
    budget = profile.budgets.latency_ms
    delay = DEFAULT_QUEUE_DELAY_US if budget is None else max(1, round(budget * 1000 / 10))
    return {"max_batch_size": top, "preferred": preferred, "queue_delay_us": delay if top > 1 else None}


def workspace_bytes(profile: Profile) -> int:
    """TensorRT's workspace: a quarter of the peak-memory budget, else 1 GiB."""
    mb = profile.budgets.peak_memory_mb
    return DEFAULT_WORKSPACE if mb is None else int(mb * 1e6 / 4)


def model_config(profile: Profile, precision: str, inputs: list[Tensor], outputs: list[Tensor],
                 labels: bool = False) -> str:
    """config.pbtxt (Triton's protobuf text format) of the graph with ``inputs`` and ``outputs``.

    Raises:
        BimExportError: an axis other than the batch is left symbolic on an input (Triton needs the
            input's full shape to make requests).
    """
    dynamic = bool(inputs) and inputs[0].shape[:1] == (None,)
    plan = batching(profile, dynamic)
    skip = 1 if plan["max_batch_size"] > 0 else 0

    def dims(t: Tensor, kind: str) -> str:
        rest = t.shape[skip:]
        if kind == "input" and None in rest:
            raise BimExportError(f"input {t.name} has a symbolic axis besides the batch ({list(t.shape)}); "
                                 "Triton needs its full shape")
        return ", ".join(str(-1 if d is None else d) for d in rest)

    def entry(t: Tensor, kind: str) -> str:
        label = f'\n    label_filename: "{LABELS}"' if labels and kind == "output" and t.name.startswith("logits") else ""
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {dims(t, kind)} ]{label}\n  }}'

    lines = [f'name: "{model_name(profile)}"', 'platform: "onnxruntime_onnx"',
             f"max_batch_size: {plan['max_batch_size']}",
             "input [\n" + ",\n".join(entry(t, "input") for t in inputs) + "\n]",
             "output [\n" + ",\n".join(entry(t, "output") for t in outputs) + "\n]"]
    if plan["queue_delay_us"] is not None:
        sizes = ", ".join(map(str, plan["preferred"]))
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
                     f"  max_queue_delay_microseconds: {plan['queue_delay_us']}\n}}")
    lines.append("instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]")
    # engine and timing caches in the server's working folder: a restart loads the engine, not rebuilds it
    params = {"precision_mode": PRECISION_MODE[precision], "max_workspace_size_bytes": str(workspace_bytes(profile)),
              "trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"}
    block = "\n".join(f'      parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    lines.append("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
                 f'      name: "tensorrt"\n{block}\n      }}\n    ]\n  }}\n}}')
    return "\n".join(lines) + "\n"


def write_repository(root: Path, profile: Profile, precision: str, model: Path,
                     labels: list[str] | None = None) -> dict[str, Any]:
    """Writes ``root/triton/<model>/`` for ``model`` (an ONNX file already in the bundle) and returns
    its manifest section.

    Raises:
        BimExportError: the graph holds ops of ONNX Runtime's own domains (``com.microsoft``: what an
            ORT-optimised graph carries, and what Triton's TensorRT accelerator cannot parse), or a
            tensor Triton cannot describe.
    """
    foreign = foreign_ops(model)
    if foreign:
        raise BimExportError(f"{model.name}: ops outside the ONNX standard ({', '.join(foreign)}); a Triton "
                             "repository ships standard ONNX only")
    inputs, outputs = graph_io(model)
    name = model_name(profile)
    folder = root / FOLDER / name
    (folder / VERSION).mkdir(parents=True)
    shutil.copyfile(model, folder / VERSION / "model.onnx")
    (folder / CONFIG).write_text(model_config(profile, precision, inputs, outputs, bool(labels)), encoding="utf-8")
    if labels:
        (folder / LABELS).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    plan = batching(profile, inputs[0].shape[:1] == (None,))
    return {"model_name": name, "repository": FOLDER, "config": f"{FOLDER}/{name}/{CONFIG}",
            "model": f"{FOLDER}/{name}/{VERSION}/model.onnx", "source": model.name,
            "max_batch_size": plan["max_batch_size"], "preferred_batch_size": plan["preferred"],
            "max_queue_delay_microseconds": plan["queue_delay_us"], "precision_mode": PRECISION_MODE[precision],
            "labels": f"{FOLDER}/{name}/{LABELS}" if labels else None}


def foreign_ops(model: Path) -> list[str]:
    """``domain:op`` of every node outside the standard ONNX domains (``""``, ``ai.onnx``), sorted."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return sorted({f"{n.domain}:{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
