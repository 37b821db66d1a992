"""Sub-graphs of an exported multi-exit graph: the nodes and weights that compute some of its exits.

One export of the deepest exit serves every depth: a candidate of depth ``d`` is the part of the
multi-exit graph that ``tokens_<d>`` / ``embedding_<d>`` (/ ``logits_<d>``) need, renamed to the
contract's single-exit names.
"""

from __future__ import annotations

from pathlib import Path

from .export import LOGITS, output_names, read_metadata, set_metadata


def cut_exits(src: Path, dst: Path, depths: list[int], single: bool) -> Path:
    """Writes the part of a multi-exit graph that computes the exits ``depths``.

    Only the nodes and weights those outputs need are kept (blocks up to the deepest, each exit's
    norm, pooling and head). With ``single``, the one exit's outputs ``tokens_<d>`` / ``embedding_<d>``
    (/ ``logits_<d>``) are renamed to the contract's ``tokens`` / ``embedding`` (/ ``logits``).
    metadata_props are carried over with
    ``depth`` (and ``graph_exits``) updated; the result is full-checked.
    """
    import json

    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(src))
    meta = read_metadata(model)
    names = output_names(None, any(o.name.startswith(f"{LOGITS}_") for o in model.graph.output))
    outputs = [f"{name}_{d}" for d in depths for name in names]
    part = Extractor(model).extract_model(["pixels"], outputs)
    if single:
        rename = {f"{name}_{depths[0]}": name for name in names}
        for node in part.graph.node:
            node.input[:] = [rename.get(n, n) for n in node.input]
            node.output[:] = [rename.get(n, n) for n in node.output]
        for vi in (*part.graph.output, *part.graph.value_info):
            vi.name = rename.get(vi.name, vi.name)
        meta.pop("graph_exits", None)
    else:
        meta["graph_exits"] = json.dumps(depths)
    meta["depth"] = str(max(depths))
    _topological_sort(part.graph)  # converters may append nodes (fp16's input Cast) out of order
    part.producer_name, part.producer_version = model.producer_name, model.producer_version
    set_metadata(part, meta)
    onnx.checker.check_model(part, full_check=True)
    onnx.save(part, str(dst))
    return dst


def _topological_sort(graph) -> None:
    """Reorders ``graph.node`` so every node comes after the producers of its inputs."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(n in ready for n in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {rest[0].name}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
