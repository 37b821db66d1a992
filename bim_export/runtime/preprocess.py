"""Evaluation preprocessing, one implementation for both sides: the package's calibration, parity and
evaluation images, and a bundle's inference script on the device (PIL + numpy, no torch).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageFile

# Formats Pillow opens that are not still photos: animations and video (FLI/FLC, MPEG), and
# PostScript (vector; rasterizing it needs Ghostscript). Stub formats (BUFR, GRIB, HDF5, WMF), which
# decode only through a handler an application registers, are left out by their class.
NOT_STILL_IMAGES = frozenset({"FLI", "MPEG", "EPS"})
# What decoding a bad file raises: truncated or corrupt data, and images over Pillow's pixel limit
# (Image.MAX_IMAGE_PIXELS x 2; a 20000 x 20000 PNG of a few KB would take 1.2 GB as RGB).
UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    img: Image.Image, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> np.ndarray:
    """Evaluation preprocessing: resize the shorter side to ``size`` (bicubic), centre crop, normalize.

    Returns:
        float32 array [3, size, size].
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@functools.cache
def image_extensions() -> tuple[str, ...]:
    """File extensions (lower case, with the dot) of every still-image format the installed Pillow
    decodes: JPEG, PNG, WebP, BMP, TIFF, GIF, AVIF, JPEG 2000, PPM, TGA, ... as that build has them.

    Computed on first use (registering Pillow's plugins takes a tenth of a second).
    """
    Image.init()
    out = []
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        if factory is None or fmt in NOT_STILL_IMAGES:
            continue
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue
        out.append(ext.lower())
    return tuple(sorted(set(out)))
