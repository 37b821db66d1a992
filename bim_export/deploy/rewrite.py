"""Graph forms for a device: its batch fixed, and the ops its accelerator lacks written in ops it has.

ONNX Runtime's NNAPI and CoreML EPs take only nodes whose inputs have fixed shapes and whose op is
on their list (see :mod:`bim_export.deploy.usability`). A timm ViT exported with a dynamic batch
keeps ``Shape`` / ``Expand`` arithmetic for the class token and the attention's reshapes, and uses
``LayerNormalization`` and ``Erf`` (exact GELU), which NNAPI lacks, and ``Gather`` (class-token
pooling), which CoreML's MLProgram list lacks. :func:`apply_form` rewrites the exported graph:

- ``batch``: the input's batch axis set to the profile's batch and the shape arithmetic folded
  away (onnxscript's optimizer, the one the exporter runs), so every tensor has a fixed shape;
- ``layernorm``: ``LayerNormalization`` as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul,
  Add (the pattern ORT's own LayerNormFusion folds back on the CPU EP);
- ``erf``: ``Erf`` in the tanh form of GELU, erf(z) ~ tanh(2/sqrt(pi) (z + 0.044715 * 2 z^3)),
  i.e. ``x * Phi(x)`` with Phi in the tanh approximation (|error| < 5e-4 on GELU's output; the
  pipeline checks its parity against PyTorch on real images like every candidate's);
- ``gather``: ``Gather`` of one constant index as Slice + Squeeze;
- ``matmul2d`` (NNAPI): a weight MatMul on a [B, N, D] activation as Reshape to [B*N, D], MatMul,
  Reshape back: the NNAPI EP builds FULLY_CONNECTED only from 2-D MatMuls (its GemmOpBuilder), a
  limit ORT's op-type checker does not see;
- ``qkv4d`` (NNAPI): the attention's q, k, v split as three Slices of the qkv projection, each
  reshaped to [B, N, H, d] and transposed, instead of one [B, N, 3, H, d] tensor transposed and
  unbound: NNAPI's Transpose takes at most 4-D tensors (TransposeOpBuilder).

Each op pass is local to one node and exact up to float rounding except ``erf``. Which passes a
profile needs follows from ORT's op lists for its accelerator EPs (:func:`form_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import BimExportError

if TYPE_CHECKING:
    from .profiles import Profile

# The op each pass removes, in the order they run.
REMOVES = {"layernorm": "LayerNormalization", "erf": "Erf", "gather": "Gather"}
PASS_ORDER = ("layernorm", "erf", "gather", "matmul2d", "qkv4d")
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class GraphForm:
    """What a device asks of a graph beyond its opset.

    Attributes:
        batch: the fixed input batch, or None for a dynamic batch axis.
        passes: the op rewrites applied, in :data:`PASS_ORDER`.
    """

    batch: int | None = None
    passes: tuple[str, ...] = ()

    @property
    def plain(self) -> bool:
        """The exporter's graph as it is."""
        return self.batch is None and not self.passes

    @property
    def key(self) -> str:
        """A short name for file names and caches: ``b1-layernorm-erf``, ``""`` when plain."""
        return "-".join(([f"b{self.batch}"] if self.batch else []) + list(self.passes))

    def describe(self) -> str:
        """``batch fixed to 1; LayerNormalization, Erf rewritten`` (or ``as exported``)."""
        parts = [f"batch fixed to {self.batch}" if self.batch else "dynamic batch"]
        ops = [REMOVES[p] for p in self.passes if p in REMOVES]
        if ops:
            parts.append(f"{', '.join(ops)} rewritten")
        if "matmul2d" in self.passes:
            parts.append("weight MatMuls on 2-D activations")
        if "qkv4d" in self.passes:
            parts.append("q, k, v split without 5-D tensors")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"batch": self.batch, "passes": list(self.passes), "description": self.describe()}


def form_for(profile: Profile, dynamic: bool = False) -> GraphForm:
    """The graph form ``profile`` asks for: its batch fixed where it fixes it (``dynamic`` forces
    the batch axis dynamic: the second file a profile may ask for), and the passes that remove the
    ops its NNAPI / CoreML EPs do not list, and those their op builders need beyond their lists
    (:attr:`bim_export.deploy.providers.ExecutionProvider.passes`); and LayerNormalization decomposed
    for a TensorRT older than its parser of the op (:func:`bim_export.deploy.tensorrt.decompose_layernorm`)."""
    from .providers import PROVIDERS
    from .tensorrt import decompose_layernorm
    from .usability import checked_eps, checker_name, supported_ops

    needed = set()
    for ep in checked_eps(profile):
        ops = supported_ops(checker_name(profile, ep))
        needed |= {name for name, op in REMOVES.items() if f"ai.onnx:{op}" not in ops}
        needed |= set(PROVIDERS[ep].passes)
    if decompose_layernorm(profile):  # a TensorRT older than its LayerNormalization parser
        needed.add("layernorm")
    batch = None if dynamic or not profile.batch_is_fixed else profile.batch
    return GraphForm(batch, tuple(p for p in PASS_ORDER if p in needed))


# ------------------------------------------------------------------------------------- apply


def apply_form(src: str | Path, dst: str | Path, form: GraphForm) -> Path:
    """Writes ``src`` in ``form`` to ``dst`` (full-checked; metadata_props carried over, with
    ``graph_form`` added).

    Raises:
        BimExportError: a rewritten graph fails onnx.checker or still holds a dynamic shape where
            the batch was fixed.
    """
    import onnx

    from .export import read_metadata, save_checked, set_metadata

    model = onnx.load(str(src))
    meta = read_metadata(model)
    if form.batch:
        model = _fix_batch(model, form.batch)
    if form.passes:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        _Rewriter(model).run(form.passes)
        del model.graph.value_info[:]  # the passes changed the graph: shapes are inferred afresh
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if form.batch:
        dynamic = [vi.name for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info)
                   if any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)]
        if dynamic:
            raise BimExportError(f"{Path(src).name}: {len(dynamic)} tensors keep a dynamic shape after the batch "
                                 f"was fixed to {form.batch} (first: {dynamic[0]})")
    set_metadata(model, {**meta, "graph_form": form.key or "plain"})
    save_checked(model, Path(dst))
    return Path(dst)


def _fix_batch(model, batch: int):
    """The batch axis (the first axis of the graph's inputs, and every axis of that name) set to
    ``batch``, then the shape arithmetic that depended on it folded to constants."""
    import onnx
    import onnxscript.optimizer

    names = set()
    for vi in model.graph.input:
        first = vi.type.tensor_type.shape.dim[0]
        if first.dim_param:
            names.add(first.dim_param)
        elif not first.HasField("dim_value"):
            first.dim_value = batch
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in names:
                d.Clear()
                d.dim_value = batch
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    folded = onnxscript.optimizer.optimize(model)
    if next(o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")) != opset:
        raise BimExportError(f"folding the fixed-batch graph changed its opset from {opset}")
    return onnx.shape_inference.infer_shapes(folded, strict_mode=True)


class _Rewriter:
    """Rewrites of one graph: each replaces a node (``qkv4d``: a Transpose and the Slices that unbind it)
    by nodes computing the same outputs, under the same names."""

    def __init__(self, model):
        self.model, self.graph = model, model.graph
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                                 for d in vi.type.tensor_type.shape.dim]
                       for vi in (*self.graph.input, *self.graph.output, *self.graph.value_info)}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consts = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self._count = 0

    def run(self, passes: tuple[str, ...]) -> None:
        for name in passes:
            rewrite = getattr(self, f"_{name}")
            self._consumers, self._producer = {}, {}
            for node in self.graph.node:
                for i in node.input:
                    self._consumers.setdefault(i, []).append(node)
                self._producer.update({o: node for o in node.output})
            self._drop: set[str] = set()  # first outputs of nodes a rewrite made redundant
            nodes = []
            for node in self.graph.node:
                if node.output[0] in self._drop:
                    continue
                replaced = rewrite(node) if node.domain in ("", "ai.onnx") else None
                nodes.extend(replaced if replaced is not None else [node])
            self._set_nodes(nodes)
        self._prune()

    def _set_nodes(self, nodes) -> None:
        copies = [type(n)() for n in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del self.graph.node[:]
        self.graph.node.extend(copies)

    def _prune(self) -> None:
        """Drops nodes whose outputs nothing reads, then initializers no node reads."""
        outputs = {o.name for o in self.graph.output}
        nodes = list(self.graph.node)
        while True:
            used = outputs | {i for n in nodes for i in n.input}
            kept = [n for n in nodes if any(o in used for o in n.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        self._set_nodes(nodes)
        used = {i for n in nodes for i in n.input}
        unused = [t for t in self.graph.initializer if t.name not in used]
        for t in unused:
            self.graph.initializer.remove(t)

    # ------------------------------------------------------------------ helpers

    def _const(self, base: str, value, dtype=np.float32) -> str:
        """A new initializer holding ``value``; returns its name."""
        from onnx import numpy_helper

        self._count += 1
        name = f"{base}/c{self._count}"
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def _node(self, op: str, inputs: list[str], base: str, output: str | None = None, **attrs):
        from onnx import helper

        self._count += 1
        out = output or f"{base}/{op.lower()}{self._count}"
        return helper.make_node(op, inputs, [out], name=f"{base}/{op}{self._count}", **attrs)

    def _value(self, name: str):
        """The constant value of an initializer or Constant node output, else None."""
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def _reduce_mean(self, x: str, axes: list[int], base: str):
        if self.opset >= 18:
            return self._node("ReduceMean", [x, self._const(base, axes, np.int64)], base, keepdims=1)
        return self._node("ReduceMean", [x], base, axes=axes, keepdims=1)

    # ------------------------------------------------------------------ passes

    def _layernorm(self, node):
        """y = (x - mean) / sqrt(var + eps) * scale + bias over the axes from ``axis`` on."""
        if node.op_type != "LayerNormalization" or len([o for o in node.output if o]) != 1:
            return None
        rank = len(self.shapes.get(node.input[0], []))
        if not rank:
            return None
        attrs = {a.name: a for a in node.attribute}
        axis = attrs["axis"].i if "axis" in attrs else -1
        eps = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
        axes = list(range(axis % rank, rank))
        base, x = node.name or node.output[0], node.input[0]
        mean = self._reduce_mean(x, axes, base)
        centred = self._node("Sub", [x, mean.output[0]], base)
        square = self._node("Mul", [centred.output[0], centred.output[0]], base)
        var = self._reduce_mean(square.output[0], axes, base)
        var_eps = self._node("Add", [var.output[0], self._const(base, eps)], base)
        std = self._node("Sqrt", [var_eps.output[0]], base)
        normed = self._node("Div", [centred.output[0], std.output[0]], base)
        has_bias = len(node.input) > 2 and node.input[2]
        scaled = self._node("Mul", [normed.output[0], node.input[1]], base,
                            output=None if has_bias else node.output[0])
        out = [mean, centred, square, var, var_eps, std, normed, scaled]
        if has_bias:
            out.append(self._node("Add", [scaled.output[0], node.input[2]], base, output=node.output[0]))
        return out

    def _erf(self, node):
        """erf(z) ~ tanh(2/sqrt(pi) * z * (1 + 0.08943 z^2)): GELU's tanh form, 2 * Phi(sqrt(2) z) - 1."""
        if node.op_type != "Erf":
            return None
        base, z = node.name or node.output[0], node.input[0]
        sq = self._node("Mul", [z, z], base)
        cubic = self._node("Mul", [sq.output[0], self._const(base, 2 * 0.044715)], base)
        one_plus = self._node("Add", [cubic.output[0], self._const(base, 1.0)], base)
        inner = self._node("Mul", [z, one_plus.output[0]], base)
        scaled = self._node("Mul", [inner.output[0], self._const(base, 2 / math.sqrt(math.pi))], base)
        return [sq, cubic, one_plus, inner, scaled, self._node("Tanh", [scaled.output[0]], base, output=node.output[0])]

    def _gather(self, node):
        """Gather of one constant index k along ``axis`` as Slice [k, k+1) + Squeeze."""
        if node.op_type != "Gather":
            return None
        index = self._value(node.input[1])
        if index is None or index.ndim != 0:
            return None
        attrs = {a.name: a.i for a in node.attribute}
        axis, k = attrs.get("axis", 0), int(index)
        base = node.name or node.output[0]
        end = k + 1 if k != -1 else INT64_MAX
        bounds = [self._const(base, [v], np.int64) for v in (k, end, axis)]
        sliced = self._node("Slice", [node.input[0], *bounds], base)
        squeeze = self._node("Squeeze", [sliced.output[0], self._const(base, [axis], np.int64)], base,
                             output=node.output[0])
        return [sliced, squeeze]

    def _matmul2d(self, node):
        """MatMul(A [..., K], W [K, N]) with A of rank > 2 as Reshape(A, [-1, K]) @ W, reshaped back."""
        if node.op_type != "MatMul" or node.input[1] not in self.inits:
            return None
        a_shape, w = self.shapes.get(node.input[0]), self.inits[node.input[1]]
        if not a_shape or len(a_shape) <= 2 or len(w.dims) != 2 or sum(d is None for d in a_shape[:-1]) > 1:
            return None
        k, n = w.dims
        base = node.name or node.output[0]
        flat = self._node("Reshape", [node.input[0], self._const(base, [-1, k], np.int64)], base)
        mm = self._node("MatMul", [flat.output[0], node.input[1]], base)
        back = [-1 if d is None else d for d in a_shape[:-1]] + [n]
        return [flat, mm, self._node("Reshape", [mm.output[0], self._const(base, back, np.int64)], base,
                                     output=node.output[0])]

    def _qkv4d(self, node):
        """Reshape(X [B, N, k*H*d] -> [B, N, k, H, d]) -> Transpose(p) -> k x (Slice i on the k axis,
        Squeeze) as k x (Slice of X's last axis -> Reshape [B, N, H, d] -> Transpose)."""
        if node.op_type != "Transpose":
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        reshape = self._producer.get(node.input[0])
        if perm is None or len(perm) != 5 or reshape is None or reshape.op_type != "Reshape":
            return None
        x_shape, target = self.shapes.get(reshape.input[0]), self._value(reshape.input[1])
        if not x_shape or len(x_shape) != 3 or target is None or len(target) != 5:
            return None
        k, heads, dim = (int(v) for v in target[2:])
        if x_shape[2] != k * heads * dim or target[1] not in (x_shape[1], -1) or min(k, heads, dim) < 1:
            return None
        branches = []
        for sl in self._consumers.get(node.output[0], []):
            one = self._one_index_slice(sl)
            squeeze = self._consumers.get(sl.output[0], [])
            if one is None or perm[one[1]] != 2 or len(squeeze) != 1 or not self._squeezes(squeeze[0], one[1]):
                return None
            branches.append((*one, sl, squeeze[0]))
        if not branches:
            return None
        base, width = node.name or node.output[0], heads * dim
        where = {0: 0, 1: 1, 3: 2, 4: 3}  # axes of [B, N, k, H, d] in [B, N, H, d]
        out = []
        for i, axis, sl, squeeze in branches:
            part = self._node("Slice", [reshape.input[0], self._const(base, [i * width], np.int64),
                                        self._const(base, [(i + 1) * width], np.int64),
                                        self._const(base, [2], np.int64)], base)
            shape = [int(target[0]), int(target[1]), heads, dim]
            split = self._node("Reshape", [part.output[0], self._const(base, shape, np.int64)], base)
            order = [where[p] for j, p in enumerate(perm) if j != axis]
            out += [part, split, self._node("Transpose", [split.output[0]], base, output=squeeze.output[0], perm=order)]
            self._drop |= {sl.output[0], squeeze.output[0]}
        return out

    def _one_index_slice(self, node) -> tuple[int, int] | None:
        """(index, axis) of a Slice taking one index along one axis of a 5-D tensor, else None."""
        if node.op_type != "Slice" or len(node.input) < 4:
            return None
        starts, ends, axes = (self._value(i) for i in node.input[1:4])
        if starts is None or ends is None or axes is None or len(starts) != 1 or len(axes) != 1:
            return None
        steps = self._value(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
        if steps is None or int(steps[0]) != 1:
            return None
        return (int(starts[0]), int(axes[0]) % 5) if int(ends[0]) == int(starts[0]) + 1 else None

    def _squeezes(self, node, axis: int) -> bool:
        """Whether ``node`` is a Squeeze of exactly ``axis`` (of a 5-D tensor)."""
        if node.op_type != "Squeeze" or len(node.input) < 2:
            return False
        axes = self._value(node.input[1])
        return axes is not None and [int(a) % 5 for a in np.atleast_1d(axes)] == [axis]
