"""Which of a graph's nodes a phone's accelerator takes: ONNX Runtime's mobile usability checker.

ONNX Runtime ships the checker behind ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``
(``onnxruntime.tools.mobile_helpers.usability_checker``), with the operator lists of its NNAPI and
CoreML execution providers (``nnapi_supported_ops.md``, ``coreml_supported_mlprogram_ops.md``,
``coreml_supported_neuralnetwork_ops.md``). :func:`check_model` runs the same steps in process:
the graph optimized at ORT's BASIC level (what a session does before it hands nodes to an EP), ONNX
shape inference, then ORT's partitioning of the nodes whose op the EP lists and whose inputs have
fixed shapes. Per EP it returns the partitions, the node coverage, the ops it lacks and ORT's verdict
("should perform well as is": YES / MAYBE / NO).

The checker judges op types and shapes; the caveats it lists per op (2-D Conv only, constant
weights, ...) are not checked by it and are kept in the result. XNNPACK has no list in ORT and runs
on the CPU cores, so it is not an accelerator here.

onnx + onnxruntime only; no torch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .profiles import Profile

from .providers import PROVIDERS, ExecutionProvider

log = logging.getLogger(__name__)

# An accelerator "takes" a graph when it runs nearly all of it in at most two partitions: ORT's
# checker calls more partitions "not recommended" (each boundary is a device copy), and the nodes
# left to the CPU must be few for one device's figures to predict the whole run.
MIN_COVERAGE = 0.99
MAX_PARTITIONS = 2


@dataclass
class EpCoverage:
    """How much of a graph one accelerator EP takes, as ORT's usability checker sees it.

    Attributes:
        ep: the execution provider (``NnapiExecutionProvider``).
        checker: ORT's name for the list checked (``NNAPI``, ``CoreML MLProgram``).
        nodes: nodes of the graph after ORT's BASIC optimization.
        supported: nodes the EP takes (op listed and inputs of fixed shape).
        partitions: groups the supported nodes fall into; each boundary is a copy to / from the EP.
        partition_sizes: nodes per partition.
        unsupported_ops: ``domain:op`` of the ops the EP does not list.
        dynamic_shape_nodes: nodes rejected because an input's shape is not fixed.
        rank_nodes: nodes rejected for their input's rank (CoreML: above 5).
        verdict: ORT's "should perform well with the EP as is": YES, MAYBE or NO.
        caveats: ORT's per-op caveats for the ops taken, which its checker does not verify.
    """

    ep: str
    checker: str
    nodes: int
    supported: int
    partitions: int
    partition_sizes: list[int] = field(default_factory=list)
    unsupported_ops: list[str] = field(default_factory=list)
    dynamic_shape_nodes: int = 0
    rank_nodes: int = 0
    verdict: str = "NO"
    caveats: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """Fraction of the nodes the EP takes."""
        return self.supported / self.nodes if self.nodes else 0.0

    @property
    def takes(self) -> bool:
        """Whether the EP runs the graph: >= 99 % of its nodes in at most 2 partitions."""
        return self.coverage >= MIN_COVERAGE and 0 < self.partitions <= MAX_PARTITIONS

    def brief(self) -> str:
        """``NNAPI 100.0 % in 1 partition (YES)``, with what it lacks when it does not take all."""
        text = (f"{self.checker} {self.coverage:.1%} of {self.nodes} nodes in {self.partitions} "
                f"partition{'s' if self.partitions != 1 else ''} ({self.verdict})")
        missing = [op.split(":")[-1] for op in self.unsupported_ops]
        if self.dynamic_shape_nodes:
            missing.append(f"{self.dynamic_shape_nodes} nodes with dynamic shapes")
        if self.rank_nodes:
            missing.append(f"{self.rank_nodes} nodes of rank > {_provider(self.ep).max_rank}")
        return text + (f"; lacks {', '.join(missing)}" if missing else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "coverage": self.coverage, "takes": self.takes}


def _provider(ep: str) -> ExecutionProvider:
    return PROVIDERS.get(ep) or ExecutionProvider(ep)


def checked_eps(profile: Profile) -> list[str]:
    """The profile's EPs that ORT's checker knows (its accelerator EPs: NNAPI, CoreML), in the
    profile's order."""
    return [ep for ep in profile.execution_providers if _provider(ep).accelerator]


def is_mobile(profile: Profile) -> bool:
    """Whether the profile targets ORT Mobile (lists NNAPI, CoreML or XNNPACK)."""
    return any(_provider(ep).mobile for ep in profile.execution_providers)


def checker_name(profile: Profile, ep: str) -> str:
    """ORT's list for ``ep`` on this profile: ``NNAPI``, or CoreML by its ``ModelFormat`` option."""
    return _provider(ep).checker_list(profile.provider_options.get(ep))


def op_lists() -> dict[str, str]:
    """ORT's operator list file by checker name (``CoreML MLProgram``), for every accelerator EP."""
    return {f"{e.checker} {fmt}".strip(): file for e in PROVIDERS if e.accelerator for fmt, file in e.op_lists.items()}


def _op_list_path(checker: str) -> Path:
    from onnxruntime.tools.mobile_helpers import usability_checker

    return Path(usability_checker.__file__).parent / op_lists()[checker]


@lru_cache(maxsize=None)
def supported_ops(checker: str) -> frozenset[str]:
    """``domain:op`` names that ORT's list for ``checker`` (``NNAPI``, ``CoreML MLProgram``) holds."""
    from onnxruntime.tools.mobile_helpers.usability_checker import _SupportedOpsChecker

    # ORT's own reader of its list (its table of op -> caveat), so both sides read the file alike
    return frozenset(_SupportedOpsChecker(str(_op_list_path(checker)))._ops)


def check_model(path: str | Path, profile: Profile) -> dict[str, EpCoverage]:
    """ORT's usability check of an ONNX file for each of the profile's accelerator EPs.

    Returns:
        ``{ep: EpCoverage}`` for the EPs of :func:`checked_eps` (empty for a profile without any).
    """
    eps = checked_eps(profile)
    if not eps:
        return {}
    import onnx
    from onnxruntime.tools.mobile_helpers.usability_checker import _SupportedOpsChecker, check_partitioning
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory(prefix="bim-usability-") as tmp:
        optimized = Path(tmp) / "basic.onnx"
        # what ORT's analyze_model does first: the graph as a session sees it before partitioning
        optimize_model(Path(path), optimized, use_external_initializers=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(optimized)), strict_mode=True)
    out = {}
    for ep in eps:
        checker, max_rank = checker_name(profile, ep), _provider(ep).max_rank
        ops = _SupportedOpsChecker(str(_op_list_path(checker)))
        info = check_partitioning(model.graph, ops, require_fixed_input_sizes=True, max_rank=max_rank or 999)
        out[ep] = EpCoverage(
            ep=ep, checker=checker, nodes=info.num_nodes, supported=info.num_supported_nodes,
            partitions=info.num_partitions, partition_sizes=[len(g) for g in info.supported_groups],
            unsupported_ops=sorted(info.unsupported_ops),
            dynamic_shape_nodes=info.nodes_unsupported_due_to_dynamic_input,
            rank_nodes=info.num_unsupported_nodes_due_to_rank, verdict=info.suitability().name,
            caveats=ops.get_caveats())
    return out


def runs_on(coverage: dict[str, EpCoverage]) -> str | None:
    """The first accelerator EP that takes the graph (see :attr:`EpCoverage.takes`), or None: the CPU."""
    return next((ep for ep, c in coverage.items() if c.takes), None)
