"""BimModel: masking, targets, block-wise backward, architecture checks."""

from __future__ import annotations

import pytest
import torch

from bim_export.core.errors import InputError
from pydantic import ValidationError

from bim_export.model.architecture import BimConfig, backbone_state_dict, default_exits, validate_exits
from bim_export.train.model import BimModel

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}
REG_AVG = {**TINY, "class_token": False, "reg_tokens": 2, "global_pool": "avg"}


def tiny(model_args=TINY, exits=(2, 4), **kw) -> BimModel:
    torch.manual_seed(0)
    kw.setdefault("decoder_width", 32)
    kw.setdefault("decoder_heads", 2)
    return BimModel(BimConfig.from_settings(model=ARCH, model_args=model_args, exits=list(exits), **kw))


@pytest.mark.parametrize("model_args, prefix", [(TINY, 1), (REG_AVG, 2)])
def test_forward_intermediates_returns_normed_tokens_per_exit(model_args, prefix):
    m = tiny(model_args).eval()
    outs = m.forward_intermediates(torch.randn(3, 3, 32, 32))
    assert [o.shape for o in outs] == [torch.Size([3, prefix + 16, 32])] * 2
    for o in outs:  # exit norms are fresh LayerNorms: every token has mean 0, variance 1
        assert torch.allclose(o.mean(-1), torch.zeros(3, prefix + 16), atol=1e-5)


def test_random_masking_keeps_the_lowest_noise_and_marks_the_rest():
    m = tiny()
    x = torch.arange(16.0).reshape(1, 16, 1).repeat(2, 1, 4)  # token j holds value j
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    vis, mask, ids_restore = m.random_masking(x, noise)
    assert vis.shape == (2, 4, 4)  # 25% of 16 kept
    assert mask.sum(1).tolist() == [12.0, 12.0]
    for b in range(2):
        kept = sorted(int(v) for v in vis[b, :, 0])
        assert kept == sorted(noise[b].argsort()[:4].tolist())
        assert all(mask[b, j] == 0 for j in kept)
    assert torch.equal(torch.gather(noise.argsort(1), 1, ids_restore), torch.arange(16).repeat(2, 1))


def test_patchify_follows_the_patch_embedding_order():
    m = tiny()
    img = torch.zeros(1, 3, 32, 32)
    for j in range(16):  # patch j (row-major on the 4x4 grid) filled with value j
        r, c = divmod(j, 4)
        img[:, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = j
    patches = m.patchify(img)
    assert patches.shape == (1, 16, 8 * 8 * 3)
    assert torch.equal(patches[0].mean(1), torch.arange(16.0))


def test_norm_pix_target_is_normalized_per_patch():
    t = tiny().target(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-4)
    assert torch.allclose(t.std(-1), torch.ones(2, 16), atol=1e-2)


def _grad_norms(m: BimModel) -> list[float]:
    return [sum(float(p.grad.abs().sum()) for p in blk.parameters() if p.grad is not None)
            for blk in m.encoder.blocks]


def test_bim_stops_gradients_between_stages_and_e2e_does_not():
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    bim = tiny(loss_weights=[0.0, 1.0])  # only the last stage's loss counts
    losses = bim.forward_backward(x, noise)
    g = _grad_norms(bim)
    assert g[0] == g[1] == 0.0 and g[2] > 0 and g[3] > 0  # the detached stage boundary held
    assert set(losses.losses) == {2, 4}
    e2e = tiny(mode="e2e")
    assert e2e.decoded_exits == [4] and len(e2e.decoders) == 1
    e2e.forward_backward(x, noise)
    assert all(v > 0 for v in _grad_norms(e2e))


def test_bim_stage_gradient_equals_that_stage_loss_alone():
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m = tiny()
    m.forward_backward(x, noise)
    got = [p.grad.clone() for p in m.encoder.blocks[3].parameters()]
    m.zero_grad()
    # recompute stage 2 by hand from a detached stage-1 output
    tokens, mask, ids_restore = m.embed_masked(x, noise)
    h = m.run_blocks(tokens, 0, 2).detach()
    h = m.run_blocks(h, 2, 4)
    loss = m.recon_loss(m.decoders[1](m.exit_norms[1](h), ids_restore), m.target(x), mask)
    loss.backward()
    for a, b in zip(got, m.encoder.blocks[3].parameters()):
        assert torch.allclose(a, b.grad, atol=1e-6)


class _LiveSaved:
    """Tracks the bytes autograd keeps for backward (live saved tensors) and their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, t):
        outer = self

        class Holder:
            def __init__(self):
                self.t, self.n = t, t.numel() * t.element_size()
                outer.live += self.n
                outer.peak = max(outer.peak, outer.live)

            def __del__(self):
                outer.live -= self.n

        return Holder()

    @staticmethod
    def unpack(h):
        return h.t


def test_bim_keeps_about_one_stage_of_activations():
    args = {**TINY, "depth": 8}
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    peaks = {}
    for mode in ("bim", "e2e"):
        m = tiny(args, exits=(2, 4, 6, 8), mode=mode)
        tracker = _LiveSaved()
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            m.forward_backward(x, noise)
        peaks[mode] = tracker.peak
    # e2e (same light decoder) holds all 8 blocks at once; BIM one 2-block stage + a decoder
    assert peaks["bim"] < 0.5 * peaks["e2e"], peaks


def test_grad_checkpointing_gives_the_same_gradients_with_less_memory():
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    a, b = tiny(mode="e2e"), tiny(mode="e2e")
    b.set_grad_checkpointing(True)
    peaks = []
    for m in (a, b):
        tracker = _LiveSaved()
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            m.forward_backward(x, noise)
        peaks.append(tracker.peak)
    assert peaks[1] < 0.5 * peaks[0], peaks
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_arch_config_rebuilds_the_same_model():
    m = tiny(REG_AVG)
    cfg = m.arch_config()
    assert cfg["num_prefix_tokens"] == 2 and cfg["global_pool"] == "avg" and cfg["img_size"] == 32
    clone = BimModel(BimConfig.from_json(cfg))
    clone.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(m.eval().forward_intermediates(x)[1], clone.eval().forward_intermediates(x)[1])


def test_backbone_state_dict_has_blocks_up_to_depth_and_the_exit_norm():
    m = tiny()
    sd = backbone_state_dict(m.state_dict(), m.config, 2)
    assert not any(k.startswith(("blocks.2.", "blocks.3.")) for k in sd)
    assert torch.equal(sd["norm.weight"], m.exit_norms[0].weight)
    with pytest.raises(InputError, match="exits: 2, 4"):
        backbone_state_dict(m.state_dict(), m.config, 3)


def test_default_exits_are_four_equal_stages():
    assert default_exits(12) == [3, 6, 9, 12]
    assert default_exits(4) == [1, 2, 3, 4]
    assert BimModel(BimConfig(arch=ARCH, model_args=TINY)).exits == [1, 2, 3, 4]


@pytest.mark.parametrize("exits, message", [
    ([2, 2, 4], "strictly increasing"),
    ([3, 1, 4], "strictly increasing"),
    ([0, 4], "1..4"),
    ([2, 6], "1..4"),
    ([1, 2], "last exit must be the model depth 4"),
    ([], "at least one"),
])
def test_bad_exits_are_rejected(exits, message):
    with pytest.raises(InputError, match=message):
        validate_exits(exits, 4)


def test_unknown_model_name_suggests_the_five_closest():
    with pytest.raises(InputError, match=r"unknown model 'vit_tiny_patch16_22'; closest: vit_tiny_patch16_224") as err:
        BimModel(BimConfig(arch="vit_tiny_patch16_22", model_args=TINY))
    named = str(err.value).split("closest: ")[1].split(" (of ")[0].split(", ")
    assert len(named) == 5 and len(str(err.value)) < 300  # not the whole list of timm's ViTs
    assert all(n.startswith(("vit_", "deit_")) for n in named)


def test_non_vit_and_learned_pooling_are_rejected():
    with pytest.raises(InputError, match="not a plain timm VisionTransformer"):
        BimModel(BimConfig(arch="resnet18"))
    with pytest.raises(InputError, match="global_pool 'map'"):
        BimModel(BimConfig(arch=ARCH, model_args={**TINY, "global_pool": "map"}, exits=[2, 4]))
    with pytest.raises(InputError, match="model_args"):
        BimModel(BimConfig(arch=ARCH, model_args={**TINY, "no_such_arg": 1}, exits=[2, 4]))


def test_loss_weights_and_mode_are_checked():
    with pytest.raises(InputError, match="loss_weights: 2 values needed"):
        tiny(loss_weights=[1.0])
    with pytest.raises(ValidationError, match="mode"):
        tiny(mode="mae")
    with pytest.raises(ValidationError, match="mask_ratio"):
        tiny(mask_ratio=1.0)


def _reference_overlap_grads(m: BimModel, x, noise) -> dict[str, torch.Tensor]:
    """The gradients overlap defines, loss by loss: loss k back-propagated from exit k down to the
    first block of stage k - 1's tail (the embedding for stage 0), and nothing below it."""
    m.zero_grad()
    batch = m.masked_batch(x, noise)
    for i, (start, end) in enumerate(m.stage_bounds()):
        with torch.no_grad():
            h = m.embed(x, batch.ids_keep)
            first = m.tail_start(i - 1) if i else 0
            h = m.run_blocks(h, 0, first)
        h = m.embed(x, batch.ids_keep) if i == 0 else h.detach()
        loss = m._exit_loss(i, m.run_blocks(h, first, end), batch)
        (loss * m.config.loss_weights[i]).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    return grads


@pytest.mark.parametrize("overlap, exits, weights", [(1, (2, 4), None), (2, (2, 4), [0.5, 2.0]),
                                                     (1, (1, 2, 4), None)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_overlap_trains_the_previous_stage_tail_with_the_next_loss(overlap, exits, weights, checkpointing):
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    m = tiny(exits=exits, overlap=overlap, loss_weights=weights)
    m.set_grad_checkpointing(checkpointing)
    want = _reference_overlap_grads(m, x, noise)
    m.forward_backward(x, noise)
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), n
    plain = tiny(exits=exits, loss_weights=weights)
    plain.forward_backward(x, noise)  # without overlap the tail's gradient differs: the test can fail
    tail = f"encoder.blocks.{m.tail_start(0)}.attn.qkv.weight"
    assert not torch.allclose(dict(plain.named_parameters())[tail].grad, got[tail], atol=1e-6)


def test_with_overlap_a_stage_ends_after_the_next_stage_backward():
    m = tiny(exits=(1, 2, 4), overlap=1)
    ended = []

    def on_end(i):  # every gradient of stage i is in: a later backward must not change it
        ended.append((i, {n: p.grad.clone() for n, p in m.stage_parameters(i)}))

    m.forward_backward(torch.randn(2, 3, 32, 32), torch.rand(2, 16), on_stage_end=on_end)
    assert [i for i, _ in ended] == [0, 1, 2]
    for i, grads in ended:
        for n, p in m.stage_parameters(i):
            assert torch.equal(grads[n], p.grad), n


@pytest.mark.parametrize("settings, message", [
    ({"overlap": 3}, "overlap 3 is more than the blocks"),
    ({"overlap": 1, "mode": "e2e"}, "overlap 1 applies to mode bim"),
    ({"last_decoder_width": 30}, "last_decoder width must be a multiple of 4"),
    ({"last_decoder_width": 36, "last_decoder_heads": 8}, "last_decoder width 36 is not divisible"),
])
def test_overlap_and_the_last_decoder_are_checked(settings, message):
    with pytest.raises(InputError, match=message):
        tiny(**settings)


def test_the_deepest_exit_gets_its_own_decoder_size_and_rebuilds_from_config():
    m = tiny(exits=(1, 2, 4), last_decoder_depth=2, last_decoder_width=64, overlap=1)
    assert [len(d.blocks) for d in m.decoders] == [1, 1, 2]
    assert [d.embed.out_features for d in m.decoders] == [32, 32, 64]
    again = BimModel(BimConfig.from_json(m.arch_config()))
    assert again.arch_config() == m.arch_config()
    assert [p.shape for p in again.parameters()] == [p.shape for p in m.parameters()]
    old = {k: v for k, v in m.arch_config().items() if k not in ("last_decoder", "overlap")}
    assert BimConfig.from_json(old).resolved(4).last_decoder == m.config.decoder  # older checkpoints
