"""The training data stream: which images form each step's batch, their augmentation and their masks.

A run is a function of its settings and ``seed``: the images of step ``s``, their augmentation and
their masks are drawn from generators seeded by ``(seed, s)``, never from a stream that depends on
what ran before. So a resumed run continues exactly as an uninterrupted one would, and a run on W
processes sees the same global batch and masks as a run on one.

An image that cannot be decoded is replaced by the next image of the stream (position ``p + 1``,
then ``p + 2`` ...; its own augmentation seeded by the position and the try), so the replacement is
the same in every run, resumed or not. The worker that met it says so with the batch
(:class:`Batch`), and :class:`BadImages` counts and names it once.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from dataclasses import dataclass, field

import torch

from ..core.errors import InputError
from .bad_images import BadImages
from .distributed import DistInfo
from .images import Crop, EncodedJpeg, UnreadableImage, crop_tensors, decode_jpegs, decode_pil, normalize
from .model import BimModel

PREFETCH = 2  # batches finished on the device ahead of the step that uses them


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
    """Items keyed by ``(position, index)``; the augmentation of a position is seeded by it.

    ``base`` is either a training image source with ``load(i, rng, decode)`` (see
    :class:`~bim_export.train.images.TrainImages`), whose unreadable images are replaced by the
    next of the stream (``index(p + k)``, at most ``tries`` images), or any ``ds[i]`` -> tensor or
    (tensor, label), used as is.

    An item is ``(position, index, sample, skipped)``: sample None when ``tries`` images in a row
    were unreadable; skipped: (name, reason) of each unreadable image passed over.
    """

    def __init__(self, base, seed: int, index=None, tries: int = 1):
        self.base, self.seed, self.index, self.tries = base, seed, index, tries

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        return self.item(*key)

    def item(self, p: int, i: int, start: int = 0, decode: bool = False):
        """The item at position ``p`` (image ``i``), trying from the ``start``-th image on; ``decode``:
        decode here even where the pipeline would leave it to the device."""
        if not hasattr(self.base, "load"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, 1, p))
                x = self.base[i]
            return p, i, (x[0] if isinstance(x, (tuple, list)) else x), []
        skipped = []
        for k in range(start, self.tries):
            ik = i if k == 0 else self.index(p + k)
            try:
                return p, ik, self.base.load(ik, random.Random(_mix(self.seed, 1, p, k)), decode), skipped
            except UnreadableImage as e:
                skipped.append((e.name, e.reason))
        return p, i, None, skipped


@dataclass
class Batch:
    """One micro-batch as the loader workers send it.

    Attributes:
        pixels: [B, 3, H, W]; uint8 (0..255, normalized on the device; rows still to decode are
            zeros) or float (a dataset's own tensors, used as is).
        positions: stream position of each row.
        encoded: rows to decode on the device; ``jpeg`` holds their bytes back to back
            (``jpeg_sizes`` each), ``crops`` their crops, ``jpeg_index`` their image indices.
        skipped: (name, reason) of every unreadable image passed over for this batch.
        unfilled: positions for which a whole batch's worth of images in a row was unreadable.
    """

    pixels: torch.Tensor
    positions: list[int]
    encoded: list[int] = field(default_factory=list)
    jpeg: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    jpeg_sizes: list[int] = field(default_factory=list)
    crops: list[list[int]] = field(default_factory=list)
    jpeg_index: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unfilled: list[int] = field(default_factory=list)

    def pin_memory(self) -> Batch:  # called by the DataLoader's pinning thread
        self.pixels = self.pixels.pin_memory()
        self.jpeg = self.jpeg.pin_memory()
        return self


class Collate:
    """Builds a :class:`Batch` from items (in the worker, so one shared-memory tensor crosses over)."""

    def __init__(self, size: int | None):
        self.size = size

    def __call__(self, items) -> Batch:
        samples = [s for _, _, s, _ in items]
        skipped = [x for *_, sk in items for x in sk]
        positions = [p for p, *_ in items]
        unfilled = [p for p, _, s, _ in items if s is None]
        dense = [s for s in samples if isinstance(s, torch.Tensor)]
        if len(dense) == len(samples):  # all decoded already (or a dataset's own tensors)
            return Batch(torch.stack(dense), positions, skipped=skipped)
        size = self.size or (dense[0].shape[-1] if dense else 1)
        pixels = torch.zeros(len(samples), 3, size, size, dtype=torch.uint8)
        batch = Batch(pixels, positions, skipped=skipped, unfilled=unfilled)
        for row, s in enumerate(samples):
            if isinstance(s, EncodedJpeg):
                batch.encoded.append(row)
                batch.jpeg_sizes.append(len(s.data))
                batch.crops.append(s.crop.as_list())
                batch.jpeg_index.append(s.index)
            elif s is not None:
                pixels[row] = s
        if batch.encoded:
            batch.jpeg = torch.cat([samples[r].data for r in batch.encoded])
        return batch


class TrainStream:
    """The micro-batches of a run from ``start_step`` on, ready on the training device.

    Workers load and augment (see :class:`SeededDataset`); a thread finishes each batch where the
    model runs (decodes its JPEGs on the GPU pipeline, normalizes), on its own CUDA stream, up to
    ``PREFETCH`` batches ahead, so that work overlaps the training step. Unreadable images are
    recorded in :attr:`bad` as each batch is taken, in step order.

    Args:
        source: a :class:`~bim_export.train.images.TrainImages` or a dataset used as is.
        bad: the record of unreadable images (restored from the checkpoint on resume).
    """

    def __init__(self, source, *, batch_size: int, accum_steps: int, seed: int, steps: int, start_step: int,
                 num_workers: int, info: DistInfo, device: torch.device, mean, std, bad: BadImages):
        self.sampler = StepSampler(len(source), batch_size, accum_steps, info, seed, start_step, steps)
        self.dataset = SeededDataset(source, seed, self.sampler.index, tries=batch_size)
        self.size = getattr(source, "size", None)
        self.device, self.bad = device, bad
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)  # moved to the device once
        self.batch_size = batch_size
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.sampler.local, sampler=self.sampler, num_workers=num_workers,
            collate_fn=Collate(self.size), pin_memory=device.type == "cuda", persistent_workers=False)

    def finish(self, batch: Batch) -> torch.Tensor:
        """The batch as model input on the device: JPEGs decoded and cropped, pixels normalized."""
        x = batch.pixels.to(self.device, non_blocking=True)
        if x.is_floating_point() and not batch.encoded:
            return x
        x = x.float()
        datas = list(torch.split(batch.jpeg, batch.jpeg_sizes)) if batch.encoded else []
        decoded = []  # (image, crop, row) decoded on the device
        for row, img, data, crop, i in zip(batch.encoded, decode_jpegs(datas, self.device), datas, batch.crops,
                                           batch.jpeg_index):
            crop = Crop.from_list(crop)
            if img is not None:
                decoded.append((img, crop, row))
                continue
            pixels = decode_pil(data, crop, self.size)  # what the cpu pipeline would have made of it
            if pixels is None:  # unreadable after all: the next of the stream, decoded here
                batch.skipped.append((self.dataset.base.name(i), "the GPU and PIL cannot decode it"))
                _, _, pixels, skipped = self.dataset.item(batch.positions[row], i, start=1, decode=True)
                batch.skipped += skipped
                if pixels is None:
                    batch.unfilled.append(batch.positions[row])
                    continue
            x[row] = pixels.to(self.device)
        imgs, crops, rows = (list(v) for v in zip(*decoded)) if decoded else ([], [], [])
        crop_tensors(imgs, crops, self.size, x, rows)
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return normalize(x, self.mean, self.std)

    def __iter__(self):
        batches = iter(self.loader)  # forks the workers here, in the training thread
        q: queue.Queue = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()
        # CUDA's current device is per thread: the training thread's (its local rank under torchrun)
        gpu = (self.device.index if self.device.index is not None else torch.cuda.current_device()
               if self.device.type == "cuda" else None)
        thread = threading.Thread(target=self._work, args=(batches, q, stop, gpu), daemon=True, name="bim-batches")
        thread.start()
        try:
            while True:
                got = q.get()
                if got is None:
                    return
                if isinstance(got, BaseException):
                    raise got
                x, event, batch = got
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)  # made on the side stream, used on this one
                self.bad.add(batch.skipped)
                if batch.unfilled:
                    raise InputError(self._unfilled_message(batch))
                yield x
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    q.get_nowait()  # unblock a waiting put
            thread.join(timeout=30)

    def _work(self, batches, q: queue.Queue, stop: threading.Event, gpu: int | None) -> None:
        cuda = gpu is not None
        try:
            if cuda:
                torch.cuda.set_device(gpu)
            side = torch.cuda.Stream(gpu) if cuda else None
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in batches:
                    x = self.finish(batch)
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record(side)
                    if not _put(q, (x, event, batch), stop):
                        return
            _put(q, None, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            _put(q, e, stop)

    def _unfilled_message(self, batch: Batch) -> str:
        root = getattr(self.dataset.base, "root", "data")
        step = batch.unfilled[0] // self.batch_size
        names = ", ".join(f"{n} ({why})" for n, why in batch.skipped[:2])
        return (f"{root}: none of {self.batch_size} images in a row of the training stream is readable (step "
                f"{step + 1}; e.g. {names}); {self.bad.count} unreadable images met so far")


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


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
