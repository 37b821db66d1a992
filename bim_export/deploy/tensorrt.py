"""TensorRT the way Jetson users build it: ``build_engine.sh`` (one ``trtexec`` line) and
``trt_engine.md`` (which TensorRT the graph needs, and how infer.py runs the engine it builds).

- ``--fp16`` / ``--int8`` as the bundle's precision (an int8 graph carries Q/DQ nodes: TensorRT's
  explicit quantization; ``--fp16`` beside it lets the layers outside the Q/DQ pairs run in fp16, as
  infer.py's TensorRT provider does); fp32 builds in fp32.
- ``--shapes=<input>:BxCxHxW`` fixes a dynamic batch axis to the profile's batch (a graph whose batch
  is fixed already takes no shapes).
- ``--memPoolSize=workspace:N`` (MiB, the unit every trtexec since 8.4 reads without a suffix): a
  quarter of the profile's peak-memory budget, as the Triton config's workspace.
- ``--timingCacheFile``: kernel timings kept beside the engine, so a rebuild takes seconds.

Which TensorRT a graph needs follows from its opset and ops (:data:`OP_MINIMUM`, :func:`needed`);
a profile that names an older TensorRT (``tensorrt: "8.5"``) gets LayerNormalization decomposed
(:func:`decompose_layernorm`, applied by :func:`bim_export.deploy.rewrite.form_for`).
Pure Python: the graph is read with onnx inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .triton import workspace_bytes

if TYPE_CHECKING:
    from .profiles import Profile

SCRIPT, NOTES, ENGINE, TIMING_CACHE = "build_engine.sh", "trt_engine.md", "model.engine", "timing.cache"
# The first TensorRT whose ONNX parser takes the op (onnx-tensorrt's operator support per release):
# LayerNormalization (opset 17) maps to INormalizationLayer from 8.6 (older parsers fail on it, e.g.
# on JetPack 5's 8.5); explicit Q/DQ int8 from 8.0.
OP_MINIMUM: dict[str, tuple[int, int]] = {"LayerNormalization": (8, 6), "QuantizeLinear": (8, 0),
                                          "DequantizeLinear": (8, 0)}
# The newest opset each TensorRT line's parser is built for.
OPSET_MINIMUM: tuple[tuple[int, tuple[int, int]], ...] = ((17, (8, 6)), (20, (10, 0)))
LAYERNORM_NATIVE = OP_MINIMUM["LayerNormalization"]


def parse_version(text: str) -> tuple[int, int]:
    """``"8.5"`` -> (8, 5)."""
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def decompose_layernorm(profile: Profile) -> bool:
    """Whether the profile's TensorRT predates the native LayerNormalization (it then gets the op as
    ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, Mul, Add)."""
    return profile.tensorrt is not None and parse_version(profile.tensorrt) < LAYERNORM_NATIVE


def needed(model: Path) -> dict[str, Any]:
    """The oldest TensorRT that parses ``model``, and why: its opset and the ops that raise it."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    ops = sorted({n.op_type for n in m.graph.node if n.domain in ("", "ai.onnx")})
    base = next((v for limit, v in OPSET_MINIMUM if opset <= limit), (10, 0))
    reasons = {f"opset {opset}": base}
    reasons.update({op: OP_MINIMUM[op] for op in ops if op in OP_MINIMUM})
    version = max(reasons.values())
    return {"tensorrt": "%d.%d" % version, "opset": opset, "ops": ops,
            "because": {k: "%d.%d" % v for k, v in reasons.items()},
            "layernorm": "LayerNormalization" if "LayerNormalization" in ops else "decomposed"}


def engine_command(profile: Profile, precision: str, input_name: str, input_shape: list) -> list[str]:
    """The trtexec arguments (the program named by ``$TRTEXEC``)."""
    args = ["--onnx=model.onnx", f"--saveEngine={ENGINE}"]
    args += {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}[precision]
    if input_shape and not isinstance(input_shape[0], int):
        dims = [profile.batch, *input_shape[1:]]
        args.append(f"--shapes={input_name}:{'x'.join(str(d) for d in dims)}")
    args += [f"--timingCacheFile={TIMING_CACHE}", f"--memPoolSize=workspace:{workspace_bytes(profile) >> 20}"]
    return args


def engine_script(profile: Profile, precision: str, input_name: str, input_shape: list) -> str:
    """build_engine.sh: run on the device, from anywhere; extra arguments go to trtexec."""
    args = " \\\n    ".join(engine_command(profile, precision, input_name, input_shape))
    return f"""#!/usr/bin/env bash
# Builds {ENGINE} (TensorRT) from model.onnx on the device it will run on: an engine is specific to
# the GPU and the TensorRT version that built it. JetPack installs trtexec in /usr/src/tensorrt/bin.
# Then: python infer.py IMAGES --engine {ENGINE}
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
"$TRTEXEC" \\
    {args} \\
    "$@"
"""


def engine_notes(profile: Profile, precision: str, need: dict[str, Any], command: list[str]) -> str:
    """trt_engine.md: the TensorRT the graph needs, how to build the engine, how infer.py runs it."""
    shapes = "".join(f"{a} " for a in command if a.startswith("--shapes="))
    because = "\n".join(f"- {k}: TensorRT >= {v}" for k, v in need["because"].items())
    named = f"The profile names TensorRT {profile.tensorrt}." if profile.tensorrt else \
        "The profile names no TensorRT version (it is taken to be 8.6 or later)."
    layernorm = ("LayerNormalization ships as one op (opset 17; TensorRT parses it from 8.6)."
                 if need["layernorm"] == "LayerNormalization" else
                 "LayerNormalization ships decomposed (ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, Div, Mul, Add), "
                 "which every TensorRT parses; TensorRT 8.6+ fuses the pattern back.")
    return f"""# TensorRT engine for {profile.name}

The graph needs **TensorRT >= {need['tensorrt']}**: opset {need['opset']}, {precision}.

{because}

{named} {layernorm}
Set `tensorrt: "8.5"` (the version of your JetPack's TensorRT) in a copy of the profile to get the
decomposed form for an older TensorRT.

## Build the engine (on the device)

    bash build_engine.sh            # trtexec {' '.join(command)}

An engine is tied to the GPU and the TensorRT version that built it: build it on the device, and
again after a JetPack upgrade. `{TIMING_CACHE}` keeps kernel timings, so a rebuild takes seconds.
`--memPoolSize=workspace:{workspace_bytes(profile) >> 20}` (MiB) is a quarter of the profile's
peak-memory budget.

## Run it

    python infer.py IMAGES --engine {ENGINE}

infer.py then runs the engine through the `tensorrt` Python module (JetPack's `python3-libnvinfer`)
instead of ONNX Runtime's TensorRT execution provider: same preprocessing, same outputs, same
report. Without the module it stops with one line saying so. Without `--engine` it runs model.onnx
on ONNX Runtime (TensorRT provider, then CUDA, then CPU) as before.

## Check it

    polygraphy inspect model model.onnx                      # the ops TensorRT will see
    polygraphy run model.onnx --trt --onnxrt --fp16          # TensorRT vs ONNX Runtime outputs
    trtexec --loadEngine={ENGINE} {shapes}--iterations=500   # engine latency on the device
"""


def write_engine_files(root: Path, profile: Profile, precision: str, model: Path) -> dict[str, Any]:
    """Writes build_engine.sh and trt_engine.md into ``root`` for ``model`` (the bundle's model.onnx)
    and returns the manifest section."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    first = graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
             for d in first.type.tensor_type.shape.dim]
    command = engine_command(profile, precision, first.name, shape)
    need = needed(model)
    script = root / SCRIPT  # run as `bash build_engine.sh`: like every bundle file, its mode is the umask's
    script.write_text(engine_script(profile, precision, first.name, shape), encoding="utf-8")
    (root / NOTES).write_text(engine_notes(profile, precision, need, command), encoding="utf-8")
    return {"script": SCRIPT, "notes": NOTES, "engine": ENGINE, "trtexec": command, "needs": need,
            "profile_tensorrt": profile.tensorrt}
