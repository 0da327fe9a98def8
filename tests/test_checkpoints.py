"""Checkpoints that can be trusted: written whole or not at all, a damaged one named in one line,
and a run folder falling back to its newest checkpoint that loads."""

import contextlib
import os

import pytest
import torch

from pipelines.train.worker import resume_state
from pipelines.weights.checkpoint import (
    STATE_FILE,
    CheckpointDamaged,
    CheckpointNotFound,
    find_checkpoint,
    load_state,
    save_checkpoint,
)
from tests.helpers.cli import set_args


def write(folder, step):
    folder.mkdir(parents=True)
    torch.save({"progress": {"step": step}, "method": {"w": torch.ones(3) * step}}, folder / STATE_FILE)
    return folder


@pytest.fixture
def run(tmp_path):
    """A run folder whose newest checkpoint is truncated (a crash while it was copied)."""
    folder = tmp_path / "run"
    write(folder / "checkpoint_2026-01-01_00-00-01.000000", 10)
    write(folder / "checkpoint_2026-01-01_00-00-02.000000", 20)
    newest = write(folder / "checkpoint_2026-01-01_00-00-03.000000", 30) / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:200])
    return folder


def test_a_damaged_checkpoint_is_named_in_one_line(run):
    damaged = run / "checkpoint_2026-01-01_00-00-03.000000"
    with pytest.raises(CheckpointDamaged, match=rf"checkpoint {damaged}/{STATE_FILE}: damaged, cannot be read \("):
        load_state(str(damaged))
    with pytest.raises(CheckpointDamaged) as error:
        find_checkpoint(str(damaged))
    assert "\n" not in str(error.value)


def test_a_run_folder_falls_back_to_its_newest_checkpoint_that_loads(run, caplog):
    with caplog.at_level("WARNING", logger="selfsup"):
        chosen = find_checkpoint(str(run))
    assert chosen == str(run / "checkpoint_2026-01-01_00-00-02.000000")
    assert any("checkpoint_2026-01-01_00-00-03.000000 is damaged; using the previous one" in r.getMessage()
               for r in caplog.records)
    for name in os.listdir(run):  # nothing loads: one line, not a traceback
        (run / name / STATE_FILE).write_bytes(b"nope")
    with pytest.raises(CheckpointNotFound, match="none of its checkpoints can be read"):
        find_checkpoint(str(run))


class FakeCheckpoint:
    """What Ray Train hands a worker: a path and a local directory view of it."""

    def __init__(self, path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_resuming_from_a_damaged_checkpoint_uses_the_previous_one(run, caplog):
    with caplog.at_level("WARNING", logger="selfsup"):
        state = resume_state(FakeCheckpoint(run / "checkpoint_2026-01-01_00-00-03.000000"), rank=0)
    assert state["progress"]["step"] == 20
    assert any("resuming from the previous checkpoint" in r.getMessage() for r in caplog.records)
    # Never a newer one than Ray's: from the middle checkpoint, damaged, only the oldest is eligible.
    middle = run / "checkpoint_2026-01-01_00-00-02.000000" / STATE_FILE
    middle.write_bytes(b"nope")
    assert resume_state(FakeCheckpoint(middle.parent), rank=1)["progress"]["step"] == 10


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from pipelines.config import build_method
    from tests.helpers.runs import tiny_config

    config = tiny_config()
    method = build_method(config)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_checkpoint(str(tmp_path), method, optimizer, scaler, {"step": 1}, config)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", STATE_FILE]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    (tmp_path / "b").mkdir()
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path / "b"), method, optimizer, scaler, {"step": 2}, config)
    assert not os.path.exists(tmp_path / "b" / STATE_FILE)  # no file under the name loaders read


def test_checkpoints_the_run_never_registered_are_moved_aside(run, capsys):
    import json

    from pipelines.cli import main
    from pipelines.train.run_folder import ORPHANS, RAY_SNAPSHOT, move_orphans

    registered = ["checkpoint_2026-01-01_00-00-01.000000", "checkpoint_2026-01-01_00-00-02.000000"]
    (run / RAY_SNAPSHOT).write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": name} for name in registered],
        "latest_checkpoint_result": {"checkpoint_dir_name": registered[-1]}}))
    stray = "checkpoint_2026-01-01_00-00-03.000000"
    # Checked before Ray starts (refused afterwards here: the data does not exist).
    assert main(["pretrain", "--method", "simclr", "--data", str(run / "no-data"), "--storage", str(run.parent),
                 "--name", run.name]) == 2
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint_2")) == registered
    assert os.listdir(run / ORPHANS) == [stray]
    assert f"{run / ORPHANS / stray}: moved aside" in capsys.readouterr().err
    assert move_orphans(str(run)) == []  # a run folder in order stays as it is
    (run / RAY_SNAPSHOT).unlink()  # interrupted before Ray registered any: none is the run's
    assert len(move_orphans(str(run))) == 2 and not any(p.startswith("checkpoint_2") for p in os.listdir(run))


def test_a_deleted_checkpoint_leaves_the_run_resumable_from_the_one_before(digits, tmp_path, capsys):
    """Ray Train refuses a run folder whose snapshot names a checkpoint that is gone; the CLI takes
    it out of the snapshot first, and the run resumes from the newest checkpoint still there.
    The run folder: the committed 1-epoch run (tests/fixtures) after a second epoch whose
    checkpoint Ray registered and its user then deleted."""
    import json
    import shutil

    from pipelines.cli import main
    from pipelines.train.run_folder import RAY_SNAPSHOT
    from tests.fixtures.make_checkpoint import FIXTURE_SETS
    from tests.helpers.runs import COMMON, STEPS_PER_EPOCH, TINY

    out, _ = digits
    run = tmp_path / "run"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint-format-1"), run)
    snapshot = json.loads((run / RAY_SNAPSHOT).read_text())
    first = snapshot["latest_checkpoint_result"]
    newest = {**first, "version": first["version"] + 1, "checkpoint_dir_name": "checkpoint_2099-01-01_00-00-00.000000"}
    snapshot.update(checkpoint_results=[*snapshot["checkpoint_results"], newest], latest_checkpoint_result=newest,
                    checkpoint_report_indices=[*snapshot["checkpoint_report_indices"], snapshot["current_report_index"]],
                    current_report_index=snapshot["current_report_index"] + 1)
    (run / RAY_SNAPSHOT).write_text(json.dumps(snapshot))  # the newest checkpoint's folder is gone
    arguments = set_args({**COMMON, **TINY["simclr"], **FIXTURE_SETS, "optim.epochs": 2})
    assert main(["pretrain", "--method", "simclr", "--preset", "tiny", "--data", f"{out}/train",
                 "--storage", str(tmp_path), "--name", "run", "--resume", *arguments]) == 0  # to 2 epochs
    captured = capsys.readouterr()
    metrics = json.loads(captured.out.strip().splitlines()[-1])["metrics"]
    assert metrics["resumed_from_step"] == STEPS_PER_EPOCH  # the epoch-1 checkpoint, not a fresh start
    assert metrics["step"] == metrics["total_steps"] == 2 * STEPS_PER_EPOCH
    assert f"{run / newest['checkpoint_dir_name']}: gone from the run folder" in captured.err
    assert (run / (RAY_SNAPSHOT + ".bak")).exists()
