"""The labelled images a fine-tuning run learns from and is scored on: the checks, the held-out
split it records, and the seeded, augmented training stream.

Labels are the class sub-folders (ImageFolder style, :func:`~bim_export.model.images.scan_image_folder`).
Without a validation folder, a fixed stratified part of every class is held out
(:func:`~bim_export.model.splits.stratified_indices`, seeded) and the checkpoint records which files.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..model.images import ImageList, load_image_array, load_rgb, scan_image_folder
from .loader import _mix
from ..model.splits import _subset, stratified_indices

HELDOUT_CACHE_BYTES = 512 << 20  # held-out images kept preprocessed in memory up to this size


@dataclass
class LabelledSplit:
    """The training and held-out images of a run, and how they were chosen.

    Attributes:
        classes: class names in logit order (sorted sub-folder names).
        train, heldout: the two parts (labels index ``classes``).
        record: config.json's ``finetune.split``.
    """

    classes: list[str]
    train: ImageList
    heldout: ImageList
    record: dict


def _labelled(root: Path, what: str) -> ImageList:
    images = scan_image_folder(root)
    unlabelled = sum(lbl < 0 for lbl in images.labels)
    if not images.classes:
        raise InputError(f"{root}: {what} needs one sub-folder per class (the folder name is the label); "
                         f"found {unlabelled} image{'s' * (unlabelled != 1)} directly in it and no class sub-folders")
    if unlabelled:
        raise InputError(f"{root}: {unlabelled} image{'s' * (unlabelled != 1)} sit directly in the folder, "
                         f"outside the class sub-folders; move them into a class or out of {root.name}")
    if len(images.classes) < 2:
        raise InputError(f"{root}: {what} needs at least 2 classes (sub-folders), found 1: {images.classes[0]}")
    return images


def _relative(paths: list[Path], root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in paths)


def load_labelled(data: str | Path, val_data: str | Path | None, val_fraction: float, seed: int) -> LabelledSplit:
    """The labelled folder ``data`` and its held-out part: ``val_data`` when given (same classes), else
    a seeded stratified ``val_fraction`` of every class.

    Raises:
        InputError: a folder without class sub-folders or with images outside them, a single class,
            a class too small to split (named), or ``val_data`` whose classes differ (listed).
    """
    data = Path(data)
    images = _labelled(data, "fine-tuning")
    counts = np.bincount(images.labels, minlength=len(images.classes))
    common = {"name": data.resolve().name, "data": str(data.resolve())}
    if val_data is None:
        small = [(c, int(n)) for c, n in zip(images.classes, counts) if n < 2]
        if small:
            listed = ", ".join(f"{c} ({n} image{'s' * (n != 1)})" for c, n in small[:5])
            raise InputError(f"{data}: class {listed}: the held-out split needs at least 2 images per class "
                             f"(one to train on, one to hold out); add images or pass --val-data")
        train_idx, val_idx = stratified_indices(images.labels, val_fraction, seed)
        train, heldout = _subset(images, train_idx), _subset(images, val_idx)
        record = {**common, "val_data": None, "size": len(heldout),
                  "protocol": f"stratified hold-out {val_fraction:.0%} per class, seed {seed}",
                  "seed": seed, "val_fraction": val_fraction, "heldout_files": _relative(heldout.paths, data)}
        return LabelledSplit(list(images.classes), train, heldout, record)
    val_root = Path(val_data)
    heldout = _labelled(val_root, "--val-data")
    if heldout.classes != images.classes:
        missing = sorted(set(images.classes) - set(heldout.classes))
        extra = sorted(set(heldout.classes) - set(images.classes))
        diff = "; ".join(filter(None, [f"missing: {', '.join(missing[:5])}" if missing else "",
                                       f"not in --data: {', '.join(extra[:5])}" if extra else ""]))
        raise InputError(f"{val_root}: --val-data classes differ from {data}'s ({diff})")
    record = {**common, "val_data": str(val_root.resolve()), "size": len(heldout),
              "protocol": "given validation folder",
              "seed": seed, "val_fraction": None, "heldout_files": _relative(heldout.paths, val_root)}
    return LabelledSplit(list(images.classes), images, heldout, record)


class AugmentedImages(torch.utils.data.Dataset):
    """Training items keyed by ``(position, index)`` of the step stream
    (:class:`~bim_export.train.loader.StepSampler`): the image, augmented by timm's training transform
    with every random source seeded by the position, and its label.

    So the augmentation of a position is the same in every run, resumed or not, on any number of
    processes or loader workers.
    """

    def __init__(self, images: ImageList, transform, seed: int):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        p, i = key
        s = _mix(self.seed, 3, p)
        state = random.getstate(), np.random.get_state()
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                x = self.transform(load_rgb(self.images.paths[i]))
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
        return x, self.images.labels[i]


class DeployedView:
    """The evaluation preprocessing (:func:`~bim_export.runtime.preprocess.preprocess`, what the device
    runs) of an image flipped at random and, when set, RandAugment-ed: training that adds no crop."""

    def __init__(self, img_size: int, mean, std, hflip: float, randaugment: str | None):
        self.size, self.mean, self.std, self.hflip = img_size, tuple(mean), tuple(std), hflip
        self.augment = None
        if randaugment:
            from timm.data.auto_augment import rand_augment_transform

            fill = tuple(round(255 * m) for m in self.mean)
            self.augment = rand_augment_transform(randaugment, {"translate_const": int(img_size * 0.45),
                                                                "img_mean": fill})

    def __call__(self, img) -> torch.Tensor:
        from PIL import ImageOps

        from ..runtime.preprocess import preprocess

        if self.augment is not None:
            img = self.augment(img)
        if self.hflip and random.random() < self.hflip:
            img = ImageOps.mirror(img)
        return torch.from_numpy(preprocess(img, self.size, self.mean, self.std))


def train_transform(img_size: int, mean, std, crop_scale, hflip: float, randaugment: str | None):
    """timm's training transform: random-resized crop (bicubic), flip, RandAugment when set, normalize;
    without ``crop_scale``, the deployed preprocessing with flip and RandAugment (:class:`DeployedView`)."""
    from timm.data import create_transform

    if crop_scale is None:
        return DeployedView(img_size, mean, std, hflip, randaugment)
    return create_transform(img_size, is_training=True, scale=tuple(crop_scale), hflip=hflip, color_jitter=None,
                            auto_augment=randaugment, interpolation="bicubic", mean=tuple(mean), std=tuple(std))


class HeldOut:
    """The held-out images, preprocessed as for deployment (:func:`~bim_export.runtime.preprocess.preprocess`),
    in batches; kept in memory when small."""

    def __init__(self, images: ImageList, img_size: int, mean, std, batch_size: int = 256):
        self.images, self.size, self.mean, self.std, self.batch = images, img_size, mean, std, batch_size
        self.labels = np.asarray(images.labels, dtype=np.int64)
        self._cache: list[np.ndarray] | None = None
        self._keep = len(images) * 3 * img_size * img_size * 4 <= HELDOUT_CACHE_BYTES

    def __len__(self) -> int:
        return len(self.images)

    def batches(self):
        """Yields float32 [B, 3, S, S] arrays, in the images' order."""
        if self._cache is not None:
            yield from self._cache
            return
        done = []
        for s in range(0, len(self.images), self.batch):
            part = _subset(self.images, range(s, min(s + self.batch, len(self.images))))
            x, _ = load_image_array(part, self.size, self.mean, self.std)
            done.append(x) if self._keep else None
            yield x
        if self._keep:
            self._cache = done
