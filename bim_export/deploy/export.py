"""Backbone -> ONNX: one graph per depth, or one graph with an output per exit.

The ONNX contract (docs/design.md): input ``pixels`` [batch, 3, H, W] float32, normalized as in the
checkpoint's config; outputs ``tokens`` [batch, N, D] (after the exit's norm) and ``embedding``
[batch, D] (the backbone's own pooling, ``forward_head(pre_logits=True)``), and for a fine-tuned
backbone (one with a head) ``logits`` [batch, classes] after them; the batch axis is dynamic and named
``batch``; ``metadata_props`` describe the source (depth, exits, profile, precision, mean, std,
exporter, bim_export version; a classifier's ``labels`` as a JSON list).

Exporter choice (torch 2.14, timm ViTs): ``torch.onnx.export(..., dynamo=True)`` (torch.export +
onnxscript). Both exporters still work and give the same outputs (max abs error ~5e-6 on ViT-S/16),
but the dynamo graph has half the nodes (502 vs 954 for ViT-S: the TorchScript exporter leaves shape
arithmetic, Identity and Constant nodes that onnxscript's optimizer folds), names the dynamic axis
``batch`` on every output (TorchScript invents ``LayerNormalizationtokens_dim_0``), and is the
exporter torch maintains (the TorchScript one is deprecated). ONNX Runtime's own graph optimizer
folds the TorchScript leftovers at session start, so run time did not differ beyond this shared
machine's noise (bench/export_latency.py times timm's TorchScript default beside ours). The dynamo
exporter's cost is export time (3-10 s vs 0.3-4 s).

Opsets: torch's ONNX ops are written for opset 18, and the profiles ask for 17 (the device runtimes
they name). The exporter's own down-conversion runs before constant folding, where an avg-pooled
ViT's ``ReduceMean`` takes its axes (an input since opset 18) from a ``Reshape`` node that the
converter cannot move back into the attribute opset 17 wants; it then keeps opset 18. So the graph
is exported at 18, folded, and converted here with ``onnx.version_converter`` (the axes are then a
constant). A ViT uses no op whose meaning changed between 17 and 18; the converted graph is
full-checked, and the pipeline checks its parity against PyTorch like any candidate. Opset 23
turns attention into the fused ``Attention`` op.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.errors import BimExportError, InputError

log = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAMES = ("tokens", "embedding")
LOGITS = "logits"  # a classifier's third output
BATCH_AXIS = "batch"
EXPORTER_OPSET = 18  # the opset torch's ONNX ops are written for; lower ones are converted down
_PROTOBUF_LIMIT = 2 * 1024**3  # a ModelProto above 2 GB cannot be serialized in one piece


def output_names(exits: list[int] | None = None, logits: bool = False) -> list[str]:
    """The graph's output names: ``tokens, embedding`` (``, logits`` with a head), or
    ``tokens_<d>, embedding_<d>`` (``, logits_<d>``) per exit."""
    names = (*OUTPUT_NAMES, LOGITS) if logits else OUTPUT_NAMES
    if not exits:
        return list(names)
    return [f"{name}_{d}" for d in exits for name in names]


def has_head(backbone) -> bool:
    """Whether a timm ViT backbone carries a classification head (a fine-tuned checkpoint's)."""
    return int(getattr(backbone, "num_classes", 0) or 0) > 0


def export_onnx(
    backbone,
    path: str | os.PathLike,
    *,
    opset: int,
    img_size: int | tuple[int, int],
    metadata: Mapping[str, object] | None = None,
    multi_exit: bool = False,
    exits: Mapping[int, object] | None = None,
) -> Path:
    """Exports a timm ViT backbone (or several exits of one) to a checked ONNX file.

    Args:
        backbone: a timm ``VisionTransformer``, e.g. from ``backbone.build_backbone(ckpt, depth)``;
            with a head (``num_classes > 0``, a fine-tuned checkpoint's) the graph also outputs
            ``logits``. With ``multi_exit``, the deepest backbone: its patch embedding and blocks are
            shared by every exit.
        path: the ``.onnx`` file to write (its folder must exist). Written under a temporary name and
            renamed when checked, so a failure leaves no file that looks finished.
        opset: the ONNX opset of the graph (the profile's).
        img_size: input height and width (int for square).
        metadata: stored as ``metadata_props`` (values that are not strings as JSON), e.g. depth,
            exits, profile, precision, mean, std. ``exporter`` and ``bim_export_version`` are added.
        multi_exit: write one graph with outputs ``tokens_<d>``, ``embedding_<d>`` (and ``logits_<d>``)
            for every exit.
        exits: with ``multi_exit``, ``{depth: backbone of that depth}``: each exit's norm and pooling
            come from its own backbone, the blocks from ``backbone``.

    Returns:
        The path written.

    Raises:
        InputError: multi-exit without exits, or exits deeper than ``backbone``.
        BimExportError: the exporter could not produce a valid graph at this opset.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if multi_exit:
        if not exits:
            raise InputError("multi-exit export needs the exit backbones ({depth: backbone})")
        module = MultiExit(backbone, dict(exits))
        names = output_names(sorted(exits), module.logits)
    else:
        module = SingleExit(backbone)
        names = output_names(None, has_head(backbone))
    meta = dict(metadata or {})
    if multi_exit:
        meta.setdefault("graph_exits", sorted(exits))
    # batch 2, not 1: torch.export specializes a dimension whose example size is 1
    example = torch.zeros(2, 3, h, w, dtype=torch.float32)
    return export_graph(module, example, path, input_name=INPUT_NAME, output_names=names, opset=opset, metadata=meta)


def export_graph(module, example, path: str | os.PathLike, *, input_name: str, output_names: list[str],
                 opset: int, metadata: Mapping[str, object] | None = None) -> Path:
    """Exports a module of one batched input to a checked ONNX file as :func:`export_onnx` does (the
    batch axis dynamic and named ``batch``, converted to ``opset``, ``metadata_props`` stamped),
    for graphs outside the backbone contract (an early-exit segment takes another segment's tokens).

    Args:
        module: the ``torch.nn.Module`` to export (put in eval mode here).
        example: an input of the right shape, batch >= 2 (torch.export specializes a size-1 axis).
        path: the ``.onnx`` file to write (written atomically, full-checked).
        input_name, output_names: the graph's input and output names.
        opset: the ONNX opset of the graph.
        metadata: ``metadata_props``; ``exporter`` and ``bim_export_version`` are added.

    Raises:
        BimExportError: the exporter could not produce a valid graph at this opset.
    """
    from .. import __version__

    path = Path(path)
    module.eval()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in dict(metadata or {}).items()}
    meta.setdefault("exporter", f"torch.onnx.export(dynamo=True) torch {torch.__version__}")
    meta.setdefault("bim_export_version", __version__)
    arg = next(iter(inspect.signature(module.forward).parameters))
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module, (example,), input_names=[input_name], output_names=list(output_names),
            dynamic_shapes={arg: {0: torch.export.Dim(BATCH_AXIS)}},
            opset_version=max(opset, EXPORTER_OPSET), dynamo=True, optimize=True, verbose=False,
        )
    proto = program.model_proto
    exported = _onnx_opset(proto)
    if exported > opset:
        proto = convert_opset(proto, opset)
        meta["exporter"] += f", opset {exported} converted to {opset} by onnx.version_converter"
    if _onnx_opset(proto) != opset:
        raise BimExportError(f"the ONNX exporter produced opset {_onnx_opset(proto)}, not the requested {opset}")
    set_metadata(proto, meta)
    proto.producer_name = "bim-export"
    save_checked(proto, path)
    return path


def _onnx_opset(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def convert_opset(proto, opset: int):
    """The graph converted down to ``opset`` with ``onnx.version_converter``.

    Weights above 1 KB are held out of the converter's copy (it serializes the model, and a
    ModelProto above 2 GB cannot be), then put back.

    Raises:
        BimExportError: the graph uses an op that ``opset`` cannot express.
    """
    import onnx
    from onnx import version_converter

    exported = _onnx_opset(proto)
    held = _hold_weights(proto)
    try:
        converted = version_converter.convert_version(proto, opset)
    except (RuntimeError, ValueError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BimExportError(f"the exported graph (opset {exported}) cannot be converted to opset {opset} "
                             f"({reason}); the profile needs a higher opset") from e
    finally:
        _restore_weights(proto, held)
    if _restore_weights(converted, held) != len(held):  # the converter renamed or dropped a weight
        raise BimExportError(f"the opset {opset} graph from onnx {onnx.__version__}'s converter lost weights")
    if opset < 18:
        for node in converted.graph.node:
            _drop_empty_axes_attribute(node, opset)
    return converted


def _drop_empty_axes_attribute(node, opset: int) -> None:
    """Opset 18 gave the Reduce ops but ReduceSum (which had it since 13) ``noop_with_empty_axes``;
    onnx's converter leaves it on the opset-17 node, where the checker rejects it. Its default 0 is
    what opset 17 does, so it goes."""
    if not node.op_type.startswith("Reduce") or node.op_type == "ReduceSum" or node.domain not in ("", "ai.onnx"):
        return
    for i, attr in enumerate(node.attribute):
        if attr.name == "noop_with_empty_axes":
            if attr.i:
                raise BimExportError(f"{node.op_type} node {node.name} needs noop_with_empty_axes, which "
                                     f"opset {opset} lacks; choose opset >= 18 in the profile")
            del node.attribute[i]
            return


_HELD = "held-out-of-the-converter"  # external-data location of a weight kept in memory meanwhile


def _hold_weights(proto) -> dict[str, bytes]:
    import onnx

    held = {}
    for t in proto.graph.initializer:
        if len(t.raw_data) > 1024:
            held[t.name] = t.raw_data
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=_HELD)
    return held


def _restore_weights(proto, held: dict[str, bytes]) -> int:
    import onnx

    restored = 0
    for t in proto.graph.initializer:
        if t.name in held and any(e.key == "location" and e.value == _HELD for e in t.external_data):
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = held[t.name]
            restored += 1
    return restored


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs every step and warns about what it works around; the checks after it
    (opset, onnx.checker, the pipeline's parity) are what tell whether it worked. A caller that asked
    for the libraries' debug records (``bim-export -vv``) gets them all."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    wanted = logging.getLogger("onnxscript").isEnabledFor(logging.DEBUG)
    try:
        for lg in loggers:
            lg.setLevel(logging.DEBUG if wanted else logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("default" if wanted else "ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def set_metadata(proto, meta: Mapping[str, object]) -> None:
    """Replaces a model's ``metadata_props`` with ``meta`` (sorted; values that are not strings as
    JSON): the one writer of ONNX metadata in bim-export."""
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        proto.metadata_props.add(key=str(key), value=value if isinstance(value, str) else json.dumps(value))


def save_checked(proto, path: Path) -> None:
    """Full-checks the model and writes it atomically; weights > 2 GB go to ``<name>.data``."""
    import onnx

    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weights > _PROTOBUF_LIMIT - 64 * 1024**2  # margin for the graph itself
    from ..core.atomic import owned_temp

    # the suffix: onnx.save_model picks the format from the extension
    tmp = owned_temp(path.parent, f".{path.name}.tmp-", folder=False, suffix=".onnx")
    try:
        if external:
            data_name = f"{path.name}.data"
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            onnx.checker.check_model(str(tmp), full_check=True)  # by path: the proto is over 2 GB
            os.replace(tmp.parent / data_name, path.parent / data_name)
        else:
            onnx.checker.check_model(proto, full_check=True)
            onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    except onnx.checker.ValidationError as e:
        raise BimExportError(f"{path.name}: the exported graph fails onnx.checker: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(model) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model (a path, read without its weights, or a proto)."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, os.PathLike)) else model
    return {p.key: p.value for p in proto.metadata_props}


# ----------------------------------------------------------------------------- export modules


class SingleExit(torch.nn.Module):
    """backbone -> (tokens [B, N, D], embedding [B, D]), the ONNX contract's two outputs, and
    logits [B, classes] where the backbone has a head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.logits = has_head(backbone)

    def forward(self, x):  # x: [B, 3, H, W]
        tokens = self.backbone.forward_features(x)  # [B, N, D], after the exit's norm
        emb = self.backbone.forward_head(tokens, pre_logits=True)  # [B, D]
        return (tokens, emb, self.backbone.head(emb)) if self.logits else (tokens, emb)


class MultiExit(torch.nn.Module):
    """One pass through the shared blocks; at each exit that exit's norm and pooling.

    Outputs, in order of depth: tokens_<d> [B, N, D], embedding_<d> [B, D] (and logits_<d>
    [B, classes] where the exits have heads) for every exit d.
    """

    def __init__(self, backbone, exits: dict[int, object]):
        super().__init__()
        depths = sorted(exits)
        if depths[0] < 1 or depths[-1] > len(backbone.blocks):
            raise InputError(f"exits {depths} must lie within the backbone's {len(backbone.blocks)} blocks")
        self.stem = backbone
        self.depths = depths
        self.heads = torch.nn.ModuleDict({str(d): exits[d] for d in depths})
        for d in depths:  # each exit must see the same blocks, or the shared graph lies
            mine, theirs = backbone.blocks[d - 1].state_dict(), exits[d].blocks[d - 1].state_dict()
            if any(not torch.equal(mine[k], theirs[k]) for k in mine):
                raise InputError(f"exit {d}: its backbone's blocks differ from the shared backbone's")
        heads = {d: has_head(exits[d]) for d in depths}
        if len(set(heads.values())) > 1:
            raise InputError(f"exits {[d for d, h in heads.items() if h]} have a head and the others not")
        self.logits = heads[depths[0]]

    def forward(self, x):  # x: [B, 3, H, W]
        b = self.stem
        x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))  # [B, N, D]
        outputs = []
        done = 0
        for d in self.depths:
            for blk in b.blocks[done:d]:
                x = blk(x)
            done = d
            head = self.heads[str(d)]
            tokens = head.norm(x)
            emb = head.forward_head(tokens, pre_logits=True)
            outputs += [tokens, emb, head.head(emb)] if self.logits else [tokens, emb]
        return tuple(outputs)


# ----------------------------------------------------------------------------- graph surgery
