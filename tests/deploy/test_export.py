"""export.py: the ONNX file computes what the backbone computes, at any batch, and describes itself."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

from bim_export import __version__
from bim_export.core.errors import BimExportError, InputError
from bim_export.deploy import export as export_mod
from bim_export.deploy.export import export_onnx, read_metadata
from bim_export.model.images import load_image_array, sample_images

SIZE = 32
META = {"depth": 4, "exits": [2, 4], "profile": "host", "precision": "fp32",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def tiny_vit(**overrides):
    torch.manual_seed(0)
    args = dict(img_size=SIZE, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=0)
    args.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


def torch_outputs(backbone, x: np.ndarray):
    with torch.inference_mode():
        tokens = backbone.forward_features(torch.from_numpy(x))
        return tokens.numpy(), backbone.forward_head(tokens, pre_logits=True).numpy()


def ort_outputs(path, x: np.ndarray):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["tokens", "embedding"], {"pixels": x})


@pytest.fixture(scope="module")
def images():
    x, _ = load_image_array(sample_images(), SIZE, limit=6)
    return x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    backbone = tiny_vit()
    path = export_onnx(backbone, tmp_path_factory.mktemp("export") / "model.onnx", opset=17,
                       img_size=SIZE, metadata=META)
    return backbone, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_equals_backbone_at_batch(exported, images, batch):
    backbone, path = exported
    x = images[:batch]
    ref_tokens, ref_emb = torch_outputs(backbone, x)
    tokens, emb = ort_outputs(path, x)
    assert tokens.shape == (batch, 17, 32) and emb.shape == (batch, 32)
    np.testing.assert_allclose(tokens, ref_tokens, atol=1e-4, rtol=0)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-4, rtol=0)


def test_contract_names_dynamic_batch_and_opset(exported):
    _, path = exported
    model = onnx.load(str(path))
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in model.graph.input] == ["pixels"]
    assert dims(model.graph.input[0]) == ["batch", 3, SIZE, SIZE]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == ["tokens", "embedding"]
    assert [dims(o)[0] for o in model.graph.output] == ["batch", "batch"]
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17
    onnx.checker.check_model(str(path), full_check=True)


def test_metadata_records_source_and_versions(exported):
    _, path = exported
    meta = read_metadata(path)
    assert meta["depth"] == "4" and meta["profile"] == "host" and meta["precision"] == "fp32"
    assert json.loads(meta["exits"]) == [2, 4]
    assert json.loads(meta["mean"]) == META["mean"] and json.loads(meta["std"]) == META["std"]
    assert meta["exporter"].startswith("torch.onnx.export(dynamo=True)")
    assert meta["bim_export_version"] == __version__


@pytest.mark.parametrize("opset", [17, 18])
def test_vit_variant_without_class_token_avg_pool_registers(tmp_path, images, opset):
    # avg pooling is a ReduceMean, whose axes moved from attribute to input in opset 18: the
    # exporter alone leaves such a graph at 18 when asked for 17
    backbone = tiny_vit(class_token=False, global_pool="avg", reg_tokens=2, no_embed_class=True)
    path = export_onnx(backbone, tmp_path / "v.onnx", opset=opset, img_size=SIZE, metadata={})
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] == opset
    assert "ReduceMean" in {n.op_type for n in model.graph.node}
    ref_tokens, ref_emb = torch_outputs(backbone, images[:2])
    tokens, emb = ort_outputs(path, images[:2])
    assert tokens.shape == (2, 18, 32)  # 16 patches + 2 registers
    np.testing.assert_allclose(tokens, ref_tokens, atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5, rtol=0)
    converted = "opset 18 converted to 17" in read_metadata(path)["exporter"]
    assert converted == (opset == 17)


@pytest.mark.slow
def test_opset_too_old_for_the_graph_is_a_clean_error(tmp_path):
    # LayerNormalization exists from opset 17 on: nothing can express it at 16
    with pytest.raises(BimExportError, match="cannot be converted to opset 16.*LayerNormalization"):
        export_onnx(tiny_vit(depth=1), tmp_path / "old.onnx", opset=16, img_size=SIZE, metadata={})
    assert list(tmp_path.iterdir()) == []


def test_multi_exit_graph_equals_each_depths_backbone(tiny_checkpoint, tmp_path, images):
    from bim_export.model.backbone import build_backbone
    from bim_export.model.checkpoint import load_checkpoint
    from bim_export.train.model import BimModel

    ckpt = load_checkpoint(tiny_checkpoint)
    exits = {d: build_backbone(ckpt, d) for d in ckpt.exits}
    deepest = exits[max(exits)]
    path = export_onnx(deepest, tmp_path / "multi.onnx", opset=17, img_size=ckpt.config["img_size"],
                       metadata={"exits": ckpt.exits}, multi_exit=True, exits=exits)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == [f"{k}_{d}" for d in sorted(exits) for k in ("tokens", "embedding")]
    x = images[:3]
    got = dict(zip(names, sess.run(names, {"pixels": x})))
    for d, bb in exits.items():
        ref_tokens, ref_emb = torch_outputs(bb, x)
        np.testing.assert_allclose(got[f"tokens_{d}"], ref_tokens, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[f"embedding_{d}"], ref_emb, atol=1e-4, rtol=0)
    # ... and the BIM model's own exits (the training-time encoder) agree with the graph too
    with torch.inference_mode():
        bim_tokens = BimModel.from_checkpoint(ckpt).forward_intermediates(torch.from_numpy(x))
    for d, t in zip(ckpt.exits, bim_tokens):
        np.testing.assert_allclose(got[f"tokens_{d}"], t.numpy(), atol=1e-4, rtol=0)
    # shared blocks run once: the graph has as many attention softmaxes as the deepest exit has blocks
    n_softmax = sum(n.op_type == "Softmax" for n in onnx.load(str(path)).graph.node)
    assert n_softmax == max(exits)
    assert json.loads(read_metadata(path)["graph_exits"]) == sorted(exits)


def test_multi_exit_needs_exit_backbones(tmp_path):
    with pytest.raises(InputError, match="exit backbones"):
        export_onnx(tiny_vit(), tmp_path / "m.onnx", opset=17, img_size=SIZE, metadata={}, multi_exit=True)
    assert not (tmp_path / "m.onnx").exists()


def test_multi_exit_refuses_exits_that_do_not_share_blocks(tmp_path):
    full = tiny_vit()
    other = tiny_vit(depth=2)
    torch.nn.init.normal_(other.blocks[1].mlp.fc1.weight)
    with pytest.raises(InputError, match="exit 2"):
        export_onnx(full, tmp_path / "m.onnx", opset=17, img_size=SIZE, metadata={}, multi_exit=True,
                    exits={2: other, 4: full})


def test_large_weights_go_to_external_data(tmp_path, monkeypatch, images):
    monkeypatch.setattr(export_mod, "_PROTOBUF_LIMIT", 64 * 1024**2 + 1000)  # tiny model counts as "large"
    backbone = tiny_vit()
    path = export_onnx(backbone, tmp_path / "big.onnx", opset=18, img_size=SIZE, metadata={})
    data = tmp_path / "big.onnx.data"
    from onnx.external_data_helper import uses_external_data

    stored_outside = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
                      if uses_external_data(t)]
    assert len(stored_outside) >= 4 * 4  # every block's weight matrices at least
    assert data.stat().st_size > 150_000  # ~ the float32 weights of the four blocks
    tokens, _ = ort_outputs(path, images[:1])
    np.testing.assert_allclose(tokens, torch_outputs(backbone, images[:1])[0], atol=1e-4, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temporaries left
