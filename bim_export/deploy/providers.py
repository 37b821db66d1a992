"""ONNX Runtime execution providers: each declared once, with what bim-export knows of it.

A profile lists its EPs in fallback order (ONNX Runtime gives each node to the first EP that takes
it, the CPU EP the rest); the schema accepts the registered names. For a phone's accelerator EPs the
declaration also names ONNX Runtime's operator lists (what its mobile usability checker reads, see
:mod:`bim_export.deploy.usability`) and the graph rewrites its op builders need beyond those lists
(see :mod:`bim_export.deploy.rewrite`). A new EP is one :func:`register_provider` call here (and its
test). Pure Python: names are checked without importing onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .registry import Registry


@dataclass(frozen=True)
class ExecutionProvider:
    """One ONNX Runtime execution provider.

    Attributes:
        name: ONNX Runtime's name (``NnapiExecutionProvider``).
        mobile: an ORT Mobile EP (the profile's bundle then ships model.ort for apps).
        checker: ORT's name for the EP in its usability checker (``NNAPI``, ``CoreML``), for an
            accelerator EP whose reach that checker tells; "" for any other.
        op_lists: ORT's supported-operator file per model format (``{"": file}`` where the EP has
            one format); the first is the default.
        format_option: the provider option that picks the model format (CoreML's ``ModelFormat``).
        max_rank: the highest tensor rank the EP takes (ORT's checker applies it), or None.
        passes: graph rewrites (:data:`bim_export.deploy.rewrite.PASS_ORDER`) its op builders need
            beyond what its op list says.
    """

    name: str
    mobile: bool = False
    checker: str = ""
    op_lists: dict[str, str] = field(default_factory=dict)
    format_option: str | None = None
    max_rank: int | None = None
    passes: tuple[str, ...] = ()

    @property
    def accelerator(self) -> bool:
        """Runs a graph on an accelerator of its own (a phone's NPU or GPU) whose reach ORT's mobile
        usability checker tells."""
        return bool(self.checker)

    def checker_list(self, provider_options: dict[str, str] | None = None) -> str:
        """ORT's list checked for this EP with these provider options: ``NNAPI``, ``CoreML MLProgram``."""
        fmt = next(iter(self.op_lists), "")
        if self.format_option:
            fmt = (provider_options or {}).get(self.format_option, fmt)
        return f"{self.checker} {fmt}".strip()


PROVIDERS: Registry[ExecutionProvider] = Registry("execution provider")
register_provider = PROVIDERS.register

# onnxruntime.get_all_providers() of recent releases plus those of builds that left the main list.
for _name in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
              "NvTensorRTRTXExecutionProvider"):
    register_provider(ExecutionProvider(_name))
register_provider(ExecutionProvider("XnnpackExecutionProvider", mobile=True))  # the CPU cores: no list in ORT
# NNAPI builds FULLY_CONNECTED only from 2-D MatMuls (its GemmOpBuilder) and transposes at most 4-D
# tensors (TransposeOpBuilder): limits ORT's op-type checker does not see.
register_provider(ExecutionProvider("NnapiExecutionProvider", mobile=True, checker="NNAPI",
                                    op_lists={"": "nnapi_supported_ops.md"}, passes=("matmul2d", "qkv4d")))
register_provider(ExecutionProvider("CoreMLExecutionProvider", mobile=True, checker="CoreML",
                                    op_lists={"MLProgram": "coreml_supported_mlprogram_ops.md",
                                              "NeuralNetwork": "coreml_supported_neuralnetwork_ops.md"},
                                    format_option="ModelFormat", max_rank=5))  # ORT's check_coreml_partitions
for _name in ("QNNExecutionProvider", "SNPEExecutionProvider", "OpenVINOExecutionProvider",
              "DnnlExecutionProvider", "DmlExecutionProvider", "ACLExecutionProvider", "ArmNNExecutionProvider",
              "ROCMExecutionProvider", "MIGraphXExecutionProvider", "VitisAIExecutionProvider",
              "RknpuExecutionProvider", "VSINPUExecutionProvider", "CANNExecutionProvider", "TvmExecutionProvider",
              "WebGpuExecutionProvider", "WebNNExecutionProvider", "JsExecutionProvider", "AzureExecutionProvider"):
    register_provider(ExecutionProvider(_name))
