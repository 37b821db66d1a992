"""The shared artefacts of one export run: the check images and the :class:`Workshop`.

One :class:`Workshop` per run exports every exit in ONE multi-exit graph, rewrites it once per graph
form a profile asks for (fixed batch, ops its accelerator lacks: :mod:`~bim_export.deploy.rewrite`),
converts that once per precision (and int8 preset), and cuts each depth's graph out of it; it also
computes the PyTorch reference outputs once per depth and the ONNX Runtime outputs once per graph. Every profile
of the run reuses them (:mod:`~bim_export.deploy.candidates` judges them per profile).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..model.images import Images
from ..runtime.session import fixed_batch, run_onnx
from .presets import preset as find_preset
from .rewrite import GraphForm, apply_form, form_for
from .subgraph import cut_exits

if TYPE_CHECKING:
    from .profiles import Profile

log = logging.getLogger(__name__)

CALIB_IMAGES = 32  # static int8 calibration
PARITY_IMAGES = 32  # parity at batch n (all of them) and batch 1 (the first PARITY_BATCH1)
PARITY_BATCH1 = 4
# Fewer images than this and parity says little: neighbour agreement moves in steps of 1/n (and
# needs 3 images at all), so a --data folder must have at least this many readable images.
MIN_PARITY_IMAGES = 16
ONNX_PROVIDER = "CPUExecutionProvider"  # what parity runs on here


# ---------------------------------------------------------------------------- shared artefacts


def load_images(data: Path | None, config: dict) -> Images:
    """The calibration and parity images of an export (see :func:`bim_export.model.images.load_check_images`)."""
    from ..model.images import load_check_images

    return load_check_images(data, config, CALIB_IMAGES, PARITY_IMAGES, MIN_PARITY_IMAGES)


class Workshop:
    """Exports, conversions and outputs of one checkpoint at one input resolution, each made once
    and shared by all profiles of the run (a run with several checkpoints or resolutions has one
    workshop for each pair).

    Files live in ``work/`` keyed by depth, precision, opset and int8 preset: what a profile asks of
    a graph, read from it in one place (:meth:`_graph`).

    Attributes:
        resolution: the input size (px, square) of every graph and image here; the checkpoint's
            ``img_size`` unless another was asked for.
        name: how tables name the checkpoint ("" in a run of one checkpoint).
        measured: every exit's quality measured at ``resolution``
            (:class:`~bim_export.model.quality.Measured`); None: metrics.json's figures.
    """

    def __init__(self, ckpt, images: Images, work: Path, resolution: int | None = None, name: str = "",
                 measured=None):
        self.ckpt, self.images, self.work = ckpt, images, work
        self.resolution = int(resolution or ckpt.config["img_size"])
        self.name, self.measured = name, measured
        self._backbones: dict[int, Any] = {}
        self._refs: dict[int, dict[str, np.ndarray]] = {}
        self._models: dict[tuple, Path] = {}
        self._outputs: dict[Path, dict[str, dict[str, np.ndarray]]] = {}
        self.fixed_batches: dict[Path, int | None] = {}  # each run graph's fixed batch (None: dynamic)
        self.conversions: dict[Path, dict] = {}  # QuantInfo of each converted file, for the manifest

    @property
    def native(self) -> bool:
        """Whether the graphs take the checkpoint's own input size."""
        return self.resolution == self.ckpt.config["img_size"]

    @property
    def config(self) -> dict:
        """The checkpoint's config.json as these graphs see it: ``img_size`` is :attr:`resolution`."""
        return {**self.ckpt.config, "img_size": self.resolution}

    def exit_quality(self, depth: int) -> float | None:
        """The exit's quality at :attr:`resolution`: measured here, else metrics.json's."""
        from ..model.checkpoint import exit_quality

        if self.measured is not None:
            return self.measured.top1.get(depth)
        return exit_quality(self.ckpt.metrics, depth)

    def backbone(self, depth: int):
        if depth not in self._backbones:
            from ..model.backbone import build_backbone

            self._backbones[depth] = build_backbone(self.ckpt, depth, None if self.native else self.resolution)
        return self._backbones[depth]

    def reference(self, depth: int) -> dict[str, np.ndarray]:
        """PyTorch fp32 outputs of the depth-d backbone on the parity images (``tokens``,
        ``embedding``, and a classifier's ``logits``)."""
        if depth not in self._refs:
            import torch

            from .export import has_head

            bb = self.backbone(depth)
            with torch.inference_mode():
                tokens = bb.forward_features(torch.from_numpy(self.images.parity))
                emb = bb.forward_head(tokens, pre_logits=True)
                self._refs[depth] = {"tokens": tokens.numpy(), "embedding": emb.numpy()}
                if has_head(bb):
                    self._refs[depth]["logits"] = bb.head(emb).numpy()
        return self._refs[depth]

    def metadata(self, precision: str) -> dict[str, Any]:
        """metadata_props of the exported graphs: the source, the preprocessing, and how the
        ``embedding`` output pools the tokens (``token`` / ``avg``) and how many of the ``tokens``
        output's leading tokens are prefix tokens (class and register tokens); a classifier's
        ``labels`` (JSON list, in logit order)."""
        from ..model.classifier import labels_json

        cfg = self.ckpt.config
        bb = self.backbone(max(cfg["exits"]))
        meta = {"depth": max(cfg["exits"]), "exits": list(cfg["exits"]), "precision": precision,
                "mean": list(cfg["mean"]), "std": list(cfg["std"]), "resolution": self.resolution,
                "pooling": bb.global_pool, "prefix_tokens": int(bb.num_prefix_tokens)}
        labels = labels_json(cfg)
        return {**meta, "labels": labels} if labels else meta

    @staticmethod
    def _graph(precision: str, profile: Profile, dynamic: bool = False) -> tuple[str, int, str | None, GraphForm]:
        """(precision, opset, int8 preset or None, graph form): what a profile asks of a graph at
        ``precision`` (with ``dynamic``, of its second, dynamic-batch file)."""
        preset = profile.int8_preset if precision == "int8" else None
        return precision, profile.opset, preset, form_for(profile, dynamic)

    def full_graph(self, precision: str, profile: Profile, dynamic: bool = False) -> Path:
        """The multi-exit graph of every exit at ``precision`` in ``profile``'s form: exported (fp32),
        rewritten (:mod:`~bim_export.deploy.rewrite`) or converted once, and shared with every profile
        asking for the same opset, preset and form.

        Converting the whole graph once and cutting exits out of it gives the same per-exit graphs
        as converting each depth's graph (weight quantization is per node, and calibration ranges
        of a tensor do not depend on the blocks after it), at a fraction of the cost.
        """
        return self._full(*self._graph(precision, profile, dynamic))

    def _full(self, precision: str, opset: int, preset: str | None, form: GraphForm) -> Path:
        key = ("full", precision, opset, preset, form)
        if key in self._models:
            return self._models[key]
        name = "-".join(str(k) for k in (precision, opset, preset, form.key) if k)
        path = self.work / f"all-exits-{name}.onnx"
        if precision == "fp32" and form.plain:
            from .export import export_onnx

            exits = self.ckpt.config["exits"]
            log.info("exporting exits %s in one graph (opset %d)", exits, opset)
            export_onnx(self.backbone(max(exits)), path, opset=opset, img_size=self.resolution,
                        metadata=self.metadata("fp32"), multi_exit=True, exits={d: self.backbone(d) for d in exits})
        elif precision == "fp32":
            log.info("rewriting the exits' graph: %s", form.describe())
            apply_form(self._full("fp32", opset, None, GraphForm()), path, form)
        else:
            from .quantize import convert_precision

            log.info("converting the exits to %s%s", precision, f" ({preset})" if preset else "")
            calib = self.images.calib if precision == "int8" else None
            info = convert_precision(self._full("fp32", opset, None, form), path, precision, calib_x=calib,
                                     preset=preset)
            self.conversions[path] = info.to_dict()
        self._models[key] = path
        return path

    def model(self, depth: int, precision: str, profile: Profile, multi_exit: bool = False, dynamic: bool = False) -> Path:
        """The ONNX file of exit ``depth`` at ``precision`` for ``profile`` (with ``multi_exit``: every
        exit up to ``depth`` in one graph; with ``dynamic``: the profile's dynamic-batch form), cut out
        of :meth:`full_graph` on first use."""
        return self._model(depth, *self._graph(precision, profile, dynamic), multi_exit)

    def _model(self, depth: int, precision: str, opset: int, preset: str | None, form: GraphForm,
               multi_exit: bool) -> Path:
        key = (depth, precision, opset, preset, form, multi_exit)
        if key in self._models:
            return self._models[key]
        path = self.work / ("-".join(str(k) for k in (f"d{depth}", precision, opset, preset, form.key) if k)
                            + ("-multi" if multi_exit else "") + ".onnx")
        depths = [d for d in self.ckpt.config["exits"] if d <= depth] if multi_exit else [depth]
        if self.separate_exits:
            self._export_depth(depth, depths, precision, opset, preset, form, multi_exit, path)
        else:
            full = self._full(precision, opset, preset, form)
            cut_exits(full, path, depths, single=not multi_exit)
            if full in self.conversions:
                self.conversions[path] = {**self.conversions[full],
                                          "graph": "converted as the all-exits graph, this depth cut out of it"}
        self._models[key] = path
        return path

    def pending(self, depth: int, precision: str, profile) -> str:
        """What :meth:`model` of this candidate still has to make, for progress lines: ``export``,
        ``rewrite``, ``convert``, ``calibrate + convert``, else ``cut`` or ``reuse`` (an earlier profile's)."""
        precision, opset, preset, form = self._graph(precision, profile)

        def made(prec: str, pre: str | None, frm: GraphForm) -> bool:
            return bool({("full", prec, opset, pre, frm), (depth, prec, opset, pre, frm, False)} & self._models.keys())

        steps = [] if made("fp32", None, GraphForm()) else ["export"]
        steps += [] if form.plain or made("fp32", None, form) else ["rewrite"]
        if precision != "fp32" and not made(precision, preset, form):
            steps.append("calibrate + convert" if precision == "int8" and getattr(find_preset(preset), "static", False) else "convert")
        return " + ".join(steps) or ("reuse" if (depth, precision, opset, preset, form, False) in self._models else "cut")

    @cached_property
    def too_big_to_cut(self) -> bool:
        """Whether the all-exits graph would pass protobuf's 2 GB limit (ViT-H and up): each depth is
        then exported and converted on its own, its weights as external data."""
        bb = self.backbone(max(self.ckpt.config["exits"]))
        return sum(p.numel() for p in bb.parameters()) * 4 > 1_500_000_000

    @cached_property
    def separate_exits(self) -> bool:
        """Whether each depth is exported on its own rather than cut out of one all-exits graph: a
        graph too big to cut, or a per-exit fine-tuned checkpoint (its depths share no weights)."""
        from ..model.classifier import mode

        return mode(self.ckpt.config) == "per_exit" or self.too_big_to_cut

    def parity_graph(self, depth: int, precision: str, profile: Profile) -> tuple[Path, bool]:
        """The graph a candidate's parity is judged on, and whether its outputs carry the exit suffix."""
        if self.separate_exits:
            return self.model(depth, precision, profile), False
        return self.full_graph(precision, profile), True

    def _export_depth(self, depth, depths, precision, opset, preset, form, multi_exit, path) -> None:
        if precision == "fp32" and form.plain:
            from .export import export_onnx

            exits = {d: self.backbone(d) for d in depths} if multi_exit else None
            export_onnx(self.backbone(depth), path, opset=opset, img_size=self.resolution,
                        metadata={**self.metadata("fp32"), "depth": depth}, multi_exit=multi_exit, exits=exits)
        elif precision == "fp32":
            apply_form(self._model(depth, "fp32", opset, None, GraphForm(), multi_exit), path, form)
        else:
            from .quantize import convert_precision

            src = self._model(depth, "fp32", opset, None, form, multi_exit)
            calib = self.images.calib if precision == "int8" else None
            self.conversions[path] = convert_precision(src, path, precision, calib_x=calib, preset=preset).to_dict()

    def onnx_outputs(self, model: Path) -> dict[str, dict[str, np.ndarray]]:
        """ONNX Runtime (CPU EP) outputs on the parity images at batch 1 and batch n (a model with a
        fixed batch: at that batch, ``batch1`` its first images)."""
        if model not in self._outputs:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(model), providers=[ONNX_PROVIDER])
            x = self.images.parity
            n1 = min(PARITY_BATCH1, len(x))
            full = run_onnx(sess, x, len(x))
            self.fixed_batches[model] = fixed_batch(sess)
            ones = {k: v[:n1] for k, v in full.items()} if self.fixed_batches[model] else run_onnx(sess, x[:n1], 1)
            self._outputs[model] = {"batch1": ones, "batchN": full}
        return self._outputs[model]
