"""Checkpoints that outlive a release (issue 31, item 6): every checkpoint carries its format
(`CHECKPOINT_FORMAT`); a run folder written by the code of format 1 (tests/fixtures, made by
tests/fixtures/make_checkpoint.py) keeps loading, exporting and resuming; a newer format is refused
in one line that says what to do."""

import os
import shutil

import pytest
import torch

from pipelines.weights.checkpoint import (
    CHECKPOINT_FORMAT,
    STATE_FILE,
    CheckpointRefused,
    find_checkpoint,
    load_checkpoint,
    load_state,
)
from tests.fixtures.make_checkpoint import FIXTURE_SETS
from tests.helpers.runs import tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FORMAT_1 = os.path.join(FIXTURES, "checkpoint-format-1")


def test_the_committed_fixture_is_small_and_of_format_1():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(FORMAT_1) for f in files)
    assert size < 1_000_000
    assert load_state(find_checkpoint(FORMAT_1))["format"] == 1 <= CHECKPOINT_FORMAT


def test_a_format_1_checkpoint_loads_and_exports(tmp_path):
    from pipelines.outputs.export import export_encoder

    checkpoint = find_checkpoint(FORMAT_1)
    _, config = load_checkpoint(checkpoint)
    assert config.method == "simclr" and config.backbone.kwargs["channels"] == [4, 8, 16, 32]
    exported = export_encoder(checkpoint, str(tmp_path / "encoder"))  # loads it back through timm
    assert exported["max_feature_difference"] < 1e-4


def test_a_newer_format_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "checkpoint_newer"
    shutil.copytree(find_checkpoint(FORMAT_1), folder)
    state = load_state(str(folder))
    torch.save({**state, "format": CHECKPOINT_FORMAT + 1}, folder / STATE_FILE)
    with pytest.raises(CheckpointRefused) as refused:
        load_state(str(folder))
    message = str(refused.value)
    assert "\n" not in message and f"format {CHECKPOINT_FORMAT + 1}" in message and "upgrade selfsup" in message


@pytest.mark.slow  # resumes through Ray Train
def test_a_format_1_run_resumes_to_more_epochs(digits, tmp_path):
    from pipelines.train.pretrain import pretrain

    out, _ = digits
    shutil.copytree(FORMAT_1, tmp_path / "old-run")
    run = pretrain(tiny_config("simclr", **{**FIXTURE_SETS, "optim.epochs": 2}), f"{out}/train",
                   storage=str(tmp_path), name="old-run")
    metrics = run["metrics"]
    assert metrics["resumed_from_step"] > 0 and metrics["step"] == metrics["total_steps"] == 2 * metrics[
        "resumed_from_step"]
    assert load_state(run["checkpoint"])["format"] == CHECKPOINT_FORMAT
