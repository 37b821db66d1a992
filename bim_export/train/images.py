"""Training images: MAE's random resized crop and flip, drawn on the CPU, applied by PIL or by tensor ops.

Two pipelines apply the same crop. Its parameters are drawn by :func:`draw_crop` from a generator
seeded by the image's place in the stream (see :mod:`bim_export.train.loader`), so a run is
reproducible whichever pipeline runs it:

* ``cpu``: the loader workers decode with PIL, crop, resize (bicubic) and flip, and send uint8 crops.
* ``gpu``: the workers read the JPEG bytes and the image size from the header only, and send the
  bytes with the crop; where the model runs, the batch is decoded in one call
  (``torchvision.io.decode_jpeg``, nvJPEG on CUDA), then cropped, resized (bicubic, antialiased) and
  flipped as tensors. Other formats, CMYK JPEGs and files that fail a cheap check are decoded by PIL
  in the worker, as in the ``cpu`` pipeline.

Both end as uint8-valued pixels that are scaled and normalized on the device, so the workers never
send float32 images (a quarter of the bytes through shared memory and pinned copies).

The two pipelines give the same crop geometry and nearly the same pixels: PIL resamples in two
fixed-point passes with the intermediate rounded to 8 bits, torch in float (see tests/train/test_images.py).
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.errors import InputError
from ..model.images import UNREADABLE_IMAGE, describe_unreadable, list_image_files, unreadable_reason

log = logging.getLogger(__name__)

SCALE = (0.2, 1.0)  # MAE's crop area range (fraction of the image)
RATIO = (3 / 4, 4 / 3)  # crop aspect ratio range
PIPELINES = ("auto", "cpu", "gpu")
STARTUP_SAMPLE = 32  # images decoded at start-up to tell an image folder from one of unreadable files
DEVICE_DECODED = ("RGB", "L")  # JPEG modes decode_jpeg turns into RGB like PIL (not CMYK, not YCCK)


@dataclass(frozen=True)
class Crop:
    """A crop box in the source image's pixels, and whether the result is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def as_list(self) -> list[int]:
        return [self.top, self.left, self.height, self.width, int(self.flip)]

    @classmethod
    def from_list(cls, v) -> Crop:
        top, left, height, width, flip = (int(x) for x in v)
        return cls(top, left, height, width, bool(flip))


def draw_crop(width: int, height: int, rng: random.Random, scale=SCALE, ratio=RATIO) -> Crop:
    """torchvision's ``RandomResizedCrop.get_params`` and a horizontal flip, from ``rng`` alone.

    Ten tries at a box of random area (``scale`` of the image) and log-uniform aspect ``ratio``
    that fits; else the central crop of the clamped aspect ratio.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return Crop(top, left, h, w, rng.random() < 0.5)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return Crop((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def crop_pil(img: Image.Image, crop: Crop, size: int) -> torch.Tensor:
    """The crop of an RGB image resized to ``size`` (PIL bicubic) and flipped: uint8 [3, size, size]."""
    box = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
    out = img.crop(box).resize((size, size), Image.BICUBIC)
    if crop.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def crop_tensor(img: torch.Tensor, crop: Crop, size: int) -> torch.Tensor:
    """The same on a decoded image tensor (uint8 [3, H, W], any device): float [3, size, size]
    holding whole numbers in 0..255, as PIL's 8-bit result does."""
    out = torch.empty(1, 3, size, size, device=img.device)
    crop_tensors([img], [crop], size, out, [0])
    return out[0]


def crop_tensors(imgs: list[torch.Tensor], crops: list[Crop], size: int, out: torch.Tensor, rows: list[int]) -> None:
    """:func:`crop_tensor` of each image into ``out[row]`` (float [B, 3, size, size]); rounding,
    clamping and flipping run once for the batch (fewer kernel launches per image on a GPU)."""
    for img, crop, row in zip(imgs, crops, rows):
        x = img[None, :, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width].float()
        out[row] = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    if not rows:
        return
    idx = torch.tensor(rows, device=out.device)
    out[idx] = out[idx].round_().clamp_(0, 255)
    flipped = [row for row, crop in zip(rows, crops) if crop.flip]
    if flipped:
        idx = torch.tensor(flipped, device=out.device)
        out[idx] = out[idx].flip(-1)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """Pixels in 0..255 (uint8 or float) [B, 3, H, W] -> float32 ``(x / 255 - mean) / std``."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255 - m) / s


class UnreadableImage(Exception):
    """An image of the stream that cannot be used; the stream replaces it (see loader.SeededDataset)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass
class EncodedJpeg:
    """A JPEG to decode where the model runs: its bytes (uint8 [n]), the crop to apply, its image index."""

    data: torch.Tensor
    crop: Crop
    index: int


class TrainImages:
    """The images of a folder for training: files listed, never all decoded up front.

    ``load(i, rng)`` returns image ``i`` augmented with a crop drawn from ``rng``: a uint8
    [3, size, size] tensor, or, with ``decode_on_device``, an :class:`EncodedJpeg` for a plain
    JPEG. A file that cannot be used raises :class:`UnreadableImage`.

    Names are held in one numpy array of bytes, not a list of str: the loader's worker processes
    are forked, and touching a million Python objects would copy their pages into every worker.
    """

    def __init__(self, root: str | Path, names: list[str], size: int, decode_on_device: bool = False):
        self.root = Path(root)
        self._root = os.fsencode(self.root)
        self._names = np.array([os.fsencode(n) for n in names])
        self.size, self.decode_on_device = size, decode_on_device

    def __len__(self) -> int:
        return len(self._names)

    def name(self, i: int) -> str:
        return os.fsdecode(self._names[i])

    def path(self, i: int) -> bytes:
        return os.path.join(self._root, self._names[i])

    def load(self, i: int, rng: random.Random, decode: bool = False):
        """Image ``i`` with a crop drawn from ``rng``; ``decode``: always decoded here (PIL).

        Raises:
            UnreadableImage: the file cannot be read or decoded.
        """
        try:
            with open(self.path(i), "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as im:
                crop = draw_crop(*im.size, rng)
                if (self.decode_on_device and not decode and im.format == "JPEG" and im.mode in DEVICE_DECODED
                        and _ends_like_jpeg(data)):
                    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), crop, i)
                return crop_pil(im.convert("RGB"), crop, self.size)
        except UNREADABLE_IMAGE as e:  # OSError covers a file that vanished or cannot be read
            raise UnreadableImage(self.name(i), describe_unreadable(e)) from None


def _ends_like_jpeg(data: bytes) -> bool:
    """A complete JPEG ends with the EOI marker (some writers pad after it): a truncated file does
    not, and is left to PIL, which names the fault, instead of failing the whole batch's decode."""
    return b"\xff\xd9" in data[-32:]


def training_images(data: Path, size: int, decode_on_device: bool, seed: int) -> TrainImages:
    """The images of ``data`` for training: listed, and a seeded sample of them decoded.

    Raises:
        InputError: the folder is missing or holds no image files, or none of the sampled files
            is readable (the message names the folder and the first file's fault).
    """
    names = list_image_files(data)
    check_readable_sample(Path(data), names, seed)
    return TrainImages(data, names, size, decode_on_device)


def check_readable_sample(root: Path, names: list[str], seed: int, n: int = STARTUP_SAMPLE) -> None:
    """Decodes a seeded sample of ``n`` files: an error if none decodes, a warning if some do not.

    A folder of unreadable files is caught here, before training; an unreadable file among readable
    ones is replaced in the stream when training meets it.
    """
    picked = sorted(random.Random(seed).sample(range(len(names)), min(n, len(names))))
    bad = [(names[i], why) for i in picked if (why := unreadable_reason(root / names[i]))]
    if len(bad) == len(picked):
        first = f"first: {Path(bad[0][0]).name}: {bad[0][1]}"
        if len(picked) == len(names):
            raise InputError(f"{root}: none of the {len(names)} image files is readable ({first})")
        raise InputError(f"{root}: none of {len(picked)} image files sampled (of {len(names)}) is readable "
                         f"({first})")
    if bad:
        log.warning("%s: %d of %d sampled images unreadable (%s: %s); training replaces each unreadable image "
                    "with the next of its stream", root, len(bad), len(picked), *bad[0])


# ------------------------------------------------------------------------------ the device side


def resolve_pipeline(setting: str, device: torch.device, where: str = "data_pipeline") -> str:
    """``cpu`` or ``gpu`` for a ``data_pipeline`` setting and the training device.

    Raises:
        InputError: ``gpu`` without CUDA, or where torchvision cannot decode JPEGs on it.
    """
    if setting == "cpu":
        return "cpu"
    if device.type != "cuda":
        if setting == "gpu":
            raise InputError(f"{where}: gpu needs training on CUDA (device is {device.type}); use cpu or auto")
        return "cpu"
    why = _device_decode_fault(device)
    if why is None:
        return "gpu"
    if setting == "gpu":
        raise InputError(f"{where}: gpu: torchvision cannot decode JPEGs on {device} ({why}); use cpu or auto")
    log.warning("JPEG decoding on %s unavailable (%s): images are decoded by the loader workers", device, why)
    return "cpu"


def _device_decode_fault(device: torch.device) -> str | None:
    from torchvision.io import decode_jpeg

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, format="JPEG")
    try:
        decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), device=device)
        return None
    except (RuntimeError, TypeError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decodes JPEG bytes to RGB uint8 [3, H, W] on ``device``, in one call when they all decode;
    else one by one, None for each that fails there."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_pil(data: torch.Tensor, crop: Crop, size: int) -> torch.Tensor | None:
    """The CPU pipeline's result for JPEG bytes the device could not decode; None if PIL cannot either."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return crop_pil(im.convert("RGB"), crop, size)
    except UNREADABLE_IMAGE:
        return None
