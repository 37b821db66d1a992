"""Images in: folders of images, the built-in sample set, and the transforms both go through.

This module owns image-folder loading and the sample/calibration images for the whole package.
Label convention: ImageFolder style, one sub-folder per class; images directly under the root get
no label (``-1``). Preprocessing for evaluation, calibration and parity is one function,
:func:`bim_export.runtime.preprocess.preprocess` (PIL + numpy), the one a bundle's scripts run on the device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import InputError
from ..core.resources import sample_images_dir
from ..runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, UNREADABLE_IMAGE, image_extensions, preprocess

log = logging.getLogger(__name__)

SKIPPED_NAMED = 5  # skipped files named in the warning


@dataclass
class ImageList:
    """The readable images of a folder, with ImageFolder-style labels.

    Attributes:
        root: the folder scanned.
        paths: readable image files, sorted.
        labels: class index per path, -1 where the image sits directly under ``root``.
        classes: class names (sub-folder names), sorted; index = label.
        unreadable: files with an image extension that could not be decoded, each with why.
    """

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return bool(self.classes) and all(lbl >= 0 for lbl in self.labels)

    def __len__(self) -> int:
        return len(self.paths)



def list_image_files(root: str | Path) -> list[str]:
    """The image files under ``root`` by extension, recursively, without opening them.

    One ``os.scandir`` pass per folder and no ``stat`` per file (the entry's type comes with the
    listing), so a folder of a million images lists in seconds. Entries whose name starts with a
    dot are left out (``.DS_Store``, macOS ``._photo.jpg`` resource forks, ``.ipynb_checkpoints``).
    Symbolic links to folders outside ``root`` are followed (each target once); links into ``root``
    itself are not (they would list its images twice, or loop).

    Returns:
        Paths relative to ``root`` with ``/`` separators, in the order of their parts (``a/b.jpg``
        before ``a.b/c.jpg``, as sorting ``Path`` objects gives).

    Raises:
        InputError: ``root`` is missing, not a folder, unreadable, or holds no image files.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: data path is not a folder")
    names: list[str] = []
    extensions = image_extensions()
    inside = os.path.join(os.path.realpath(root), "")
    seen: set[str] = set()  # link targets outside root already listed
    stack = [(os.fspath(root), "")]
    while stack:
        folder, rel = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            if not rel:
                raise InputError(f"{root}: cannot list the data folder ({e.strerror or e})") from e
            log.warning("%s: sub-folder %s skipped, cannot list it (%s)", root, rel, e.strerror or e)
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                if name.lower().endswith(extensions) and entry.is_file():
                    names.append(rel + name)
                elif entry.is_dir():
                    if entry.is_symlink():
                        target = os.path.join(os.path.realpath(entry.path), "")
                        if target.startswith(inside) or target in seen:
                            continue
                        seen.add(target)
                    stack.append((entry.path, rel + name + "/"))
            except OSError:  # a dangling link, or an entry removed while listing
                continue
    if not names:
        raise InputError(f"{root}: no images found (looked recursively for the {len(extensions)} still-image "
                         f"formats Pillow reads here: .jpg, .png, .webp, .bmp, .tif, ...)")
    names.sort(key=lambda n: n.replace("/", "\0"))  # part by part, like sorted(Path)
    return names


def scan_image_folder(root: str | Path, verify: bool = True) -> ImageList:
    """Lists the images under ``root`` (see :func:`list_image_files`), checking each can be decoded.

    Unreadable files are counted, logged and left out; a folder with none readable is an error.
    ``verify=False`` only lists (training checks a sample at start-up and replaces a file that
    fails later, see :mod:`bim_export.train.loader`).

    Raises:
        InputError: the folder is missing, holds no image files, or none of them is readable.
    """
    root = Path(root)
    names = list_image_files(root)
    classes = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, bad = [], [], []
    for n in names:
        p = root / n
        why = unreadable_reason(p) if verify else None
        if why:
            bad.append((p, why))
            continue
        paths.append(p)
        labels.append(index[n.split("/", 1)[0]] if "/" in n else -1)
    if bad:
        named = "; ".join(f"{p.relative_to(root)} ({why})" for p, why in bad[:SKIPPED_NAMED])
        more = f"; +{len(bad) - SKIPPED_NAMED} more" if len(bad) > SKIPPED_NAMED else ""
        log.warning("%s: %d of %d images unreadable and skipped: %s%s", root, len(bad), len(names), named, more)
    if not paths:
        p, why = bad[0]
        raise InputError(f"{root}: none of the {len(names)} image files is readable (first: {p.name}: {why})")
    used = sorted(set(labels) - {-1})
    if used and len(used) < len(classes):  # drop classes whose every image was unreadable
        remap = {old: new for new, old in enumerate(used)}
        classes = [classes[i] for i in used]
        labels = [remap.get(lbl, -1) for lbl in labels]
    return ImageList(root, paths, labels, classes, bad)


def unreadable_reason(path: str | Path) -> str | None:
    """Why an image file cannot be used (one short phrase), or None when it decodes."""
    try:
        with Image.open(path) as im:
            im.load()  # decode fully: verify() alone misses truncated files
        return None
    except UNREADABLE_IMAGE as e:
        return describe_unreadable(e)


def describe_unreadable(e: BaseException) -> str:
    """One short phrase for an exception of :data:`UNREADABLE_IMAGE` raised while opening or decoding."""
    if isinstance(e, Image.DecompressionBombError):
        return f"decompression bomb: over Pillow's limit of {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_rgb(path: str | Path) -> Image.Image:
    """Opens an image as 8-bit RGB."""
    with Image.open(path) as im:
        return im.convert("RGB")


def load_image_array(
    images: ImageList | str | Path,
    size: int,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads (a seeded sample of) a folder as one preprocessed array.

    Returns:
        x: float32 [N, 3, size, size]; labels: int64 [N] (-1 where unlabelled).
    """
    if not isinstance(images, ImageList):
        images = scan_image_folder(images)
    idx = np.arange(len(images))
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    x = np.stack([preprocess(load_rgb(images.paths[i]), size, mean, std) for i in idx])
    y = np.asarray([images.labels[i] for i in idx], dtype=np.int64)
    return x, y


def sample_images() -> ImageList:
    """The built-in sample set: real photo crops, one class per source photo."""
    return scan_image_folder(sample_images_dir())


# ---------------------------------------------------------------- images for checks of an export


@dataclass
class Images:
    """Real images for calibration and parity, preprocessed as the checkpoint was trained."""

    calib: np.ndarray  # [Nc, 3, S, S]
    parity: np.ndarray  # [Np, 3, S, S]
    labels: np.ndarray  # [Np], -1 unlabelled
    folder: Path | None = None  # the --data folder; None: the built-in sample images
    found: int = 0  # image files in it, readable or not
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # files skipped, with why
    every_file_decoded: bool = False  # False: only the sampled files were decoded (the rest listed)

    def describe(self) -> dict:
        """What manifest.json records of the images parity and calibration were run on, with every
        file that was skipped as unreadable (path relative to the folder, and why)."""
        root = self.folder
        return {"folder": str(root) if root is not None else None,
                "source": "--data" if root is not None else "built-in sample images",
                "images": self.found, "parity_images": len(self.parity), "calibration_images": len(self.calib),
                "labelled": bool(len(self.labels)) and bool((self.labels >= 0).all()),
                "decoded": "every file" if self.every_file_decoded else "the sampled files",
                "unreadable": [{"file": _relative(p, root), "reason": why} for p, why in self.unreadable]}


def _relative(path: Path, root: Path | None) -> str:
    try:
        return path.relative_to(root).as_posix() if root is not None else str(path)
    except ValueError:
        return str(path)


def load_check_images(data: Path | None, config: dict, calib: int, parity: int, minimum: int) -> Images:
    """A seeded sample of the user's image folder (else the built-in set), preprocessed as the
    checkpoint (``config``: its config.json) was trained: ``calib`` images for int8 calibration and
    ``parity`` for parity checks.

    A large folder is not decoded whole: the files are listed, the sample is decoded, and only if
    one of those fails is the folder checked image by image (unreadable files are then skipped).

    Raises:
        InputError: the folder is missing, or holds fewer than ``minimum`` readable images.
    """
    if data is None:
        return _sample(sample_images(), config, calib, parity)
    try:
        images = _sample(scan_image_folder(data, verify=False), config, calib, parity)
    except UNREADABLE_IMAGE:  # an unreadable file was drawn
        images = _sample(scan_image_folder(data, verify=True), config, calib, parity)
        images.every_file_decoded = True
    if len(images.parity) < minimum:
        raise InputError(f"{data}: {len(images.parity)} readable image{'s' * (len(images.parity) != 1)}; parity "
                         f"and int8 calibration need at least {minimum} (add images, or leave out "
                         f"--data for the built-in sample set)")
    images.folder = Path(data)
    return images


def _sample(images: ImageList, config: dict, n_calib: int, n_parity: int) -> Images:
    size, mean, std = config["img_size"], config["mean"], config["std"]
    calib, _ = load_image_array(images, size, mean, std, limit=n_calib, seed=0)
    parity, labels = load_image_array(images, size, mean, std, limit=n_parity, seed=1)
    return Images(calib, parity, labels, found=len(images) + len(images.unreadable), unreadable=images.unreadable)
