"""train/config.py: settings from YAML, flags and ``--set``, where each came from, and one-line errors.

The error corpus of single bad settings is in test_trainer.py; here, how the sources combine, how a
setting is named back to the user, and the stored form a checkpoint keeps.
"""

from __future__ import annotations

import json

import pytest

from bim_export.core.errors import InputError
from bim_export.train.config import TrainConfig, load_train_config, parse_overrides, setting_name


@pytest.fixture
def run_yaml(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: vit_small_patch16_224\n"
                 "model_args: {img_size: 64, depth: 6}\n"
                 "exits: [2, 4, 6]\n"
                 "decoder_width: 64\n"
                 "steps: 10\n"
                 "batch_size: 16\n"
                 "out: from-yaml\n")
    return f


def _error(call) -> str:
    with pytest.raises(InputError) as e:
        call()
    return str(e.value)


def test_set_beats_flags_beats_yaml_and_nested_mappings_merge(run_yaml, tmp_path):
    cfg = load_train_config(run_yaml, ["steps=30", "model_args.depth=4", "exits=[2, 4]", "decoder_heads=4"],
                            out=tmp_path / "flag", steps=20, model=None)
    assert cfg.steps == 30  # --set over the flag over the file
    assert cfg.out == tmp_path / "flag"  # the flag over the file
    assert cfg.bim.arch == "vit_small_patch16_224"  # a flag given as None is not given
    assert cfg.bim.model_args == {"img_size": 64, "depth": 4}  # one key of the file's mapping changed
    assert cfg.bim.exits == [2, 4]
    assert (cfg.bim.decoder.width, cfg.bim.decoder.heads) == (64, 4)  # flat settings nest into the model's config
    assert cfg.batch_size == 16 and cfg.seed == 0  # untouched, and the default


def test_each_setting_is_named_by_where_it_came_from(run_yaml, tmp_path):
    cfg = load_train_config(run_yaml, ["model_args.depth=4"], out=tmp_path / "o", exits=[2, 4])
    assert cfg.where("steps") == f"{run_yaml}: steps"
    assert cfg.where("exits") == "--exits"
    assert cfg.where("out") == "--out"
    assert cfg.where("model_args.depth") == "--set model_args.depth"
    assert cfg.where("seed") == f"{run_yaml}: seed"  # not given: the settings' source
    assert load_train_config(out=tmp_path / "o").where("seed") == "training settings: seed"
    assert cfg.given_over_stored() == []  # not resumed: nothing stored to be given over


def test_an_unknown_key_is_one_line_naming_the_field_and_its_source(run_yaml, tmp_path):
    message = _error(lambda: load_train_config(run_yaml, ["stepz=3"]))
    assert message == "--set stepz: Extra inputs are not permitted (got 3)"
    run_yaml.write_text(run_yaml.read_text() + "decoder_widht: 32\n")
    message = _error(lambda: load_train_config(run_yaml))
    assert "\n" not in message
    assert message.startswith(f"{run_yaml}: decoder_widht: Extra inputs are not permitted")


def test_a_bad_nested_value_is_named_as_the_user_wrote_it(run_yaml):
    message = _error(lambda: load_train_config(run_yaml, ["decoder_width=2"]))
    assert message == "--set decoder_width: Input should be greater than or equal to 4 (got 2)"
    assert "\n" not in message


def test_several_bad_values_are_one_line_that_counts_the_rest(run_yaml):
    message = _error(lambda: load_train_config(run_yaml, ["steps=0", "batch_size=0", "seed=x"]))
    assert "\n" not in message
    assert message.startswith("--set ") and message.endswith("[+2 more]")


def test_set_values_are_yaml_and_bad_ones_are_refused():
    assert parse_overrides(["exits=[3, 6]", "lr=0.001", "init=", "model_args.class_token=false"]) == {
        "exits": [3, 6], "lr": 0.001, "init": None, "model_args": {"class_token": False}}
    # YAML reads 1e-3 as a string; the setting's type still makes it the number
    assert parse_overrides(["lr=1e-3"]) == {"lr": "1e-3"}
    assert load_train_config(out="o", overrides=["lr=1e-3"]).lr == 1e-3
    assert _error(lambda: parse_overrides(["exits=[3, 6"])).startswith("--set exits=[3, 6: value is not valid YAML")
    assert _error(lambda: parse_overrides(["=3"])) == "--set =3: expected KEY=VALUE"


def test_setting_names_of_the_models_fields():
    assert setting_name("bim.decoder.width") == "decoder_width"
    assert setting_name("bim.last_decoder.heads") == "last_decoder_heads"
    assert setting_name("bim.arch") == "model"
    assert setting_name("bim.model_args.depth") == "model_args.depth"
    assert setting_name("steps") == "steps"


def test_the_stored_settings_build_the_same_config(run_yaml, tmp_path):
    # a checkpoint keeps cfg.model_dump(mode="json") as config.json's "train"; a resumed run rebuilds it
    cfg = load_train_config(run_yaml, ["grad_clip=1.0", "grad_clip_mode=stage", "betas=[0.9, 0.99]"],
                            out=tmp_path / "o")
    stored = json.loads(json.dumps(cfg.model_dump(mode="json")))
    again = TrainConfig(**stored)
    assert again.model_dump() == cfg.model_dump()
    assert again.betas == (0.9, 0.99) and again.bim.decoder.width == 64


def test_learning_rate_and_warm_up_derived_from_the_batch(tmp_path):
    cfg = load_train_config(out=tmp_path, overrides=["batch_size=512", "base_lr=1e-3", "steps=400"])
    assert cfg.peak_lr == pytest.approx(2e-3) and cfg.warmup == 20
    cfg = load_train_config(out=tmp_path, overrides=["lr=5e-4", "warmup_steps=0"])
    assert cfg.peak_lr == 5e-4 and cfg.warmup == 0
