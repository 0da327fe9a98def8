"""Every shard is checked before Ray starts: a bad file among good ones is named in one line."""

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.images.shards import SHARD_SCHEMA, DataError, checked_shards
from tests.helpers.cli import said_lines
from tests.helpers.corpus import encode, rgb_image, write_shards


@pytest.fixture
def good(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, [encode(rgb_image(i)) for i in range(12)])  # three files of four rows
    return folder


def refused(capsys, folder) -> str:
    """The one line `selfsup pretrain` ends with on `folder` (exit 2, before Ray starts)."""
    started = time.perf_counter()
    assert main(["pretrain", "--method", "simclr", "--data", str(folder), "--preset", "tiny",
                 "--set", "optim.batch_size=4"]) == 2
    assert time.perf_counter() - started < 30  # refused by the checks, not by a worker
    lines = said_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def test_a_truncated_shard_among_good_ones_is_named(good, capsys):
    path = good / "part-0004.parquet"
    path.write_bytes(path.read_bytes()[:100])
    assert "part-0004.parquet: not a readable Parquet file" in refused(capsys, good)


def test_a_jpeg_named_parquet_is_named(good, capsys):
    (good / "x.parquet").write_bytes(encode(rgb_image(0), "JPEG"))
    assert "x.parquet: not a readable Parquet file" in refused(capsys, good)


def test_shards_whose_schemas_disagree_are_named(good, capsys):
    pq.write_table(pa.table({"image": [1, 2], "label": [0, 1], "id": ["a", "b"]}), good / "part-9999.parquet")
    line = refused(capsys, good)
    assert "part-9999.parquet: column 'image' is int64 but" in line and "part-0000.parquet has binary" in line


def test_a_set_without_rows_is_refused(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=SHARD_SCHEMA), folder / "part-0000.parquet")
    assert "the shards hold no rows" in refused(capsys, folder)


def test_checked_shards_counts_every_row(good):
    assert checked_shards(str(good)).num_rows == 12
    with pytest.raises(DataError, match="no such file"):
        checked_shards(str(good / "missing"))


def run_line(capsys, *extra, data) -> str:
    assert main(["pretrain", "--method", "simclr", "--data", str(data), "--set", "optim.batch_size=4", *extra]) == 2
    lines = said_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    return lines[0]


def test_what_a_run_needs_from_the_machine_is_refused_before_ray(good, tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    line = run_line(capsys, "--workers", str((os.cpu_count() or 1) + 2), data=good)
    assert "CPUs, but this machine's Ray has" in line  # Ray Train would wait for them forever
    # one worker's CPU leaves no room for a decode task: Ray Data would wait forever (it did)
    assert "+ one decode task's data.decode_num_cpus 0.5 = 1.5 CPUs" in run_line(capsys, "--num-cpus", "1", data=good)
    assert "--name 'ré-run': use letters" in run_line(capsys, "--name", "ré-run", data=good)
    blocked = tmp_path / "a-file"  # a folder under a file cannot be made, even by root
    blocked.write_text("")
    line = run_line(capsys, "--storage", str(blocked / "runs"), data=good)
    assert f"--storage {blocked}/runs: not writable (Not a directory)" in line
    other = tmp_path / "runs" / "mine" / "checkpoint_2026-01-01_00-00-00.000000"
    other.mkdir(parents=True)
    (other / "config.yaml").write_text("method: mae\n")
    (other.parent / "checkpoint_manager_snapshot.json").write_text(
        '{"checkpoint_results": [{"checkpoint_dir_name": "%s"}]}' % other.name)  # registered by Ray
    line = run_line(capsys, "--storage", str(tmp_path / "runs"), "--name", "mine", data=good)
    assert "is a mae run and this is simclr" in line


def test_a_folder_of_images_given_as_shards_points_to_prepare(tmp_path, capsys):
    from tests.helpers.corpus import encode, rgb_image

    (tmp_path / "photos" / "cats").mkdir(parents=True)
    (tmp_path / "photos" / "cats" / "a.png").write_bytes(encode(rgb_image(0)))
    line = run_line(capsys, data=tmp_path / "photos")
    assert "holds image files, not Parquet shards" in line and f"selfsup prepare {tmp_path / 'photos'} --out" in line
