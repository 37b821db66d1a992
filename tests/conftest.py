"""Shared fixtures: a tiny BIM checkpoint trained once per test session by the real trainer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tools/ (the builders of the shipped image sets, development only) imports as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

# The test machine is small and shared: one thread avoids OpenMP oversubscription, which makes
# tiny models tens of times slower than single-threaded.
torch.set_num_threads(1)

TINY_MODEL_ARGS = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}
TINY_EXITS = [2, 4]


def tiny_train_config(out, **overrides):
    """Settings of a tiny, fast run (depth 4, width 32, 32-px images, patch 8, exits 2 and 4)."""
    from bim_export.train.config import TrainConfig

    settings = dict(out=out, model="vit_tiny_patch16_224", model_args=dict(TINY_MODEL_ARGS), exits=list(TINY_EXITS),
                    decoder_width=32, decoder_heads=2, steps=4, batch_size=8, lr=1e-3, warmup_steps=1,
                    num_workers=0, save_every=2, log_every=1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a checkpoint made by the trainer on the built-in sample images, with per-exit metrics
    (recon_loss, and knn_top1 / linear_probe_top1 on the sample images' 10 classes)."""
    from bim_export.core.resources import sample_images_dir
    from bim_export.train.trainer import train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    train(tiny_train_config(out, eval_data=sample_images_dir()))
    return out


REG_AVG_MODEL_ARGS = {**TINY_MODEL_ARGS, "class_token": False, "reg_tokens": 2, "global_pool": "avg"}


@pytest.fixture(scope="session")
def reg_avg_checkpoint(tmp_path_factory):
    """A checkpoint of a no-class-token, 2-register, avg-pooled ViT with non-trivial exit norms
    (untrained: the weights are timm's initialization)."""
    from bim_export.model.architecture import BimConfig
    from bim_export.model.checkpoint import save_checkpoint
    from bim_export.train.model import BimModel

    torch.manual_seed(0)
    model = BimModel(BimConfig.from_settings(model="vit_tiny_patch16_224", model_args=REG_AVG_MODEL_ARGS,
                                             exits=TINY_EXITS, decoder_width=32, decoder_heads=2))
    with torch.no_grad():
        for norm in model.exit_norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("regavg") / "ckpt"
    cfg = {**model.arch_config(), "mean": [0.5] * 3, "std": [0.5] * 3, "step": 0, "train": {}}
    save_checkpoint(out, model.state_dict(), cfg)
    return out


def write_png_bomb(path, side: int = 20000):
    """A PNG that declares side x side pixels (a decompression bomb to Pillow) in 45 bytes: the
    header only, since Pillow refuses it on open, before any pixel data is read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def write_truncated_jpeg(path):
    """The first half of a real JPEG: Pillow opens it, decoding fails."""
    from bim_export.core.resources import sample_images_dir

    real = sorted(sample_images_dir().rglob("*.jpg"))[0].read_bytes()
    path.write_bytes(real[: len(real) // 2])
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a test marked ``timing`` runs with no other test beside it.

    Such a test measures how fast this machine runs a model, or loads the machine on purpose, so a
    test running on another worker would change its figures or be slowed by it. Every test holds a
    shared lock on one file for its setup, call and teardown, and a ``timing`` test holds it
    exclusively. Without xdist, one test runs at a time anyway, and nothing is locked.
    """
    run = getattr(item.config, "workerinput", {}).get("testrunuid")
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): run as scheduled
        fcntl = None
    if run is None or fcntl is None:
        yield
        return
    import tempfile
    from pathlib import Path

    with open(Path(tempfile.gettempdir()) / f"bim-export-tests-{run}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("timing") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_configure(config):
    """The controller names the run (xdist's ``--testrunuid``), so that it knows the lock file's name."""
    if not hasattr(config, "workerinput") and hasattr(config.option, "testrunuid") and not config.option.testrunuid:
        import uuid

        config.option.testrunuid = uuid.uuid4().hex


def pytest_sessionfinish(session, exitstatus):
    """The controller removes the run's lock file once its workers are done (it is empty)."""
    import tempfile
    from pathlib import Path

    run = getattr(session.config.option, "testrunuid", None)
    if run and not hasattr(session.config, "workerinput"):
        (Path(tempfile.gettempdir()) / f"bim-export-tests-{run}.lock").unlink(missing_ok=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run wherever CUDA is available and are skipped, saying so, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def shared_exports(tmp_path_factory):
    """Every graph export of a test module made once (tests/export_cache.py): the module's tests and
    fixtures that export the same backbone share the file. Modules ask for it with
    ``pytestmark = pytest.mark.usefixtures("shared_exports")``."""
    from export_cache import memoize_exports

    with pytest.MonkeyPatch.context() as mp:
        memoize_exports(mp, tmp_path_factory.mktemp("export-store"))
        yield

