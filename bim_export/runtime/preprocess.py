"""Evaluation preprocessing, one implementation for both sides: the package's calibration, parity and
evaluation images, and a bundle's inference script on the device (PIL + numpy, no torch).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
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
