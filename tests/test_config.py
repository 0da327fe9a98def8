import pytest

from methods import METHODS
from pipelines.config import build_config, config_from_dict


def test_presets_merge_file_and_sets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  epochs: 7\nhparams:\n  temperature: 0.3\n")
    config = build_config("simclr", "tiny", str(path), {"optim.batch_size": 128, "views.view.blur": 0.5})
    assert config.optim.epochs == 7 and config.optim.batch_size == 128
    assert config.hparams.temperature == 0.3
    assert config.recipe().views["view"].blur == 0.5
    assert config.backbone.kwargs["channels"] == [16, 32, 64, 128]  # from the tiny preset
    assert config_from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_imagenet_preset_is_the_papers():
    config = build_config("simclr", "imagenet")
    assert (config.optim.batch_size, config.hparams.temperature, config.optim.lr_scaling) == (4096, 0.1, "linear")
    assert config.backbone.name == "resnet50" and config.hparams.sync_bn


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"optim.epochs": 0}, "optim.epochs=0: must be an integer >= 1"),
        ({"optim.batch_size": "big"}, "optim.batch_size='big': must be an integer"),
        ({"train.precision": "fp8"}, "train.precision='fp8': must be auto, bf16, fp16 or fp32"),
        ({"data.canvas_size": 2}, "data.canvas_size=2: must be an integer >= 4"),
        ({"nonsense.key": 1}, "unknown section 'nonsense'"),
        ({"backbone.name": "resnet_nope"}, "backbone.name='resnet_nope': must be a timm model name"),
        ({"hparams.proj_layers": 9}, "hparams.proj_layers=9: must be an integer in [1, 4]"),
        ({"preset": "huge"}, "preset='huge': unknown for simclr"),
        ({"method": "swav"}, "method='swav': unknown"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_range(sets, message):
    with pytest.raises(ValueError) as error:
        build_config("simclr", "tiny", sets=sets)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_config_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        build_config("simclr", "tiny", str(path))
    with pytest.raises(ValueError, match="No such file"):
        build_config("simclr", "tiny", str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_to_dict_is_built_from_the_sections_and_round_trips(method):
    import dataclasses

    import yaml

    for preset in METHODS[method].presets:
        config = build_config(method, preset)
        assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    changed = dataclasses.replace(config, optim=dataclasses.replace(config.optim, epochs=7))
    assert changed.to_dict()["optim"]["epochs"] == 7  # no second copy of the config to go stale


def test_a_run_that_names_no_preset_gets_the_methods_best_measured_one():
    assert build_config("simclr").preset == "demo"  # docs/BENCHMARKS.md: kNN 0.51-0.61 against tiny's 0.18-0.40
    assert build_config("mae").preset == "tiny"


def test_a_preset_warm_up_longer_than_the_epochs_set_is_fitted_and_said(caplog):
    config = build_config("mae", "tiny", sets={"optim.epochs": 1})  # the preset: 2 of 20 epochs
    assert config.optim.warmup_epochs == pytest.approx(0.1)
    assert "optim.warmup_epochs: the preset's 2 is longer than the 1 epochs set; warming up for 0.1" in caplog.text
    with pytest.raises(ValueError, match="optim.warmup_epochs=3: must be in"):  # both the user's: refused
        build_config("mae", "tiny", sets={"optim.epochs": 1, "optim.warmup_epochs": 3})
    assert build_config("mae", "tiny", sets={"optim.epochs": 30}).optim.warmup_epochs == 2  # fits: kept
