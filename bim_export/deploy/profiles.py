"""Device profiles: the YAML schema, loading by name, alias or file, and their text forms.

A profile says what a device can run (execution providers, opset, precisions, batch), what the
latency predictor needs to know about its hardware, and the budgets and parity tolerances an export
for it must meet. Canonical names are the file stems in the shipped ``profiles/`` folder; a user adds
a device by copying a YAML file and passing its path. Every problem with a profile is raised as one
:class:`~bim_export.core.errors.InputError` line naming the file, the field and the value.

Pure Python (pyyaml + pydantic): no torch or onnxruntime import.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..core.errors import InputError, close_matches
from ..runtime.machine import CPU_FLAGS
from ..core.resources import resource_dir
from .device_scripts import SCRIPTS
from .presets import PRESETS, schema_names
from .providers import PROVIDERS
from .registry import one_of
from .schema_errors import FieldError, describe_validation_error, short_value

PRECISIONS = ("fp32", "fp16", "int8")
# DRAM kinds a profile may name (hardware.memory_type); `profiles check` knows each one's fastest rate.
MEMORY_TYPES = ("DDR4", "DDR5", "LPDDR4", "LPDDR4X", "LPDDR5", "LPDDR5X", "GDDR6", "GDDR6X", "GDDR7", "HBM2", "HBM2e",
                "HBM3", "HBM3e")

# Short names for the shipped profiles; outputs always use the canonical name they resolve to.
ALIASES: dict[str, str] = {
    "jetson": "jetson-orin-nano",
    "mobile": "android-snapdragon-8-gen-2",
    "edge-cpu": "raspberry-pi-5",
    "server-gpu": "h100-sxm",
    "server-cpu": "xeon-sapphire-rapids",
    "iphone": "iphone-15-pro",
}

Precision = Literal["fp32", "fp16", "int8"]  # the members of PRECISIONS
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class PeakCompute(_Strict):
    """Peak throughput of the compute the execution providers use, per precision."""

    fp32: Optional[float] = Field(None, gt=0, description="peak fp32 GFLOP/s")
    fp16: Optional[float] = Field(None, gt=0, description="peak fp16 GFLOP/s (tensor cores where the EP uses them)")
    int8: Optional[float] = Field(None, gt=0, description="peak int8 GOP/s (dense, no sparsity)")


class HardwareFigures(_Strict):
    """Figures the latency predictor uses; each has a source comment in the YAML file."""

    peak_gflops: PeakCompute = Field(description="peak compute per precision")
    mem_bandwidth_gbs: float = Field(gt=0, description="peak DRAM bandwidth in GB/s")
    memory_gb: float = Field(gt=0, description="memory the model can use in GB (shared with the CPU on SoCs)")
    cores: int = Field(gt=0, description="compute units: CPU cores the EP runs on, or GPU SMs")
    launch_overhead_us: float = Field(ge=0, description="fixed cost per graph node in microseconds "
                                                        "(kernel launch / op dispatch); GPUs are launch-bound at batch 1")
    power_w: Optional[float] = Field(None, gt=0, description="the chip's or module's power envelope in W (TDP, or the "
                                                             "power mode the figures are for); optional, lets "
                                                             "`profiles check` judge compute per watt")
    memory_type: Optional[Literal[MEMORY_TYPES]] = Field(  # type: ignore[valid-type]
        None, description="the DRAM kind behind mem_bandwidth_gbs; optional, lets `profiles check` judge the bandwidth")


class DeviceIdentity(_Strict):
    """Which machines are the profile's device: `calibrate` and `validate --check-latency` refuse any
    other (without --force). Rules: bim_export.machine.device_mismatches; a field left out is not checked."""

    architecture: Optional[Literal["x86_64", "aarch64"]] = Field(None, description="the CPU's instruction set")
    cpu: Optional[str] = Field(None, min_length=2, description="occurs in the CPU's model name, Arm core name or "
                                                               "board model (case, spaces and punctuation ignored)")
    accelerator: Optional[str] = Field(None, min_length=2, description="occurs in a GPU's name or the board model")
    cpu_flags: list[str] = Field(default_factory=list, description="CPU flags the device has (from "
                                                                   "bim_export.runtime.machine.CPU_FLAGS)")
    logical_cores: Optional[int] = Field(None, gt=0, description="logical CPUs the OS reports (os.cpu_count())")

    @field_validator("cpu_flags")
    @classmethod
    def _known_flags(cls, flags: list[str]) -> list[str]:
        for i, flag in enumerate(flags):
            if flag not in CPU_FLAGS:
                raise FieldError(("device", "cpu_flags", i), f"is not a recorded CPU flag (got {flag!r}); valid: "
                                                    f"{', '.join(CPU_FLAGS)}", None)
        return flags

    @model_validator(mode="after")
    def _says_something(self) -> "DeviceIdentity":
        if not (self.architecture or self.cpu or self.accelerator):
            raise ValueError("needs at least one of architecture, cpu, accelerator")
        return self


class Budgets(_Strict):
    """What an export must meet on the device; a budget left out is not checked."""

    latency_ms: Optional[float] = Field(None, gt=0, description="latency budget in ms at the profile's batch")
    latency_stat: Literal["p50", "p90", "p99"] = Field("p90", description="statistic the latency budget applies to")
    peak_memory_mb: Optional[float] = Field(None, gt=0, description="peak memory of the inference session in MB")
    model_size_mb: Optional[float] = Field(None, gt=0, description="ONNX model file size in MB (10^6 bytes)")


class ParityTolerance(_Strict):
    """Minimum agreement of ONNX Runtime outputs with PyTorch for one precision."""

    cosine: float = Field(0.995, gt=0, le=1, description="minimum cosine similarity of the embeddings")
    neighbour_agreement: float = Field(0.99, ge=0, le=1,
                                       description="minimum fraction of kNN top-1 predictions that agree")
    top1_agreement: float = Field(0.99, ge=0, le=1,
                                  description="of a classifier: minimum fraction of images whose top-1 class "
                                              "(argmax of the logits) agrees")


class ParityTolerances(_Strict):
    """Parity tolerances per precision (defaults: cosine >= 0.995, neighbour agreement >= 0.99, a
    classifier's top-1 agreement >= 0.99)."""

    fp32: ParityTolerance = Field(default_factory=ParityTolerance, description="fp32 tolerances")
    fp16: ParityTolerance = Field(default_factory=ParityTolerance, description="fp16 tolerances")
    int8: ParityTolerance = Field(default_factory=ParityTolerance, description="int8 tolerances")


class Profile(_Strict):
    """One deployment target: a device and the budgets an export for it must meet."""

    name: str = Field("", description="canonical name: the file stem (filled by the loader)")
    description: str = Field(description="the device in a line")
    device_class: Literal["cpu", "gpu", "mobile", "edge"] = Field(
        description="cpu: server/desktop CPU; gpu: CUDA GPU, datacenter or embedded (Jetson); "
                    "mobile: phone SoC CPU; edge: single-board computer CPU")
    target_script: str = Field(
        "cpu", description=f"inference script from targets/ that goes into the bundle ({', '.join(SCRIPTS.names())})")
    hardware: Optional[HardwareFigures] = Field(None, description="figures for latency prediction; "
                                                           "may be left out only for a measured profile")
    device: Optional[DeviceIdentity] = Field(
        None, description="which machines are this device (for calibrate and validate --check-latency); left out: "
                          "none is, and both need --force (a measured profile is every machine running the command)")
    execution_providers: list[str] = Field(min_length=1, description="ONNX Runtime EPs in fallback order")
    threads: Optional[int] = Field(None, gt=0, description="intra-op threads of the session (default: all cores)")
    opset: int = Field(17, ge=13, le=30, description="ONNX opset the device's runtime supports")
    precisions: list[Precision] = Field(min_length=1, description="precisions allowed on the device")
    resolutions: Optional[list[int]] = Field(
        None, min_length=1, description="input sizes (px, square) whose candidates compete, each a multiple of the "
                                        "checkpoint's patch size; default: the checkpoint's own img_size only")
    int8_preset: Optional[str] = Field(
        None, description=f"quantization preset for int8 ({', '.join(schema_names())}; see "
                          "bim_export.deploy.presets); none: onnxruntime.quantization defaults")
    batch: int = Field(1, gt=0, description="input batch the latency budget applies to")
    fixed_batch: Optional[bool] = Field(
        None, description="fix the graph's batch axis to `batch` (NNAPI and CoreML take only fixed shapes); "
                          "default: true for device_class mobile, false otherwise")
    dynamic_batch_file: bool = Field(False, description="also ship model.dynamic.onnx: the same graph and precision "
                                                        "with a dynamic batch axis (needs a fixed batch)")
    provider_options: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="ONNX Runtime provider options per execution provider, as the device's "
                                          "session sets them (e.g. CoreML's ModelFormat: MLProgram)")
    accelerators: dict[str, HardwareFigures] = Field(
        default_factory=dict, description="figures of the device an accelerator EP (NNAPI, CoreML) runs on; a "
                                          "candidate the EP takes whole is predicted on them, any other on `hardware`")
    triton: Optional[bool] = Field(None, description="ship a Triton Inference Server model repository in the bundle "
                                                    "(triton/<model>/); default: true for device_class gpu")
    tensorrt: Optional[str] = Field(None, pattern=r"^[0-9]+\.[0-9]+$",
                                    description="TensorRT version on the device, quoted (\"8.5\"): below 8.6 "
                                                "LayerNormalization ships decomposed; default: 8.6 or later")
    budgets: Budgets = Field(default_factory=Budgets, description="latency, memory and size budgets")
    parity: ParityTolerances = Field(default_factory=ParityTolerances, description="parity tolerances per precision")
    measured: bool = Field(False, description="latency measured on the machine running the command "
                                              "(host), not predicted")

    _path: Optional[Path] = PrivateAttr(None)

    @property
    def path(self) -> Optional[Path]:
        """The YAML file this profile was loaded from."""
        return self._path

    @property
    def batch_is_fixed(self) -> bool:
        """Whether the exported graph's batch axis is fixed to :attr:`batch`."""
        return self.device_class == "mobile" if self.fixed_batch is None else self.fixed_batch

    @property
    def serves_triton(self) -> bool:
        """Whether the bundle carries a Triton model repository."""
        return self.device_class == "gpu" if self.triton is None else self.triton

    @property
    def uses_gpu(self) -> bool:
        """Whether the model runs on a GPU (prediction is then launch-bound at small batch)."""
        return self.device_class == "gpu"

    @field_validator("target_script", mode="before")
    @classmethod
    def _registered_script(cls, name: Any) -> Any:
        if name not in SCRIPTS:
            raise FieldError(("target_script",), f"must be one of {one_of(SCRIPTS.names())}", name)
        return name

    @field_validator("int8_preset", mode="before")
    @classmethod
    def _registered_preset(cls, name: Any) -> Any:
        if name is not None and name not in PRESETS:
            raise FieldError(("int8_preset",), f"must be one of {one_of(schema_names())}", name)
        return name

    @field_validator("execution_providers")
    @classmethod
    def _known_eps(cls, eps: list[str]) -> list[str]:
        for i, ep in enumerate(eps):
            if ep not in PROVIDERS:
                hint = _ep_hint(ep)
                raise FieldError(("execution_providers", i),
                                  f"is not an ONNX Runtime execution provider (got {ep!r}); {hint}", None)
        if len(set(eps)) != len(eps):
            raise ValueError(f"lists an execution provider twice ({', '.join(eps)})")
        return eps

    @field_validator("precisions")
    @classmethod
    def _unique_precisions(cls, precisions: list[str]) -> list[str]:
        if len(set(precisions)) != len(precisions):
            raise ValueError(f"lists a precision twice ({', '.join(precisions)})")
        return precisions

    @field_validator("resolutions")
    @classmethod
    def _positive_resolutions(cls, sizes: Optional[list[int]]) -> Optional[list[int]]:
        if sizes is not None and (any(r <= 0 for r in sizes) or len(set(sizes)) != len(sizes)):
            raise ValueError(f"must be distinct sizes in px, each > 0 (got {sizes})")
        return sizes

    @model_validator(mode="after")
    def _eps_named_exist(self) -> "Profile":
        for field in ("provider_options", "accelerators"):
            for ep in getattr(self, field):
                if ep not in self.execution_providers:
                    raise FieldError((field, ep), f"names an execution provider the profile does not list "
                                                   f"({', '.join(self.execution_providers)})", None)
        accelerator_eps = PROVIDERS.names(lambda e: e.accelerator)
        for ep in self.accelerators:
            if ep not in accelerator_eps:
                raise FieldError(("accelerators", ep), f"must be one of {', '.join(accelerator_eps)}: the EPs whose "
                                                        "reach ONNX Runtime's usability checker tells", None)
        if self.dynamic_batch_file and not self.batch_is_fixed:
            raise FieldError(("dynamic_batch_file",), "needs a fixed batch (fixed_batch: true): the model is "
                                                       "already dynamic", None)
        return self

    @model_validator(mode="after")
    def _hardware_covers_precisions(self) -> "Profile":
        if self.hardware is None:
            if not self.measured:
                raise FieldError(("hardware",), "is required unless measured is true", None)
            return self
        for p in self.precisions:
            if getattr(self.hardware.peak_gflops, p) is None:
                raise FieldError(("hardware", "peak_gflops", p),
                                  f"is required because precisions lists {p}", None)
        return self

    def tolerance(self, precision: str) -> ParityTolerance:
        """The parity tolerances for ``precision``."""
        return getattr(self.parity, precision)


def _ep_hint(ep: str) -> str:
    """'did you mean X?' for an unknown EP name (case and the suffix ignored), else the valid names."""
    suffix = "executionprovider"
    base = {k.lower().removesuffix(suffix): k for k in PROVIDERS.names()}
    wanted = ep.lower().removesuffix(suffix)
    close = [base[wanted]] if wanted in base else \
        [base[c] for c in difflib.get_close_matches(wanted, list(base), n=2, cutoff=0.6)]
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"valid: {', '.join(sorted(PROVIDERS.names()))}"


# ------------------------------------------------------------------------------------ loading


def profiles_dir() -> Path:
    """The folder of shipped profiles."""
    return resource_dir("profiles")


def list_profiles() -> list[str]:
    """Canonical names of the shipped profiles, sorted."""
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def aliases_of(name: str) -> list[str]:
    """The aliases that resolve to canonical ``name``."""
    return sorted(a for a, target in ALIASES.items() if target == name)


def resolve_name(name: str) -> str:
    """Canonical name of a shipped profile name or alias; unknown names raise InputError."""
    valid = list_profiles()
    canonical = ALIASES.get(name, name)
    if canonical not in valid:
        raise InputError(f"unknown profile '{name}'; {close_matches(name, valid + list(ALIASES))}")
    return canonical


def load_profile(name_or_path: Union[str, os.PathLike, Profile]) -> Profile:
    """Loads a profile by canonical name, alias, or YAML file path.

    Raises:
        InputError: unknown name (valid ones and close matches listed) or an invalid file.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    text = os.fspath(name_or_path)
    looks_like_path = isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
    if looks_like_path:
        return load_profile_file(Path(text))
    return load_profile_file(profiles_dir() / f"{resolve_name(text)}.yaml")


def load_profile_file(path: Union[str, os.PathLike]) -> Profile:
    """Loads and validates one profile YAML file; its name is the file stem."""
    path = Path(path)
    shown = _display(path)
    if not path.is_file():
        raise InputError(f"{shown}: profile file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = _yaml_error_mark(e)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"{shown}:{where} broken YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{shown}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{shown}: a profile must be a mapping of fields (got {short_value(data)})")
    if not _NAME.fullmatch(path.stem):
        raise InputError(f"{shown}: the file name is the profile name and names its export folder: "
                         f"use letters, digits, '.', '_' and '-' only (got {path.stem!r})")
    if "name" in data and data["name"] != path.stem:
        raise InputError(f"{shown}: name must match the file name '{path.stem}' (got {short_value(data['name'])})")
    data = {**data, "name": path.stem}
    try:
        profile = Profile.model_validate(data)
    except pydantic.ValidationError as e:
        raise InputError(f"{shown}: {describe_validation_error(e, Profile)}") from None
    profile._path = path
    return profile


def _yaml_error_mark(e: yaml.YAMLError):
    """Where a YAML error is (0-based lines). A key without its ':' is found only on the next line
    ("while scanning a simple key ... could not find expected ':'"): the key's own line is the context."""
    if getattr(e, "context", None) == "while scanning a simple key" and getattr(e, "context_mark", None) is not None:
        return e.context_mark
    return getattr(e, "problem_mark", None)


def _display(path: Path) -> str:
    """How a profile file is named in messages: shipped ones as profiles/NAME.yaml."""
    if path.resolve().parent == profiles_dir().resolve():
        return f"profiles/{path.name}"
    return str(path)
