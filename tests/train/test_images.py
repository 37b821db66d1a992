"""Training images: the crop drawn once, applied by PIL (cpu pipeline) or by tensor ops (gpu pipeline).

No GPU is needed: the gpu pipeline's code runs on the CPU too (decode_jpeg on the CPU, the same
tensor ops), so its logic is tested here against the PIL path.

Pixel tolerance, in 0..255 levels after the resize: mean |difference| <= 0.5 and max <= 16. Both
paths decode with libjpeg-turbo (identical pixels on the CPU; nvJPEG on a GPU may differ by a level
or two more) and both use a bicubic kernel with a = -0.5 and antialiasing, but PIL resamples in two
fixed-point passes and rounds the intermediate to 8 bits, torch in float. Over 600 random crops of 8
photos to 32..224 px the mean difference was at most 0.2 levels and the largest single pixel 11
(high-contrast edges under strong downscaling; half the crops stay within 2). The mean is the tight
check; a crop shifted by 3 pixels differs by several levels on average.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from make_assets import _wheel_photos
from PIL import Image

from bim_export.core.resources import sample_images_dir
from bim_export.train.bad_images import BadImages
from bim_export.train.distributed import DistInfo
from bim_export.train.images import (Crop, EncodedJpeg, TrainImages, UnreadableImage, crop_pil, crop_tensor,
                                     draw_crop, normalize, resolve_pipeline, training_images)
from bim_export.core.errors import InputError
from bim_export.train.loader import TrainStream

MEAN_LEVELS, MAX_LEVELS = 0.5, 16


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Six 500 x 375 JPEGs (ImageNet-like) of real photos, a PNG, and a CMYK JPEG."""
    root = tmp_path_factory.mktemp("photos")
    photos = _wheel_photos()
    for name in ("astronaut", "chelsea", "coffee", "rocket", "china", "flower"):
        Image.fromarray(photos[name]).convert("RGB").resize((500, 375), Image.BICUBIC).save(
            root / f"{name}.jpg", quality=90)
    Image.fromarray(photos["camera"]).convert("RGB").resize((300, 300)).save(root / "camera.png")
    Image.fromarray(photos["retina"]).convert("CMYK").resize((400, 300)).save(root / "retina_cmyk.jpg")
    return root


def _stream(images, **kw) -> list[torch.Tensor]:
    settings = dict(batch_size=4, accum_steps=1, seed=3, steps=4, start_step=0, num_workers=0, info=DistInfo(),
                    device=torch.device("cpu"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), bad=BadImages("x"))
    settings.update(kw)
    return list(TrainStream(images, **settings))


# ------------------------------------------------------------------------------ the crop


def test_crop_is_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    rng = random.Random(0)
    crops = [draw_crop(500, 375, rng) for _ in range(2000)]
    area = np.array([c.height * c.width / (500 * 375) for c in crops])
    ratio = np.array([c.width / c.height for c in crops])
    assert all(0 <= c.top and c.top + c.height <= 375 and 0 <= c.left and c.left + c.width <= 500 for c in crops)
    assert area.min() >= 0.19 and area.max() <= 1.0 and ratio.min() >= 0.74 and ratio.max() <= 1.34
    assert abs(np.mean([c.flip for c in crops]) - 0.5) < 0.03
    torch.manual_seed(0)  # torchvision's own draws: the same distribution (means within 2 standard errors)
    tv = [RandomResizedCrop.get_params(torch.zeros(3, 375, 500), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    tv_area = np.array([h * w / (500 * 375) for _, _, h, w in tv])
    tv_ratio = np.array([w / h for _, _, h, w in tv])
    assert abs(area.mean() - tv_area.mean()) < 2 * math.sqrt(2 / 2000) * tv_area.std()
    assert abs(ratio.mean() - tv_ratio.mean()) < 2 * math.sqrt(2 / 2000) * tv_ratio.std()
    assert draw_crop(500, 375, random.Random(7)) == draw_crop(500, 375, random.Random(7))
    # a strip no crop fits in ten tries: the central crop at the nearest allowed aspect ratio
    strip = draw_crop(1000, 10, random.Random(1))
    assert (strip.height, strip.width, strip.top) == (10, 13, 0) and strip.left == (1000 - 13) // 2


@pytest.mark.parametrize("crop, size", [
    (Crop(20, 30, 300, 400, False), 224),  # downscale
    (Crop(0, 0, 375, 500, True), 64),  # strong downscale, flipped
    (Crop(100, 150, 90, 120, True), 224),  # upscale
    (Crop(5, 7, 33, 29, False), 32),
])
def test_tensor_path_matches_pil_path(photo_folder, crop, size):
    path = photo_folder / "astronaut.jpg"
    pil = crop_pil(Image.open(path).convert("RGB"), crop, size)
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    decoded = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    assert torch.equal(decoded, torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
    tensor = crop_tensor(decoded, crop, size)
    assert pil.shape == tensor.shape == (3, size, size) and pil.dtype == torch.uint8
    assert torch.equal(tensor, tensor.round()) and 0 <= tensor.min() and tensor.max() <= 255
    diff = (tensor - pil.float()).abs()
    assert diff.mean() <= MEAN_LEVELS and diff.max() <= MAX_LEVELS, (diff.mean(), diff.max())
    # the geometry is the same: a flip or a shifted box would differ by tens of levels on this photo
    shifted = crop_tensor(decoded, Crop(crop.top + 3, crop.left, crop.height, crop.width, crop.flip), size)
    assert (shifted - pil.float()).abs().mean() > 4 * MEAN_LEVELS


def test_normalize_is_totensor_then_normalize():
    from torchvision.transforms import functional as TF

    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    want = torch.stack([TF.normalize(TF.to_tensor(xi.permute(1, 2, 0).numpy()), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
                        for xi in x])
    assert torch.allclose(normalize(x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), want, atol=1e-6)


# ------------------------------------------------------------------------------ the two pipelines


def test_workers_leave_plain_jpegs_to_the_device_and_decode_the_rest(photo_folder):
    names = ["astronaut.jpg", "camera.png", "retina_cmyk.jpg"]
    images = TrainImages(photo_folder, names, 64, decode_on_device=True)
    jpeg, png, cmyk = (images.load(i, random.Random(i)) for i in range(3))
    assert isinstance(jpeg, EncodedJpeg) and jpeg.index == 0
    assert bytes(jpeg.data.numpy()) == (photo_folder / "astronaut.jpg").read_bytes()
    assert jpeg.crop == draw_crop(500, 375, random.Random(0))  # drawn from the header's size, not decoded
    for other in (png, cmyk):
        assert isinstance(other, torch.Tensor) and other.shape == (3, 64, 64) and other.dtype == torch.uint8
    cpu = TrainImages(photo_folder, names, 64)
    decoded = cpu.load(0, random.Random(0))
    assert torch.equal(decoded, crop_pil(Image.open(photo_folder / "astronaut.jpg").convert("RGB"), jpeg.crop, 64))
    assert torch.equal(images.load(0, random.Random(0), decode=True), decoded)


def test_gpu_pipeline_logic_matches_cpu_pipeline_over_the_stream(photo_folder):
    names = sorted(p.name for p in photo_folder.iterdir())
    cpu = _stream(TrainImages(photo_folder, names, 48))
    dev = _stream(TrainImages(photo_folder, names, 48, decode_on_device=True))
    assert len(cpu) == len(dev) == 4
    std = torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    for a, b in zip(cpu, dev):
        assert a.shape == b.shape == (4, 3, 48, 48) and a.dtype == b.dtype == torch.float32
        levels = ((a - b) * std * 255).abs()  # back to 0..255 levels
        assert levels.mean() <= MEAN_LEVELS and levels.max() <= MAX_LEVELS + 1e-3


@pytest.mark.parametrize("decode_on_device", [False, True], ids=["cpu", "gpu-logic"])
def test_stream_is_reproducible_and_independent_of_workers(photo_folder, decode_on_device):
    names = sorted(p.name for p in photo_folder.iterdir())
    images = TrainImages(photo_folder, names, 32, decode_on_device=decode_on_device)
    first = torch.cat(_stream(images))
    assert torch.equal(first, torch.cat(_stream(images)))
    assert torch.equal(first, torch.cat(_stream(images, num_workers=2)))
    resumed = torch.cat(_stream(images, start_step=2))  # a resumed run continues the same stream
    assert torch.equal(first[8:], resumed)
    assert not torch.equal(first, torch.cat(_stream(images, seed=4)))


def test_a_jpeg_the_device_cannot_decode_is_replaced_like_on_the_cpu_pipeline(photo_folder, tmp_path):
    """A JPEG whose header reads but whose tables are broken passes the workers' checks on the gpu
    pipeline and fails there; it is then replaced by the same image the cpu pipeline uses."""
    for p in photo_folder.glob("*.jpg"):
        if "cmyk" not in p.name:
            (tmp_path / p.name).write_bytes(p.read_bytes())
    good = (photo_folder / "chelsea.jpg").read_bytes()
    (tmp_path / "broken.jpg").write_bytes(good[:600] + bytes(400) + good[1000:])
    names = sorted(p.name for p in tmp_path.iterdir())
    runs = {}
    for mode in (False, True):
        bad = BadImages(tmp_path)
        runs[mode] = torch.cat(_stream(TrainImages(tmp_path, names, 32, decode_on_device=mode), bad=bad,
                                       batch_size=6, steps=3))
        bad.pool(DistInfo())
        assert list(bad.names) == ["broken.jpg"] and bad.replaced == 3, bad.names  # once per epoch
    levels = ((runs[False] - runs[True]) * torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1) * 255).abs()
    assert levels.mean() <= MEAN_LEVELS and levels.max() <= MAX_LEVELS + 1e-3


def test_unreadable_files_raise_with_their_name(tmp_path):
    from conftest import write_truncated_jpeg

    write_truncated_jpeg(tmp_path / "half.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    for decode_on_device in (False, True):
        images = TrainImages(tmp_path, ["half.jpg", "text.jpg", "gone.jpg"], 32, decode_on_device)
        for i, reason in enumerate(["truncated", "not an image Pillow can read", "No such file"]):
            with pytest.raises(UnreadableImage, match=reason) as e:
                images.load(i, random.Random(0))
            assert e.value.name == images.name(i)


def test_startup_decodes_a_sample_only(tmp_path, caplog):
    good = sorted(sample_images_dir().rglob("*.jpg"))
    for i, p in enumerate(good[:3]):
        (tmp_path / f"good{i}.jpg").write_bytes(p.read_bytes())
    for i in range(40):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"broken")
    images = training_images(tmp_path, 32, False, seed=0)  # 3 good among the 32 sampled: a warning
    assert len(images) == 43
    assert "sampled images unreadable" in caplog.text
    for i in range(3):
        (tmp_path / f"good{i}.jpg").unlink()
    with pytest.raises(InputError, match=r"none of 32 image files sampled \(of 40\) is readable \(first: bad"):
        training_images(tmp_path, 32, False, seed=0)


def test_gpu_pipeline_needs_cuda():
    assert resolve_pipeline("auto", torch.device("cpu")) == "cpu"
    assert resolve_pipeline("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(InputError, match=r"--set data_pipeline: gpu needs training on CUDA \(device is cpu\)"):
        resolve_pipeline("gpu", torch.device("cpu"), "--set data_pipeline")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_matches_cpu_decode(photo_folder):
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    data = read_file(str(photo_folder / "astronaut.jpg"))
    gpu = decode_jpeg([data], mode=ImageReadMode.RGB, device="cuda")[0].cpu()
    cpu = decode_jpeg(data, mode=ImageReadMode.RGB)
    assert (gpu.float() - cpu.float()).abs().mean() <= 1.0  # nvJPEG's IDCT and upsampling differ slightly
    assert resolve_pipeline("auto", torch.device("cuda")) == "gpu"
