"""Early exit for a joint fine-tuned checkpoint: one ONNX graph per stage segment, confidence
thresholds fitted on held-out images, and held-out accuracy against host latency.

Segment ``k`` is blocks ``exits[k-1]:exits[k]`` of the shared encoder (segment 0 with the patch
embedding, from ``pixels``; the others from ``hidden``, the previous segment's ``next_hidden``) and
the exit at ``exits[k]``: its norm (``tokens``), pooling (``embedding``) and head (``logits``). Only
a joint checkpoint has one encoder whose exits share their blocks; a per-exit checkpoint's depths are
separate models. The device runs the segments with :class:`bim_export.runtime.early_exit.Cascade`;
the thresholds come from :mod:`~bim_export.deploy.thresholds`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.errors import InputError, ValidationError
from ..core.progress import SILENT, Progress
from ..model import classifier
from ..model.images import ImageList, load_image_array, scan_image_folder
from ..runtime.early_exit import NEXT, OUTPUTS, SECTION, Cascade, check_segments
from .export import INPUT_NAME, export_graph
from .thresholds import Fit, fit_thresholds

if TYPE_CHECKING:
    from .profiles import Profile
    from .workshop import Workshop

log = logging.getLogger(__name__)

FOLDER = SECTION  # the bundle's folder of segment graphs, and its manifest.json section
HIDDEN = "hidden"  # input of every segment but the first
DEFAULT_LOSS_POINTS = 0.5  # held-out accuracy the cascade may lose against the deepest exit, in points
REFERENCE_IMAGES = 4


def check_joint(ckpt) -> None:
    """Raises InputError unless ``ckpt`` is a joint fine-tuned checkpoint (the only kind whose exits
    share one encoder, so one segment's tokens can feed the next)."""
    mode = classifier.mode(ckpt.config)
    if mode == "joint":
        return
    why = ("fine-tuned per exit: each depth is its own model, so no segment can hand its tokens to the next"
           if mode == "per_exit" else "not fine-tuned: its exits have no classification heads")
    raise InputError(f"{Path(ckpt.path) / 'config.json'}: --early-exit needs a joint fine-tuned checkpoint "
                     f"(finetune.mode joint); this one is {why}")


# ------------------------------------------------------------------------------------ segments


class Segment(torch.nn.Module):
    """Blocks ``start:end`` of the shared encoder and the exit at ``end``.

    Outputs: tokens [B, N, D] (after the exit's norm), embedding [B, D], logits [B, C], and unless
    ``last``, next_hidden [B, N, D] (the token stream before the norm, for the next segment).
    """

    def __init__(self, encoder, exit_model, start: int, end: int, last: bool):
        super().__init__()
        self.stem = encoder if start == 0 else None  # patch embedding, position embedding, pre-norm
        self.blocks = torch.nn.ModuleList(encoder.blocks[start:end])
        self.exit, self.last = exit_model, last

    def forward(self, x):  # x: pixels [B, 3, H, W] (first segment) or hidden [B, N, D]
        if self.stem is not None:
            b = self.stem
            x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(x))))  # [B, N, D]
        for blk in self.blocks:
            x = blk(x)
        tokens = self.exit.norm(x)
        embedding = self.exit.forward_head(tokens, pre_logits=True)
        logits = self.exit.head(embedding)
        return (tokens, embedding, logits) if self.last else (tokens, embedding, logits, x)


@dataclass
class SegmentGraph:
    """One exported segment: its file, its input, its blocks and its exit depth."""

    path: Path
    input: str
    start: int
    end: int

    def to_dict(self, folder: str) -> dict:
        return {"file": f"{folder}/{self.path.name}", "input": self.input, "blocks": [self.start, self.end],
                "exit": self.end}


def export_segments(backbone, exits: list[int], out_dir: Path, *, opset: int, img_size: int,
                    metadata: dict | None = None, form=None) -> list[SegmentGraph]:
    """Exports one graph per stage segment to ``out_dir/segment_<k>.onnx``.

    Args:
        backbone: ``backbone(depth)`` -> the checkpoint's timm ViT of that depth with its head
            (:meth:`Workshop.backbone`, or ``lambda d: build_backbone(ckpt, d)``).
        exits: the checkpoint's exits.
        opset, img_size: the graphs' opset and input resolution.
        metadata: ``metadata_props`` of every segment (``segment``, ``blocks`` and ``exit`` are added).
        form: a :class:`~bim_export.deploy.rewrite.GraphForm` to write them in (fixed batch, ops
            rewritten), or None for the exporter's graph.
    """
    from .rewrite import apply_form

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = backbone(max(exits))
    graphs, start = [], 0
    for k, end in enumerate(exits):
        last = k == len(exits) - 1
        module = Segment(encoder, backbone(end), start, end, last)
        example = (torch.zeros(2, 3, img_size, img_size) if start == 0
                   else torch.zeros(2, *_token_shape(encoder, img_size)))
        name = INPUT_NAME if start == 0 else HIDDEN
        path = out_dir / f"segment_{k}.onnx"
        meta = {**(metadata or {}), "segment": k, "blocks": [start, end], "exit": end, "depth": end}
        export_graph(module, example, path, input_name=name, output_names=[*OUTPUTS] + ([] if last else [NEXT]),
                     opset=opset, metadata=meta)
        if form is not None and not form.plain:
            apply_form(path, path, form)
        graphs.append(SegmentGraph(path, name, start, end))
        start = end
    return graphs


def _token_shape(encoder, img_size: int) -> tuple[int, int]:
    """[N, D] of the token stream: prefix tokens + patches, width."""
    with torch.no_grad():
        x = encoder._pos_embed(encoder.patch_embed(torch.zeros(1, 3, img_size, img_size)))
    return int(x.shape[1]), int(x.shape[2])


def classifier_reference(backbone, exits: list[int], pixels: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch outputs of the full classifier of every exit: ``tokens_<d>``, ``embedding_<d>``, ``logits_<d>``."""
    out = {}
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    with torch.inference_mode():
        for d in exits:
            model = backbone(d)
            tokens = model.forward_features(x)
            out.update({f"tokens_{d}": tokens.numpy(), f"embedding_{d}": model.forward_head(tokens, pre_logits=True).numpy(),
                        f"logits_{d}": model.forward_head(tokens).numpy()})
    return out


# ------------------------------------------------------------------------------ held-out images


@dataclass
class Heldout:
    """Labelled images the thresholds are fitted on: pixels [N, 3, S, S], classes [N] (the checkpoint's
    label indices), and where they come from (name, size, protocol, folder)."""

    x: np.ndarray
    y: np.ndarray
    source: dict


def heldout_images(ckpt, eval_data: Path | None = None) -> Heldout:
    """The checkpoint's held-out split (config.json ``finetune.split``), or the labelled folder ``eval_data``.

    Raises:
        InputError: the split names no images or they are not on this machine (without ``eval_data``);
            ``eval_data`` has no class sub-folders, or classes the checkpoint does not know.
    """
    cfg, names = ckpt.config, classifier.labels(ckpt.config) or []
    where = Path(ckpt.path) / "config.json"
    if eval_data is not None:
        found = scan_image_folder(eval_data)
        if not found.labelled:
            raise InputError(f"{eval_data}: --eval-data needs one sub-folder per class, named as the checkpoint's "
                             f"labels ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        unknown = sorted(set(found.classes) - set(names))
        if unknown:
            raise InputError(f"{eval_data}: classes the checkpoint was not fine-tuned on: {', '.join(unknown[:8])} "
                             f"(its labels: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
        images = ImageList(found.root, found.paths, [names.index(found.classes[i]) for i in found.labels], names)
        source = {"name": Path(eval_data).name, "folder": str(eval_data), "size": len(images),
                  "protocol": "labelled folder given with --eval-data"}
    else:
        split = (classifier.finetune_info(cfg) or {}).get("split") or {}
        root, files = split.get("val_data") or split.get("data"), split.get("heldout_files")
        if not root or not files:
            raise InputError(f"{where}: finetune.split names no held-out images (data, heldout_files); "
                             "pass --eval-data DIR, a labelled folder, to fit the early-exit thresholds")
        root = Path(root)
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise InputError(f"{where}: finetune.split: {len(missing)} of {len(files)} held-out images are not here "
                             f"(first: {root / missing[0]}); pass --eval-data DIR, a labelled folder")
        unknown = sorted({f.split("/", 1)[0] for f in files} - set(names))
        if unknown:
            raise InputError(f"{where}: finetune.split.heldout_files: classes not among finetune.labels: "
                             f"{', '.join(unknown[:8])}")
        images = ImageList(root, [root / f for f in files], [names.index(f.split("/", 1)[0]) for f in files], names)
        source = {"name": split.get("name") or root.name, "folder": str(root), "size": len(images),
                  "protocol": split.get("protocol") or "held-out split of the fine-tuning data"}
    x, y = load_image_array(images, cfg["img_size"], cfg["mean"], cfg["std"])
    return Heldout(x, y, source)


# ------------------------------------------------------------------------------- bundle section


@dataclass
class EarlyExit:
    """What an early-exit bundle adds: the segment graphs, their reference outputs, and its
    manifest.json section (thresholds, held-out accuracy, latency, parity)."""

    segments: list[SegmentGraph]
    record: dict[str, Any]
    reference: dict[str, np.ndarray] = field(default_factory=dict)

    def write(self, bundle: Path) -> dict[str, Any]:
        """Writes ``early_exit/`` (segment graphs, reference.npz) into ``bundle``; returns the manifest section."""
        folder = bundle / FOLDER
        folder.mkdir()
        for s in self.segments:
            shutil.copyfile(s.path, folder / s.path.name)
        np.savez(folder / "reference.npz", **self.reference)
        return {**self.record, "reference": f"{FOLDER}/reference.npz"}


def host_latency(models: list[Path], batch: int, threads: int | None) -> list[Any]:
    """Each model's latency on this machine, timed together, interleaved (the candidates' settings)."""
    from .candidates import MEASURE
    from .latency.measure import measure_many

    return measure_many([(m, batch) for m in models], ["CPUExecutionProvider"], threads, **MEASURE)


def evaluate(fit: Fit, segment_ms: list[float], fixed_ms: list[float]) -> dict[str, Any]:
    """Held-out accuracy against mean host latency: the cascade (each image paying the segments it
    runs) and every fixed depth (its own single-exit graph)."""
    cascade_ms = float(np.dot(fit.exit_share, np.cumsum(segment_ms)))
    return {"cascade": {"accuracy": fit.accuracy, "mean_ms": cascade_ms},
            "fixed": [{"accuracy": a, "mean_ms": float(ms)} for a, ms in zip(fit.fixed_accuracy, fixed_ms)]}


def build_early_exit(shop: Workshop, profile: Profile, heldout: Heldout, loss_points: float,
                     progress: Progress = SILENT) -> EarlyExit:
    """The segments of ``shop``'s checkpoint for ``profile`` (its opset and graph form, fp32), their
    parity against the full classifier at every exit, host latency of each segment and each fixed
    depth, and the thresholds fitted on ``heldout`` with the measured segment times as their cost.

    Raises:
        ValidationError: a segment's outputs differ from the classifier's (an export bug).
    """
    from ..runtime.machine import machine_description
    from .rewrite import form_for

    cfg, exits = shop.ckpt.config, list(shop.ckpt.config["exits"])
    form = form_for(profile)
    batch = form.batch or 1
    with progress.stage("early exit", 4, profile.name) as st:
        st.step(f"{len(exits)} segments", "export")
        work = shop.work / f"early-exit-{profile.opset}-{form.key or 'plain'}"
        if not work.is_dir():
            export_segments(shop.backbone, exits, work, opset=profile.opset, img_size=cfg["img_size"],
                            metadata={**shop.metadata("fp32"), "profile": profile.name}, form=form)
        segments, start = [], 0
        for k, d in enumerate(exits):
            segments.append(SegmentGraph(work / f"segment_{k}.onnx", INPUT_NAME if k == 0 else HIDDEN, start, d))
            start = d
        cascade = Cascade([s.path for s in segments], exits, [None] * len(exits))
        st.step("every exit against the classifier", "parity")
        ref = classifier_reference(shop.backbone, exits, shop.images.parity)
        tolerance = profile.tolerance("fp32").model_dump()
        parity = check_segments(cascade, {"pixels": shop.images.parity, "labels": shop.images.labels, **ref},
                                tolerance, batches=[batch] if form.batch else None)
        if not parity.passed:
            raise ValidationError(f"early-exit segments: parity failed ({'; '.join(parity.failures[:3])}); "
                                  "no bundle written")
        st.step(f"{len(exits)} segments and {len(exits)} fixed depths on this machine", "measure")
        fixed = [shop.model(d, "fp32", profile) for d in exits]
        lat = host_latency([s.path for s in segments] + fixed, batch, profile.threads)
        seg_ms, fixed_ms = [r.mean for r in lat[:len(exits)]], [r.mean for r in lat[len(exits):]]
        st.step(f"{len(heldout.y)} held-out images", "fit thresholds")
        logits = [o["logits"] for o in cascade.run_all(heldout.x, 32)]
        fit = fit_thresholds(logits, heldout.y, seg_ms, loss_points / 100)
    n = min(REFERENCE_IMAGES, len(shop.images.parity))
    record = {
        "segments": [s.to_dict(FOLDER) for s in segments], "exits": exits, "precision": "fp32",
        "labels": classifier.labels(cfg), "confidence": "largest softmax probability",
        "thresholds": fit.thresholds, "graph_form": form.to_dict(), "tolerances": tolerance,
        "fit": {"held_out": heldout.source, "accuracy_loss_points": loss_points,
                "cost": "each segment's measured mean latency on this machine", "costs_ms": seg_ms},
        "accuracy": {"cascade": fit.accuracy, "fixed": dict(zip(map(str, exits), fit.fixed_accuracy))},
        "exit_distribution": dict(zip(map(str, exits), fit.exit_share)),
        "latency": {**evaluate(fit, seg_ms, fixed_ms), "source": "measured", "stat": "mean", "batch": batch,
                    "segments_ms": seg_ms, "machine": machine_description(), "settings": lat[0].settings,
                    "disturbed": [name for name, r in zip([s.path.stem for s in segments] + [f"depth {d}" for d in exits], lat)
                                  if r.disturbed]},
        "parity": parity.to_dict(),
    }
    reference = {"pixels": shop.images.parity[:n], "labels": shop.images.labels[:n],
                 **{k: v[:n] for k, v in ref.items()}}
    log.info("early exit: thresholds %s, held-out top-1 %.3f (deepest %.3f)", fit.thresholds, fit.accuracy,
             fit.fixed_accuracy[-1])
    return EarlyExit(segments, record, reference)
