"""Image folders: listing without decoding, and the checked scan built on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bim_export.core.errors import InputError
from bim_export.core.resources import sample_images_dir
from bim_export.model.images import list_image_files, scan_image_folder


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def test_listing_is_relative_sorted_by_parts_and_matches_rglob():
    root = sample_images_dir()
    names = list_image_files(root)
    assert len(names) == 60 and names[0] == "astronaut/astronaut_00.jpg"
    assert [root / n for n in names] == sorted(p for p in root.rglob("*.jpg"))


def test_listing_order_is_path_order_not_string_order(tmp_path):
    _touch(tmp_path, "a.b/c.jpg", "a/b.jpg", "a-b/c.JPG", "z.jpeg", "a/x/y.png", "notes.txt", "a/readme.md")
    names = list_image_files(tmp_path)
    assert names == ["a/b.jpg", "a/x/y.png", "a-b/c.JPG", "a.b/c.jpg", "z.jpeg"]
    assert [tmp_path / n for n in names] == sorted(tmp_path / n for n in names)


def test_hidden_entries_are_left_out(tmp_path):
    _touch(tmp_path, "cat/1.jpg", "cat/._1.jpg", ".cache/2.jpg", "cat/.ipynb_checkpoints/3.jpg")
    assert list_image_files(tmp_path) == ["cat/1.jpg"]


def test_links_outside_are_followed_links_inside_are_not(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    _touch(data, "a/1.jpg")
    _touch(other, "2.jpg")
    os.symlink(data / "a", data / "a" / "loop")  # a cycle
    os.symlink(data / "a", data / "alias")  # the same images under a second name
    os.symlink(other, data / "ext")
    os.symlink(other, other / "self")
    os.symlink(tmp_path / "missing", data / "dangling")
    assert list_image_files(data) == ["a/1.jpg", "ext/2.jpg"]


def test_listing_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match=r"missing: data folder does not exist"):
        list_image_files(tmp_path / "missing")
    _touch(tmp_path, "f.jpg", "empty/notes.txt")
    with pytest.raises(InputError, match=r"f\.jpg: data path is not a folder"):
        list_image_files(tmp_path / "f.jpg")
    with pytest.raises(InputError, match=r"empty: no images found"):
        list_image_files(tmp_path / "empty")


def test_scan_labels_come_from_the_first_folder(tmp_path):
    _touch(tmp_path, "dog/a/1.jpg", "cat/2.jpg", "3.jpg")
    images = scan_image_folder(tmp_path, verify=False)
    assert images.classes == ["cat", "dog"]
    assert [(p.relative_to(tmp_path).as_posix(), lbl) for p, lbl in zip(images.paths, images.labels)] == [
        ("3.jpg", -1), ("cat/2.jpg", 0), ("dog/a/1.jpg", 1)]
    with pytest.raises(InputError, match=r"none of the 3 image files is readable"):
        scan_image_folder(tmp_path)  # empty files do not decode


@pytest.mark.slow
def test_shipped_image_sets_are_rebuilt_exactly_and_share_no_photo(tmp_path):
    """The sample images (training) and the held-out images (the default checkpoint's evaluation)
    come from the wheels' photos as the package's builders make them, and from different photos."""
    from make_assets import make_heldout_crops, make_sample_crops

    from bim_export.core.resources import heldout_images_dir, sample_images_dir

    for make, shipped in ((make_sample_crops, sample_images_dir()), (make_heldout_crops, heldout_images_dir())):
        assert make(tmp_path / shipped.name) == len(scan_image_folder(shipped))
        for path in scan_image_folder(shipped).paths:
            rel = Path(path).relative_to(shipped)
            assert (tmp_path / shipped.name / rel).read_bytes() == Path(path).read_bytes(), rel
    held, sample = scan_image_folder(heldout_images_dir()), scan_image_folder(sample_images_dir())
    assert len(held.classes) == 9 and len(held) == 90
    assert not set(held.classes) & set(sample.classes)


def test_every_still_image_format_pillow_reads_is_an_image(tmp_path):
    """TIFF, GIF, PPM, TGA, ... are listed and decoded; moving pictures, PostScript and stub formats
    (no decoder without an application's handler) are not images here."""
    import numpy as np
    from PIL import Image

    from bim_export.model.images import image_extensions

    exts = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".tga"} <= set(exts)
    assert not {".mpg", ".fli", ".eps", ".ps", ".h5", ".grib", ".wmf", ".pdf", ".txt"} & set(exts)
    rng = np.random.default_rng(0)
    for name in ("a/1.tiff", "a/2.TIF", "b/3.gif", "b/4.ppm", "b/5.tga", "b/6.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    _touch(tmp_path, "b/clip.mpg", "b/figure.eps", "b/notes.txt")
    images = scan_image_folder(tmp_path)
    assert [p.name for p in images.paths] == ["1.tiff", "2.TIF", "3.gif", "4.ppm", "5.tga", "6.png"]
    assert images.unreadable == [] and images.classes == ["a", "b"]
