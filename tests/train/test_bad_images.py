"""Unreadable images met in training: replaced by the next of the stream, counted, named once, and
the same in a resumed run. They travel back from the loader's worker processes with the batch."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from conftest import tiny_train_config

from bim_export.core.errors import InputError
from bim_export.core.resources import sample_images_dir
from bim_export.model.checkpoint import load_checkpoint
from bim_export.model.images import list_image_files
from bim_export.train.distributed import DistInfo
from bim_export.train.images import TrainImages
from bim_export.train.loader import SeededDataset, StepSampler, _mix
from bim_export.train.trainer import train

BAD = {"broken/half.jpg": "truncated", "broken/text.jpg": "not an image Pillow can read"}


@pytest.fixture
def folder(tmp_path):
    """Six real photos and two unreadable files (one truncated JPEG, one text file named .jpg)."""
    from conftest import write_truncated_jpeg

    root = tmp_path / "photos"
    (root / "broken").mkdir(parents=True)
    for p in sorted(sample_images_dir().rglob("*_00.jpg"))[:6]:
        (root / p.name).write_bytes(p.read_bytes())
    write_truncated_jpeg(root / "broken" / "half.jpg")
    (root / "broken" / "text.jpg").write_text("not an image")
    return root


def _log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_replacement_is_the_next_image_of_the_stream(folder):
    names = list_image_files(folder)
    images = TrainImages(folder, names, 32)
    sampler = StepSampler(len(names), 8, 1, DistInfo(), seed=0, start_step=0, steps=4)
    ds = SeededDataset(images, 0, sampler.index, tries=8)
    bad = [(p, i) for p, i in sampler if names[i] in BAD]
    assert bad
    for p, i in bad:
        pos, used, x, skipped = ds[(p, i)]
        k = next(k for k in range(1, 8) if names[sampler.index(p + k)] not in BAD)
        assert used == sampler.index(p + k) and [n for n, _ in skipped] == [names[sampler.index(p + j)]
                                                                              for j in range(k)]
        assert all(why in reason for (n, reason), why in zip(skipped, [BAD[n] for n, _ in skipped]))
        # augmented as its own: seeded by the position and the try, so not a copy of position p + k
        assert torch.equal(x, images.load(used, random.Random(_mix(0, 1, p, k))))
        assert torch.equal(ds[(p, i)][2], x)  # deterministic


def test_bad_images_are_counted_named_once_and_reported(folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    res = train(tiny_train_config(out, data=folder, steps=4, num_workers=2, log_every=2))  # 32 places, 4 epochs
    lines = _log(out)
    new = {n: why for line in lines for n, why in line.get("bad_images_new", {}).items()}
    named = [n for line in lines for n in line.get("bad_images_new", {})]
    assert sorted(named) == sorted(BAD) and all(BAD[n] in new[n] for n in BAD)  # each file named once
    assert lines[-1]["bad_images"] == 2 and lines[-1]["replaced"] >= 2 * 3  # every epoch meets both
    record = load_checkpoint(out, weights=False).metrics["bad_images"]
    assert record["count"] == 2 and record["replaced"] == lines[-1]["replaced"] and set(record["names"]) == set(BAD)
    for n in BAD:
        assert sum(f"unreadable image {n} (" in r.getMessage() for r in caplog.records) == 1
    summary = res.summary().splitlines()
    assert summary[2].startswith(f"  unreadable images: 2 files, replaced {record['replaced']} times")
    assert "broken/half.jpg" in summary[2]


def test_a_clean_folder_reports_nothing(tmp_path):
    out = tmp_path / "run"
    res = train(tiny_train_config(out, steps=2))
    assert not any("bad_images" in line for line in _log(out))
    assert "bad_images" not in load_checkpoint(out, weights=False).metrics
    assert "unreadable" not in res.summary()


@pytest.mark.slow
def test_resumed_run_sees_the_same_replacements(folder, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    flat = dict(data=folder, save_every=3, min_lr=1e-3)  # a constant learning rate: stopping at step 3 and
    train(tiny_train_config(ref, steps=6, num_workers=2, **flat))  # resuming to 6 is the 6-step run
    train(tiny_train_config(out, steps=3, num_workers=2, **flat))
    train(tiny_train_config(out, steps=6, **flat), resume=True)
    a, b = load_checkpoint(ref), load_checkpoint(out)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.metrics["bad_images"] == b.metrics["bad_images"]
    strip = lambda lines: [{k: v for k, v in x.items() if k not in ("img_per_s", "elapsed_s")} for x in lines]  # noqa: E731
    assert strip(_log(ref)) == strip(_log(out))  # each file named once, in the same line


def test_a_batch_that_cannot_be_filled_is_an_error(tmp_path):
    root = tmp_path / "mostly-broken"
    root.mkdir()
    (root / "good.jpg").write_bytes(sorted(sample_images_dir().rglob("*.jpg"))[0].read_bytes())
    for i in range(30):
        (root / f"bad{i:02d}.jpg").write_bytes(b"broken")
    out = tmp_path / "run"
    with pytest.raises(InputError, match=rf"{root}: none of 4 images in a row of the training stream is readable "
                                         rf"\(step \d+; e\.g\. bad\d\d\.jpg \(not an image Pillow can read\)"):
        train(tiny_train_config(out, data=root, batch_size=4, steps=20, save_every=100))
    assert not out.exists()  # it failed before the first save
