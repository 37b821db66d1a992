"""Training on a CUDA device (run wherever one is available; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_config
from test_trainer import assert_same_weights

from bim_export.train.trainer import train

pytestmark = pytest.mark.gpu


def test_cuda_fp32_training_matches_the_cpu(tmp_path):
    cpu = train(tiny_train_config(tmp_path / "cpu", device="cpu", precision="fp32", steps=3))
    gpu = train(tiny_train_config(tmp_path / "gpu", device="cuda", precision="fp32", steps=3))
    assert next(gpu.model.parameters()).is_cuda
    # TF32 and other kernels: the same run, not the same bits
    assert_same_weights(tmp_path / "cpu", tmp_path / "gpu", atol=1e-3)
    assert gpu.losses.keys() == cpu.losses.keys()


def test_cuda_defaults_to_bf16_autocast(tmp_path):
    auto = train(tiny_train_config(tmp_path / "auto", device="cuda", steps=1))
    fp32 = train(tiny_train_config(tmp_path / "fp32", device="cuda", precision="fp32", steps=1))
    assert all(auto.losses[d] != fp32.losses[d] for d in fp32.losses)  # precision auto = bf16 on CUDA
    assert all(auto.losses[d] == pytest.approx(fp32.losses[d], rel=0.05) for d in fp32.losses)


def test_cuda_bim_peak_memory_below_end_to_end():
    from bim_export.model.architecture import BimConfig
    from bim_export.train.model import BimModel

    args = {"img_size": 32, "patch_size": 4, "depth": 8, "embed_dim": 64, "num_heads": 2}
    x = torch.randn(64, 3, 32, 32, device="cuda")
    peaks = {}
    for mode in ("bim", "e2e"):
        torch.manual_seed(0)
        model = BimModel(BimConfig.from_settings(model="vit_tiny_patch16_224", model_args=args, exits=[2, 4, 6, 8],
                                                 mode=mode, decoder_depth=1, decoder_width=64, decoder_heads=2))
        model.cuda().train()
        noise = model.mask_noise(len(x), torch.Generator().manual_seed(0))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.forward_backward(x, noise)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del model
    assert peaks["bim"] < 0.7 * peaks["e2e"], peaks  # one stage of activations instead of all of them
