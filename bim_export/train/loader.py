"""The training data stream: which images form each step's batch, their augmentation and their masks.

A run is a function of its settings and ``seed``: the images of step ``s``, their augmentation and
their masks are drawn from generators seeded by ``(seed, s)``, never from a stream that depends on
what ran before. So a resumed run continues exactly as an uninterrupted one would, and a run on W
processes sees the same global batch and masks as a run on one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import IMAGENET_MEAN, IMAGENET_STD, ImageList, load_rgb, sample_images, scan_image_folder
from .distributed import DistInfo
from .model import BimModel


def _mix(*ints: int) -> int:
    """A 63-bit seed from several integers (stable across processes and runs)."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepSampler(torch.utils.data.Sampler):
    """Yields ``(position, index)`` for this rank's share of every micro-batch from ``start_step`` on.

    Position ``p = step * batch + j`` of the global stream maps to image ``perm_e[p % n]``, with one
    seeded permutation per epoch ``e = p // n``. Micro-batch ``a`` of a step holds positions
    ``[a * m, (a + 1) * m)`` (``m = batch / accum``); rank ``r`` takes the ``r``-th contiguous slice.
    """

    def __init__(self, n: int, batch: int, accum: int, info: DistInfo, seed: int, start_step: int, steps: int):
        self.n, self.batch, self.accum, self.info, self.seed = n, batch, accum, info, seed
        self.start, self.steps = start_step, steps
        self.micro = batch // accum
        self.local = self.micro // info.world_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def index(self, p: int) -> int:
        e = p // self.n
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, e))))
        return int(self._perm[1][p % self.n])

    def __iter__(self):
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                first = s * self.batch + a * self.micro + self.info.rank * self.local
                for p in range(first, first + self.local):
                    yield p, self.index(p)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum * self.local


class SeededDataset(torch.utils.data.Dataset):
    """Items keyed by ``(position, index)``; the augmentation of a position is seeded by it."""

    def __init__(self, base, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        p, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, 1, p))
            x = self.base[i]
        return x[0] if isinstance(x, (tuple, list)) else x


def mask_noise(model: BimModel, seed: int, step: int, micro: int, accum: int, batch: int, info: DistInfo):
    """This rank's rows of micro-batch ``micro`` of step ``step``'s masking noise: [local batch, N].

    The noise of the whole global batch is drawn from one ``(seed, step)`` generator and sliced like the
    images (see :class:`StepSampler`), so neither the process count nor accumulation changes the masks.
    """
    noise = model.mask_noise(batch, torch.Generator().manual_seed(_mix(seed, 2, step)))
    m = batch // accum
    local = m // info.world_size
    first = micro * m + info.rank * local
    return noise[first:first + local]


def image_dataset(data: Path | None, img_size: int, mean, std):
    """The training images with MAE's augmentation (``data`` None: the built-in sample set)."""
    images = sample_images() if data is None else scan_image_folder(data)
    return ImageFolderDataset(images, train_transform(img_size, mean, std))


def train_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """MAE's pretraining augmentation: random resized crop (scale 0.2-1), flip, normalize."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class ImageFolderDataset:
    """A torch-style dataset over an :class:`ImageList`: returns (image tensor, label)."""

    def __init__(self, images: ImageList, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.images.paths[i])), self.images.labels[i]
