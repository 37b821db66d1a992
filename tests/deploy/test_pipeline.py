"""The export pipeline on the tiny checkpoint: shared exports, pruning, parity rejection, bundles.

One :class:`Workshop` (exports, conversions, outputs) is shared by the tests of this module, as it
is shared by the profiles of one run; the end-to-end runs go through :func:`run_export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bim_export.core.errors import InputError, NoCandidateError
from bim_export.core.resources import resource_dir
from bim_export.deploy import candidates as cand
from bim_export.deploy import pipeline
from bim_export.deploy.candidates import Workshop, evaluate_candidates, load_images
from bim_export.deploy.profiles import list_profiles, load_profile
from bim_export.model.checkpoint import load_checkpoint
from export_cache import memoize_exports


@pytest.fixture(scope="session", autouse=True)
def _shared_exports(tmp_path_factory):
    """Exports of the tiny checkpoint are made once for all tests (see export_cache.py)."""
    with pytest.MonkeyPatch.context() as mp:
        memoize_exports(mp, tmp_path_factory.mktemp("export-store"))
        yield


def _profile(tmp_path: Path, name: str, base: str = "raspberry-pi-5", parity: dict | None = None, **budgets):
    prof = yaml.safe_load((resource_dir("profiles") / f"{base}.yaml").read_text())
    prof["budgets"].update(budgets)
    for precision, tol in (parity or {}).items():
        prof["parity"][precision].update(tol)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return load_profile(path)


@pytest.fixture(scope="module")
def shop(tiny_checkpoint, tmp_path_factory):
    ckpt = load_checkpoint(tiny_checkpoint)
    return Workshop(ckpt, load_images(None, ckpt.config), tmp_path_factory.mktemp("work"))


@pytest.fixture
def generous(tmp_path):
    return _profile(tmp_path, "generous", latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)


def test_resolve_targets():
    assert [p.name for p in pipeline.resolve_targets("jetson")] == ["jetson-orin-nano"]
    assert [p.name for p in pipeline.resolve_targets("all")] == list_profiles()
    with pytest.raises(InputError, match="did you mean"):
        pipeline.resolve_targets("raspbery-pi-5")


def test_exports_are_shared_by_profiles(shop, tmp_path, monkeypatch):
    calls = []
    for module, name in (("bim_export.deploy.export", "export_onnx"), ("bim_export.deploy.quantize", "convert_precision")):
        import importlib

        mod = importlib.import_module(module)
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    a = _profile(tmp_path, "a", latency_ms=1000)
    b = _profile(tmp_path, "b", latency_ms=500)
    ta, tb = evaluate_candidates(shop, a), evaluate_candidates(shop, b)
    assert [(t.depth, t.precision) for t in ta] == [(2, "fp32"), (2, "int8"), (4, "fp32"), (4, "int8")]
    assert [t.model for t in ta] == [t.model for t in tb]  # the same files
    assert len(set(t.model for t in ta)) == 4
    # one export of the all-exits graph, one int8 conversion of it; every depth is cut out of those
    assert calls == ["export_onnx", "convert_precision"]


def test_far_over_budget_is_pruned_before_parity_and_measuring(shop, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(cand, "check_parity", lambda *a, **k: ran.append("parity"))
    import bim_export.deploy.latency.predict as latency

    monkeypatch.setattr(latency, "latencies_for_profile", lambda *a, **k: ran.append("latency") or [])
    tight = _profile(tmp_path, "tight", latency_ms=1e-5)
    trials = evaluate_candidates(shop, tight)
    assert ran == []
    assert all("predicted" in t.pruned and "budget" in t.pruned for t in trials)
    with pytest.raises(NoCandidateError) as err:
        from bim_export.deploy.selector import select

        select(cand.to_candidates(trials, tight), tight)
    assert err.value.table.count("(pruned: not run)") == len(trials)


def test_failed_int8_parity_rejects_only_that_candidate(shop, tmp_path):
    strict = _profile(tmp_path, "strict", latency_ms=1000, parity={"int8": {"cosine": 0.999999999}})
    trials = evaluate_candidates(shop, strict)
    int8 = [t for t in trials if t.precision == "int8"]
    fp32 = [t for t in trials if t.precision == "fp32"]
    assert all(not t.parity.passed for t in int8) and all(t.parity.passed for t in fp32)
    assert all(t.latency is not None for t in fp32)


def test_parity_checks_batch_1_and_batch_n(shop, generous):
    t = evaluate_candidates(shop, generous)[0]
    d = t.parity.to_dict()
    assert d["batch1"] and d["batchN"] and t.parity.runs["batchN"].images > 1 and d["passed"]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    prof = tmp / "tiny-edge.yaml"
    data = yaml.safe_load((resource_dir("profiles") / "raspberry-pi-5.yaml").read_text())
    data["budgets"].update(latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    prof.write_text(yaml.safe_dump(data))
    out = tmp / "exports"
    summary = pipeline.run_export(str(prof), tiny_checkpoint, out, None, multi_exit=False)
    return out, summary


def test_bundle_end_to_end(exported):
    out, summary = exported
    bundle = out / "tiny-edge"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-edge"]  # no work folder left behind
    assert f"bundle: {bundle}" in summary and "chosen" in summary
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["profile"] == "tiny-edge" and m["depth"] in (2, 4) and m["precision"] in ("fp32", "int8")
    assert m["preprocessing"]["img_size"] == 32 and len(m["preprocessing"]["mean"]) == 3
    assert m["latency"]["source"] == "predicted" and m["latency"]["stat"] == "p90"
    assert len(m["candidates"]["candidates"]) == 4
    assert m["parity"]["passed"] and m["exits"] == [2, 4]
    assert m["data"] == {"folder": None, "source": "built-in sample images", "images": 60, "parity_images": 32,
                         "calibration_images": 32, "labelled": True, "decoded": "the sampled files", "unreadable": []}
    # how the embedding pools, and how many prefix tokens lead the tokens output: manifest and graph
    from bim_export.deploy.export import read_metadata

    meta = read_metadata(bundle / "model.onnx")
    assert (m["pooling"], m["prefix_tokens"]) == ("token", 1) == (meta["pooling"], int(meta["prefix_tokens"]))
    assert "drawn from 60 in the built-in sample set" in (bundle / "report.md").read_text()
    # reference.npz: real inputs, PyTorch outputs that model.onnx reproduces
    import onnxruntime as ort

    ref = np.load(bundle / "reference.npz")
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    emb = sess.run(["embedding"], {"pixels": ref["pixels"]})[0]
    cos = (emb * ref["embedding"]).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref["embedding"], axis=1)
    assert cos.min() > 0.99


def test_interrupted_export_leaves_previous_bundle(exported, tiny_checkpoint, monkeypatch):
    out, _ = exported
    bundle = out / "tiny-edge"
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    from bim_export.deploy import bundle as bundle_mod

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_mod, "plot_pareto", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_export(str(out.parent / "tiny-edge.yaml"), tiny_checkpoint, out, None)
    assert {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["tiny-edge"]


def test_multi_exit_bundle(tiny_checkpoint, tmp_path):
    prof = _profile(tmp_path, "multi", latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    pipeline.run_export(str(prof.path), tiny_checkpoint, tmp_path / "out", None, multi_exit=True)
    bundle = tmp_path / "out" / "multi"
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["multi_exit"] is True
    exits = [d for d in m["exits"] if d <= m["depth"]]
    assert m["io"]["outputs"] == [f"{n}_{d}" for d in exits for n in ("tokens", "embedding")]
    assert set(m["parity"]["exits"]) == {str(d) for d in exits}
    ref = np.load(bundle / "reference.npz")
    assert {f"embedding_{d}" for d in exits} <= set(ref.files)


def _image_folder(root: Path, per_class: int, classes=("a", "b")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_user_data_folder(tiny_checkpoint, tmp_path):
    data = _image_folder(tmp_path / "mine", per_class=8)
    images = load_images(data, load_checkpoint(tiny_checkpoint).config)
    assert images.parity.shape == (16, 3, 32, 32) and sorted(set(images.labels)) == [0, 1]
    assert images.describe() == {"folder": str(data), "source": "--data", "images": 16, "parity_images": 16,
                                 "calibration_images": 16, "labelled": True, "decoded": "the sampled files",
                                 "unreadable": []}
    (data / "a" / "broken.png").write_bytes(b"not an image")  # skipped, with a warning
    images = load_images(data, load_checkpoint(tiny_checkpoint).config)
    assert images.parity.shape == (16, 3, 32, 32)
    with pytest.raises(InputError):
        load_images(tmp_path / "empty-or-missing", load_checkpoint(tiny_checkpoint).config)


def test_user_data_folder_skips_bombs_and_truncated_files_by_name(tiny_checkpoint, tmp_path, caplog):
    from conftest import write_png_bomb, write_truncated_jpeg

    data = _image_folder(tmp_path / "mine", per_class=8)
    write_png_bomb(data / "a" / "bomb.png")  # drawn: the folder has 18 files, the sample takes 32
    write_truncated_jpeg(data / "b" / "cut.jpg")
    with caplog.at_level("WARNING", logger="bim_export.model.images"):
        images = load_images(data, load_checkpoint(tiny_checkpoint).config)
    assert images.parity.shape == (16, 3, 32, 32)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "2 of 18 images unreadable and skipped" in warning
    assert "bomb.png (decompression bomb" in warning and "cut.jpg (image file is truncated" in warning


def test_manifest_lists_every_unreadable_data_file(tiny_checkpoint, tmp_path, caplog):
    data = _image_folder(tmp_path / "mine", per_class=8)
    broken = [f"{c}/broken{i:02d}.png" for c in ("a", "b") for i in range(9)]
    for name in broken:
        (data / name).write_bytes(b"not an image")
    prof = _profile(tmp_path, "mine-edge", latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    with caplog.at_level("WARNING", logger="bim_export.model.images"):
        pipeline.run_export(str(prof.path), tiny_checkpoint, tmp_path / "out", data)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "bim_export.model.images"]
    assert "18 of 34 images unreadable and skipped" in warning and "; +13 more" in warning  # the log names 5
    m = json.loads((tmp_path / "out" / "mine-edge" / "manifest.json").read_text())
    assert m["data"]["decoded"] == "every file" and m["data"]["images"] == 34
    assert m["data"]["unreadable"] == [{"file": n, "reason": "not an image Pillow can read"} for n in broken]


def test_parity_needs_enough_images(tiny_checkpoint, tmp_path):
    data = _image_folder(tmp_path / "few", per_class=5)  # 10 < MIN_PARITY_IMAGES
    with pytest.raises(InputError, match=rf"few: 10 readable images; parity and int8 calibration need at least "
                                         rf"{cand.MIN_PARITY_IMAGES}"):
        load_images(data, load_checkpoint(tiny_checkpoint).config)


def test_target_all_prints_one_table(tiny_checkpoint, tmp_path, monkeypatch):
    good = _profile(tmp_path, "fits", latency_ms=1000, peak_memory_mb=4000, model_size_mb=100)
    bad = _profile(tmp_path, "impossible", latency_ms=1e-5)
    monkeypatch.setattr(pipeline, "resolve_targets", lambda target: [good, bad] if target == "all" else None)
    with pytest.raises(NoCandidateError) as err:
        pipeline.run_export("all", tiny_checkpoint, tmp_path / "out", None)
    table = err.value.table
    assert table.splitlines()[0].split()[:3] == ["profile", "depth", "prec"]
    assert "fits" in table and "impossible" in table and "no candidate" in table
    assert (tmp_path / "out" / "fits" / "manifest.json").is_file()
    assert not (tmp_path / "out" / "impossible").exists()


def test_cut_exit_graphs_match_their_backbone(shop):
    import onnx
    import onnxruntime as ort

    opset17 = load_profile("raspberry-pi-5")
    for depth in (2, 4):
        path = shop.model(depth, "fp32", opset17)
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        assert [o.name for o in model.graph.output] == ["tokens", "embedding"]
        assert meta["depth"] == str(depth) and "graph_exits" not in meta
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        tokens, emb = sess.run(None, {"pixels": shop.images.parity[:3]})
        ref = shop.reference(depth)
        np.testing.assert_allclose(emb, ref["embedding"][:3], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(tokens, ref["tokens"][:3], atol=1e-4, rtol=1e-4)
    shallow = onnx.load(str(shop.model(2, "fp32", opset17)))
    deep = onnx.load(str(shop.model(4, "fp32", opset17)))
    assert shallow.ByteSize() < deep.ByteSize()  # the blocks after exit 2 are not in its graph
    multi = onnx.load(str(shop.model(4, "fp32", opset17, multi_exit=True)))
    assert [o.name for o in multi.graph.output] == ["tokens_2", "embedding_2", "tokens_4", "embedding_4"]


def test_models_too_big_to_cut_are_exported_per_depth(tiny_checkpoint, tmp_path, generous):
    ckpt = load_checkpoint(tiny_checkpoint)
    big = Workshop(ckpt, load_images(None, ckpt.config), tmp_path)
    big.too_big_to_cut = True  # as for a ViT-H, whose all-exits graph passes 2 GB
    trials = evaluate_candidates(big, generous)
    assert not any(p.name.startswith("all-exits") for p in tmp_path.iterdir())
    assert all(t.parity.passed for t in trials if t.precision == "fp32")
    assert big.parity_graph(2, "fp32", generous) == (big.model(2, "fp32", generous), False)


@pytest.mark.slow
def test_avg_pooled_register_vit_exports_for_a_shipped_opset_17_profile(reg_avg_checkpoint, tmp_path):
    import onnx
    import onnxruntime as ort
    import torch

    from bim_export.model.backbone import build_backbone

    profile = load_profile("raspberry-pi-5")
    assert profile.opset == 17
    pipeline.run_export("raspberry-pi-5", reg_avg_checkpoint, tmp_path / "out")
    bundle = tmp_path / "out" / "raspberry-pi-5"
    m = json.loads((bundle / "manifest.json").read_text())
    model = onnx.load(str(bundle / "model.onnx"))
    assert m["opset"] == 17 and {o.domain: o.version for o in model.opset_import}[""] == 17
    x = load_images(None, load_checkpoint(reg_avg_checkpoint).config).parity[:4]
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    tokens, emb = sess.run(["tokens", "embedding"], {"pixels": x})
    backbone = build_backbone(reg_avg_checkpoint, m["depth"])
    assert backbone.global_pool == "avg" and backbone.num_prefix_tokens == 2 and not backbone.has_class_token
    meta = {p.key: p.value for p in model.metadata_props}
    assert (m["pooling"], m["prefix_tokens"]) == ("avg", 2) == (meta["pooling"], int(meta["prefix_tokens"]))
    with torch.inference_mode():
        ref_tokens = backbone.forward_features(torch.from_numpy(x))
        ref_emb = backbone.forward_head(ref_tokens, pre_logits=True)
    atol = 1e-5 if m["precision"] == "fp32" else 0.1  # int8 passed the profile's parity to be chosen
    np.testing.assert_allclose(tokens, ref_tokens.numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(emb, ref_emb.numpy(), atol=atol, rtol=0)


# ---------------------------------------------------------------------------- measured latency


@pytest.mark.timing
def test_measured_candidates_are_timed_together_with_errors(shop, tmp_path):
    hostlike = _profile(tmp_path, "hostlike", base="host", latency_ms=1000)
    trials = evaluate_candidates(shop, hostlike)
    assert all(t.latency.source == "measured" for t in trials)
    assert {t.latency.settings["interleaved_with"] for t in trials} == {len(trials)}  # one worker, interleaved
    cands = cand.to_candidates(trials, hostlike)
    for t, c in zip(trials, cands):
        assert c.expected_error == t.latency.error("p90") >= 0.05
        assert c.latency_ms == t.latency.p90 and c.latency_disturbed == bool(t.latency.disturbed)


def _matmul_chain(path: Path, layers: int, width: int = 256) -> Path:
    """A graph of ``layers`` [64, width] x [width, width] MatMuls (0 layers: one Add)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((width, width), 1.0 / width, np.float32), "w")
    nodes, x = [], "pixels"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [x, "w"], [f"h{i}"]))
        x = f"h{i}"
    nodes.append(helper.make_node("Add", [x, x], ["embedding"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [64, width])],
                          [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [64, width])],
                          [w] if layers else [])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.timing
def test_inverted_latency_table_is_remeasured_and_flagged(tmp_path):
    """A 'depth 2' file that really is 40 layers and a 'depth 4' one that is a single Add: the table
    says the deeper one is faster; it is measured again, and the contradiction, which stays, is noted."""
    host = load_profile("host")
    trials = [cand.Trial(2, "int8", _matmul_chain(tmp_path / "heavy.onnx", 40), 0.5, 1.0),
              cand.Trial(4, "int8", _matmul_chain(tmp_path / "light.onnx", 0), 0.6, 1.0),
              cand.Trial(2, "fp32", _matmul_chain(tmp_path / "a.onnx", 0), 0.5, 1.0)]
    # Enough rounds that the 40-layer file's error stays well under 100 % on a loaded machine too
    # (one slow process among three once widened it to about 100 %, and the contradiction vanished).
    cand.measure_trials(trials, host, {"warmup": 2, "repeats": 8, "rounds": 3, "max_rounds": 3})
    heavy, light, other = (t.latency for t in trials)
    assert heavy.settings["remeasured"] and light.settings["remeasured"] and "remeasured" not in other.settings
    assert heavy.settings["rounds"] == 6  # re-measured with twice the rounds, the two rows together
    assert heavy.settings["interleaved_with"] == 2
    assert "inconsistent with deeper d4 int8" in heavy.note and "inconsistent with shallower d2 int8" in light.note
    assert heavy.settings["inconsistent_with"] == ["d4 int8"]
    assert cand.source_label(heavy).startswith("measured (") and "inconsistent" in cand.source_label(heavy)


@pytest.mark.slow
@pytest.mark.timing
def test_two_host_exports_of_the_shipped_checkpoint_agree(tmp_path):
    """The same choice twice, and every measured p90 within the stated errors of the other run's:
    on this shared machine too, whose other processes make exactly the noise this must survive."""
    from bim_export.deploy.latency.stats import intervals_overlap

    runs = []
    for name in ("first", "second"):
        pipeline.run_export("host", None, tmp_path / name, None)
        runs.append(json.loads((tmp_path / name / "host" / "manifest.json").read_text()))
    a, b = runs
    assert (a["depth"], a["precision"]) == (b["depth"], b["precision"])
    la, lb = a["latency"], b["latency"]
    assert la["stat"] == "p90" and la["source"].startswith("measured")
    assert intervals_overlap(la["ms"], la["expected_error"], lb["ms"], lb["expected_error"]), (la, lb)
    rows_a, rows_b = a["candidates"]["candidates"], b["candidates"]["candidates"]
    assert [(r["depth"], r["precision"]) for r in rows_a] == [(r["depth"], r["precision"]) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert intervals_overlap(ra["latency_ms"], ra["expected_error"], rb["latency_ms"], rb["expected_error"]), \
            (ra, rb)
