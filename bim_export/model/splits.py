"""The evaluation protocol: how a labelled folder is split into reference and query images.

A labelled folder with ``train/`` and ``val/`` sub-folders (each ImageFolder style) is used as given;
a small labelled folder (under ``LOO_MAX`` images) is scored leave-one-out (kNN) and by k-fold
cross-validation (linear probe) over all its images, so that exits can still be told apart; any other
labelled folder is split per class, deterministically (seeded), into a reference part and a query
part. The metrics record which (``knn_dataset.protocol``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from .images import ImageList, scan_image_folder

VAL_FRACTION = 0.2
LOO_MAX = 500  # smaller labelled sets are scored leave-one-out: a held-out fifth would be too coarse
PROBE_FOLDS = 5
EVAL_LIMIT = 10_000  # images per split at most, a seeded sample beyond that


@dataclass
class EvalData:
    """A labelled evaluation set and how it is scored.

    Attributes:
        name: the data set's name (its folder name).
        images: every image of the set.
        train_idx, val_idx: reference and query images; both None for a small set, which is scored
            leave-one-out (kNN) and by k-fold (linear probe) over all its images.
        protocol: how it is scored, recorded in the metrics.
    """

    name: str
    images: ImageList
    train_idx: np.ndarray | None
    val_idx: np.ndarray | None
    protocol: str

    @property
    def leave_one_out(self) -> bool:
        return self.train_idx is None

    @property
    def size(self) -> int:
        return len(self.images)


def _require_labelled(images: ImageList) -> None:
    if not images.labelled:
        unl = sum(lbl < 0 for lbl in images.labels)
        raise InputError(f"{images.root}: evaluation needs a labelled folder (one sub-folder per class); "
                         f"{unl} of {len(images)} images sit directly in it without a class")
    if len(images.classes) < 2:
        raise InputError(f"{images.root}: evaluation needs at least 2 classes, found {len(images.classes)}")


def _subset(images: ImageList, idx) -> ImageList:
    return ImageList(images.root, [images.paths[i] for i in idx], [images.labels[i] for i in idx],
                     images.classes, [])


def stratified_indices(labels, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of labels >= 0: about ``val_fraction`` of each class to the query part
    (at least one where a class has two or more images), the rest to the reference part.

    Returns:
        (reference indices, query indices), each sorted.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train_idx, val_idx = [], []
    for c in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    return np.sort(np.asarray(train_idx, dtype=np.int64)), np.sort(np.asarray(val_idx, dtype=np.int64))


def stratified_folds(labels, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Seeded fold number per sample, dealt round-robin within each class (so every fold holds
    each class about equally)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fold = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % folds
    return fold


def stratified_split(images: ImageList, val_fraction: float = VAL_FRACTION, seed: int = 0):
    """:func:`stratified_indices` applied to a labelled list.

    Returns:
        (train ImageList, val ImageList).
    """
    train_idx, val_idx = stratified_indices(images.labels, val_fraction, seed)
    return _subset(images, train_idx), _subset(images, val_idx)


def make_eval_data(images: ImageList, name: str | None = None, seed: int = 0) -> EvalData:
    """Scores a labelled folder leave-one-out when it is small (under ``LOO_MAX`` images), else on a
    seeded stratified split.

    Raises:
        InputError: unlabelled folder or fewer than 2 classes (the message names the folder).
    """
    _require_labelled(images)
    name = name or images.root.resolve().name
    if len(images) < LOO_MAX:
        return EvalData(name, images, None, None,
                        f"leave-one-out kNN, {PROBE_FOLDS}-fold linear probe (under {LOO_MAX} images)")
    train_idx, val_idx = stratified_indices(images.labels, VAL_FRACTION, seed)
    return EvalData(name, images, train_idx, val_idx,
                    f"stratified {1 - VAL_FRACTION:.0%}/{VAL_FRACTION:.0%} split, seed {seed}")


def load_eval_data(data_dir: str | Path, seed: int = 0) -> EvalData:
    """Reads a labelled folder for evaluation: its ``train/`` and ``val/`` sub-folders when both
    exist (reference and query images), else the whole folder (see :func:`make_eval_data`).

    Raises:
        InputError: missing, empty or unlabelled folder (the message names it).
    """
    root = Path(data_dir)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        return make_eval_data(scan_image_folder(root), seed=seed)
    train, val = scan_image_folder(root / "train"), scan_image_folder(root / "val")
    for part in (train, val):
        _require_labelled(part)
    index = {c: i for i, c in enumerate(train.classes)}
    missing = sorted(set(val.classes) - set(index))
    if missing:
        raise InputError(f"{root / 'val'}: classes not in {root / 'train'}: {', '.join(missing[:5])}")
    both = ImageList(root, train.paths + val.paths,
                     train.labels + [index[val.classes[lbl]] for lbl in val.labels], train.classes,
                     train.unreadable + val.unreadable)
    return EvalData(root.resolve().name, both, np.arange(len(train)), np.arange(len(train), len(both)),
                    "train/ and val/ folders")


def task_data(ckpt, data_dir: str | Path) -> EvalData:
    """The labelled images a fine-tuned checkpoint is scored on: of the folder it was fine-tuned on,
    only the held-out files it recorded; of any other, every image (its classes must be labels).

    Raises:
        InputError: an unlabelled folder, or a class that is not one of the checkpoint's labels.
    """
    from . import classifier

    root = Path(data_dir)
    split = classifier.finetune_info(ckpt.config).get("split") or {}
    labels = classifier.labels(ckpt.config)
    images = scan_image_folder(root)
    _require_labelled(images)
    unknown = sorted(set(images.classes) - set(labels))
    if unknown:
        raise InputError(f"{root}: classes that are not labels of {ckpt.path}: {', '.join(unknown[:5])} "
                         f"(its labels: {', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")
    index = [labels.index(c) for c in images.classes]
    images = ImageList(images.root, images.paths, [index[lbl] for lbl in images.labels], list(labels),
                       images.unreadable)
    name, protocol = root.resolve().name, "every image of the folder"
    if split.get("data") == str(root.resolve()) and split.get("val_data") is None and split.get("heldout_files"):
        held = set(split["heldout_files"])
        keep = [i for i, p in enumerate(images.paths) if p.relative_to(root).as_posix() in held]
        images, protocol = _subset(images, keep), f"{split.get('protocol')} (the images held out in fine-tuning)"
    return EvalData(name, images, None, np.arange(len(images)), protocol)
