"""Shared fixtures: a tiny BIM checkpoint trained once per test session by the real trainer."""

from __future__ import annotations

import pytest
import torch

# The test machine is small and shared: one thread avoids OpenMP oversubscription, which makes
# tiny models tens of times slower than single-threaded.
torch.set_num_threads(1)

TINY_MODEL_ARGS = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}
TINY_EXITS = [2, 4]


def tiny_train_config(out, **overrides):
    """Settings of a tiny, fast run (depth 4, width 32, 32-px images, patch 8, exits 2 and 4)."""
    from bim_export.train_config import TrainConfig

    settings = dict(out=out, model="vit_tiny_patch16_224", model_args=dict(TINY_MODEL_ARGS), exits=list(TINY_EXITS),
                    decoder_width=32, decoder_heads=2, steps=4, batch_size=8, lr=1e-3, warmup_steps=1,
                    num_workers=0, save_every=2, log_every=1, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a checkpoint made by the trainer on the built-in sample images, with per-exit metrics
    (recon_loss, and knn_top1 / linear_probe_top1 on the sample images' 10 classes)."""
    from bim_export.resources import sample_images_dir
    from bim_export.trainer import train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    train(tiny_train_config(out, eval_data=sample_images_dir()))
    return out
