"""Early exit on the device: a joint classifier's stage segments run in turn, each image stopping at
the first exit confident enough (numpy and onnxruntime only; ships in every bundle's ``runtime/``).

A bundle exported with ``--early-exit`` holds one ONNX graph per stage segment (manifest.json
``early_exit.segments``). Segment ``k`` runs blocks ``exits[k-1]:exits[k]`` of the shared encoder
(segment 0 starts from ``pixels``, the others from input ``hidden``) and returns its exit's
``tokens``, ``embedding`` and ``logits``; every segment but the last also returns ``next_hidden``,
the raw token stream before the exit's norm, which the next segment takes. An image's confidence at
an exit is its largest softmax probability; it leaves at the first exit whose confidence reaches
that exit's threshold (fitted at export on held-out images), and the last exit takes every image left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .labels import softmax
from .parity import compare_outputs, merge_results
from .session import CPU, make_session, run_onnx

SECTION = "early_exit"  # manifest.json key
NEXT = "next_hidden"  # a segment's output that the next segment takes as its input
OUTPUTS = ("tokens", "embedding", "logits")


def confidence(logits: np.ndarray) -> np.ndarray:
    """The largest softmax probability per image: [N, C] -> [N]."""
    return softmax(logits).max(axis=-1)


def _never_as_inf(thresholds) -> list[float]:
    """Thresholds with None (no image leaves at that exit) as infinity."""
    return [np.inf if t is None else float(t) for t in thresholds]


def exit_index(conf: np.ndarray, thresholds) -> np.ndarray:
    """Where each image leaves: the first exit ``k`` with ``conf[k] >= thresholds[k]``, else the last.

    Args:
        conf: confidence per exit and image, [K, N].
        thresholds: one per exit, None where no image leaves (the last one's is not used: the last exit
            takes every image left).

    Returns:
        exit index per image, [N] (0 .. K-1).
    """
    conf = np.asarray(conf)
    if len(conf) == 1:
        return np.zeros(conf.shape[1], dtype=int)
    t = np.asarray(_never_as_inf(thresholds), dtype=np.float64)[:len(conf) - 1, None]
    leaves = conf[:-1] >= t  # [K-1, N]
    return np.where(leaves.any(axis=0), leaves.argmax(axis=0), len(conf) - 1)


@dataclass
class CascadeResult:
    """What the cascade gave per image.

    Attributes:
        exit_index: which exit each image left at, [N] (0 = the shallowest).
        exit_depth: that exit's depth in blocks, [N].
        logits: the logits of the exit taken, [N, C].
        confidence: their largest softmax probability, [N].
        segment_images: how many images each segment ran on.
        ms: wall time of the whole cascade, in milliseconds.
    """

    exit_index: np.ndarray
    exit_depth: np.ndarray
    logits: np.ndarray
    confidence: np.ndarray
    segment_images: list[int] = field(default_factory=list)
    ms: float = 0.0


class Cascade:
    """The segment sessions of an early-exit bundle, run in turn.

    Args:
        models: the segment graphs, shallowest first.
        exits: each segment's exit depth (blocks).
        thresholds: each exit's confidence threshold, None for never (the last is not used).
        providers: execution providers, best first (names or (name, options) pairs).
        threads: intra-op threads per session (default onnxruntime's).
    """

    def __init__(self, models: list[Path], exits: list[int], thresholds: list[float], providers=(CPU,),
                 threads: int | None = None):
        if not (len(models) == len(exits) == len(thresholds)) or not models:
            raise InputError(f"early exit needs one graph, exit and threshold per segment (got {len(models)} graphs, "
                             f"{len(exits)} exits, {len(thresholds)} thresholds)")
        self.models, self.exits, self.thresholds = [Path(m) for m in models], list(exits), _never_as_inf(thresholds)
        self.sessions = [make_session(m, providers, threads) for m in self.models]

    @classmethod
    def from_manifest(cls, bundle: str | Path, manifest: dict, providers=(CPU,), threads: int | None = None):
        """The cascade a bundle's manifest describes (its ``early_exit`` section).

        Raises:
            InputError: the bundle was exported without ``--early-exit``, or lacks a segment file.
        """
        section = manifest.get(SECTION)
        if not isinstance(section, dict):
            raise InputError(f"{bundle}: exported without --early-exit (manifest.json has no {SECTION} section)")
        models = [Path(bundle) / s["file"] for s in section["segments"]]
        for m in models:
            if not m.is_file():
                raise InputError(f"{bundle}: early-exit segment {m.name} is missing")
        return cls(models, [s["exit"] for s in section["segments"]], section["thresholds"], providers, threads)

    @property
    def providers(self) -> list[str]:
        return self.sessions[0].get_providers()

    def run_all(self, x: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
        """Every segment on every image (no exit taken): each exit's outputs, shallowest first."""
        out, feed = [], np.asarray(x, dtype=np.float32)
        for sess in self.sessions:
            got = run_onnx(sess, feed, batch)
            feed = got.pop(NEXT, None)
            out.append(got)
        return out

    def __call__(self, x: np.ndarray, batch: int) -> CascadeResult:
        """Runs the segments in turn, each on the images that have not left yet, ``batch`` at a time."""
        t0 = time.perf_counter()
        n = len(x)
        active, feed = np.arange(n), np.asarray(x, dtype=np.float32)
        index = np.full(n, len(self.sessions) - 1)
        logits: np.ndarray | None = None
        conf = np.zeros(n)
        counts = []
        for k, sess in enumerate(self.sessions):
            counts.append(len(active))
            if not len(active):
                continue
            got = run_onnx(sess, feed, batch)
            c = confidence(got["logits"])
            if logits is None:
                logits = np.zeros((n, got["logits"].shape[-1]), np.float32)
            last = k == len(self.sessions) - 1
            leave = np.ones(len(active), bool) if last else c >= self.thresholds[k]
            done = active[leave]
            index[done], logits[done], conf[done] = k, got["logits"][leave], c[leave]
            if not last:
                active, feed = active[~leave], got[NEXT][~leave]
        return CascadeResult(index, np.asarray(self.exits)[index], logits, conf, counts,
                             (time.perf_counter() - t0) * 1e3)


def check_segments(cascade: Cascade, reference: dict[str, np.ndarray], tolerances=None, batches=None):
    """Parity of every segment: each exit's outputs on ``reference["pixels"]`` (the segments chained)
    against the reference's ``tokens_<d>``, ``embedding_<d>``, ``logits_<d>``, and the logits' top-1
    agreement (tolerance ``top1_agreement``, default 0.99), at each batch size of ``batches``
    (default 1 and all images; a fixed-batch graph runs at its batch).

    Returns:
        a :class:`~.parity.ParityResult` merging every exit and batch size (its ``runs`` by
        ``exit <d> batch <b>``).
    """
    x = reference["pixels"].astype(np.float32)
    labels = reference.get("labels")
    labels = labels if labels is not None and (np.asarray(labels) >= 0).all() else None
    runs = {}
    for b in batches or sorted({1, len(x)}):
        for d, got in zip(cascade.exits, cascade.run_all(x, b)):
            expected = {k: reference[f"{k}_{d}"] for k in OUTPUTS if f"{k}_{d}" in reference}
            runs[f"exit {d} batch {b}"] = compare_outputs(expected, got, tolerances, labels,
                                                          label=f"exit {d} batch {b}")
    return merge_results(runs, label="early-exit segments")


def check_bundle(bundle: str | Path, manifest: dict, providers=(CPU,), tolerances=None):
    """Parity of an early-exit bundle's segments against its ``early_exit/reference.npz`` (see
    :func:`check_segments`); the validator's check.

    Raises:
        InputError: the bundle lacks a segment or its reference outputs.
    """
    cascade = Cascade.from_manifest(bundle, manifest, providers)
    tolerances = manifest[SECTION].get("tolerances") or tolerances  # the segments' own precision's
    ref_path = Path(bundle) / manifest[SECTION].get("reference", f"{SECTION}/reference.npz")
    if not ref_path.is_file():
        raise InputError(f"{bundle}: bundle lacks {ref_path.relative_to(bundle)}")
    with np.load(ref_path) as npz:
        reference = {k: npz[k] for k in npz.files}
    fixed = [s.get_inputs()[0].shape[0] for s in cascade.sessions]
    batches = [fixed[0]] if isinstance(fixed[0], int) and fixed[0] > 0 else None
    return check_segments(cascade, reference, tolerances, batches)
