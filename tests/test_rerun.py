"""A rerun under a --name that holds a run (issue 34, item 1): a complete run with the same
settings is returned without training, different settings or more epochs are refused in one line
naming the first difference, `--resume` continues with the new settings, an interrupted run
resumes. All decided before Ray starts, on the committed 1-epoch run folder (tests/fixtures)."""

import json
import os
import shutil

import pytest

from pipelines.console import UsageError
from pipelines.train.plan import plan_run
from pipelines.train.preflight import check_rerun
from pipelines.weights.checkpoint import STATE_FILE, find_checkpoint
from tests.fixtures.make_checkpoint import FIXTURE_SETS
from tests.helpers.cli import selfsup_command
from tests.helpers.runs import tiny_config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "checkpoint-format-1")
ROWS = 1438  # sample:digits' train split, which the fixture's run trained on


@pytest.fixture
def storage(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "mine")
    return str(tmp_path)


def rerun(storage, resume=False, rows=ROWS, **sets):
    config = tiny_config("simclr", **{**FIXTURE_SETS, **sets})
    return check_rerun(config, plan_run(config, rows), storage, "mine", resume)


def test_a_complete_run_with_the_same_settings_is_returned_without_training(storage):
    result = rerun(storage, **{"train.workers": 2, "train.checkpoint_every_steps": 5})  # how it runs: the same run
    assert result["complete"] and result["metrics"]["step"] == result["metrics"]["total_steps"] == 22
    assert result["checkpoint"] == find_checkpoint(os.path.join(storage, "mine")) and result["run"].endswith("mine")
    assert os.path.isfile(os.path.join(result["checkpoint"], STATE_FILE))  # a checkpoint, not Ray's snapshot file


def test_a_changed_setting_is_refused_naming_it_and_both_values(storage):
    with pytest.raises(UsageError) as refused:
        rerun(storage, **{"hparams.temperature": 0.5})
    message = str(refused.value)
    assert "\n" not in message and "hparams.temperature=0.2, this command has 0.5" in message
    assert "--resume" in message and "new --name" in message


def test_more_epochs_are_refused_unless_resume(storage):
    with pytest.raises(UsageError, match="optim.epochs=1, this command has 2"):
        rerun(storage, **{"optim.epochs": 2})
    assert rerun(storage, resume=True, **{"optim.epochs": 2}) is None  # goes on to Ray, from step 22


def test_other_data_is_a_difference_too(storage):
    with pytest.raises(UsageError, match=r"planned steps \(the data changed\)=22, this command has 11"):
        rerun(storage, rows=ROWS // 2)


def test_an_interrupted_run_with_the_same_settings_resumes(storage):
    history = os.path.join(storage, "mine", "metrics.jsonl")
    rows = [json.loads(line) for line in open(history)]
    with open(history, "w") as stream:
        stream.write(json.dumps({**rows[-1], "step": 10}) + "\n")
    assert rerun(storage) is None
    assert check_rerun(tiny_config("simclr"), plan_run(tiny_config("simclr"), ROWS), storage, "other") is None


def test_the_cli_returns_a_complete_run_as_its_json_line_before_ray(storage, tmp_path):
    import subprocess

    from tests.helpers.corpus import encode, rgb_image, write_shards
    from tests.helpers.runs import COMMON, TINY

    write_shards(tmp_path / "data", [encode(rgb_image(i, (16, 16))) for i in range(ROWS)], rows_per_shard=512)
    command = selfsup_command("pretrain", "--method", "simclr", "--preset", "tiny", "--data", str(tmp_path / "data"),
                              "--storage", storage, "--name", "mine", sets={**COMMON, **TINY["simclr"], **FIXTURE_SETS})
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["complete"] and result["metrics"]["step"] == 22
    assert "is complete (22 of 22 steps, same settings)" in done.stderr
    # selfsup's own lines only: no Ray started to print its own
    assert all(line.startswith("[selfsup]") for line in done.stderr.splitlines()), done.stderr


def test_pretrain_starts_by_saying_what_the_defaults_chose(tmp_path):
    """Issue 34, item 3: preset, epochs and steps, the batch split, the peak LR, and the canvas
    against the images' own size (the first image's header) where they differ."""
    from pipelines.images.shards import find_shards, first_image_size
    from pipelines.train.preflight import start_line
    from tests.helpers.corpus import encode, rgb_image, write_shards

    write_shards(tmp_path / "data", [encode(rgb_image(i, (64, 48))) for i in range(8)])
    size = first_image_size(find_shards(str(tmp_path / "data")))
    assert size == (64, 48)
    config = tiny_config("simclr", **{"train.workers": "1:2", "optim.batch_size": 64})
    line = start_line(config, plan_run(config, ROWS), size)
    assert line.startswith("pretrain: simclr, preset tiny: ") and "\n" not in line
    assert f"{config.optim.epochs} epochs x 22 steps over 1,438 images" in line
    assert "1-2 workers elastic, at 2: 2 workers x 32 images = global batch 64 (the recipe's)" in line
    assert "images are 64x48 px (the first one), decoded to the preset's 16 px canvas" in line
    assert "px canvas" not in start_line(config, plan_run(config, ROWS), (16, 16))  # nothing to say
