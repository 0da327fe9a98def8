import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.images.prepare import PrepareConfig, prepare
from pipelines.images.shards import SHARD_SCHEMA, DataError, find_shards, read_classes
from tests.helpers.cli import said_lines
from tests.helpers.corpus import bad_images, encode, good_images, rgb_image


def read_all(location):
    shards = find_shards(location)
    return pa.concat_tables([pq.read_table(f) for f in shards.files]), shards


def test_sample_digits_counts_split_and_schema(digits):
    out, summary = digits
    assert summary["images_written"] == 1797
    assert summary["splits"]["train"]["images"] == 1438 and summary["splits"]["test"]["images"] == 359
    assert summary["bad_skipped"] == 0 and summary["shards"] > 4  # small shards were asked for
    table, shards = read_all(f"{out}/train")
    assert table.schema.equals(SHARD_SCHEMA)
    assert len(set(table.column("id").to_pylist())) == 1438
    # fixed split: the first 80 % of each class in source order is train
    test_ids = set(read_all(f"{out}/test")[0].column("id").to_pylist())
    assert "digits/00000" in table.column("id").to_pylist() and "digits/01796" in test_ids
    assert read_classes(f"{out}/train") == [str(d) for d in range(10)]
    metadata = pq.ParquetFile(shards.files[0]).metadata
    assert metadata.num_row_groups > 1  # row groups smaller than a shard, so readers stream


def make_folder(root, bad=True):
    good = good_images()
    for index, (name, data) in enumerate(sorted(good.items())):
        cls = "cats" if index % 2 else "dogs"
        os.makedirs(root / cls, exist_ok=True)
        (root / cls / name).write_bytes(data)
    if bad:
        for name, data in bad_images().items():
            (root / "dogs" / f"bad_{name}").write_bytes(data)
    (root / "README.txt").write_text("not an image")
    return good


def test_image_folder_labels_ids_and_bad_files(ray_session, tmp_path, capsys):
    from pipelines.console import to_stderr

    to_stderr()
    good = make_folder(tmp_path / "src")
    summary = prepare(str(tmp_path / "src"), str(tmp_path / "out"), PrepareConfig())
    said = [line for line in capsys.readouterr().err.splitlines() if "prepare: skipped" in line]
    assert len(said) == 1 and f"skipped {len(bad_images())} image(s) that do not decode" in said[0]  # on stderr too
    assert summary["images_written"] == len(good)
    assert summary["bad_skipped"] == len(bad_images())
    assert {e["id"] for e in summary["bad_examples"]} == {f"dogs/bad_{n}" for n in bad_images()}
    assert summary["ignored_non_image_files"] == 1
    assert summary["classes"] == ["cats", "dogs"] == read_classes(str(tmp_path / "out"))
    table, _ = read_all(str(tmp_path / "out"))
    rows = {r["id"]: r for r in table.to_pylist()}
    for index, (name, data) in enumerate(sorted(good.items())):
        cls = "cats" if index % 2 else "dogs"
        row = rows[f"{cls}/{name}"]
        assert row["image"] == data  # original bytes, not re-encoded
        assert row["label"] == ["cats", "dogs"].index(cls)


def test_hf_style_parquet_round_trip(ray_session, tmp_path):
    images = [encode(rgb_image(i)) for i in range(6)]
    struct = pa.array(
        [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)] + [{"bytes": b"junk", "path": "bad.png"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": struct, "label": list(range(7))}), tmp_path / "hf.parquet")
    summary = prepare(str(tmp_path / "hf.parquet"), str(tmp_path / "out"), PrepareConfig())
    assert summary["images_written"] == 6 and summary["bad_skipped"] == 1
    assert summary["bad_examples"][0]["id"] == "bad.png"
    table, _ = read_all(str(tmp_path / "out"))
    rows = sorted(table.to_pylist(), key=lambda r: r["label"])
    assert [r["image"] for r in rows] == images and [r["id"] for r in rows] == [f"img{i}.png" for i in range(6)]


def test_own_schema_round_trip_and_refuses_to_overwrite(ray_session, tmp_path):
    ids = [f"x{i}" for i in range(5)]
    table = pa.table({"image": [encode(rgb_image(i)) for i in range(5)], "label": [None, 1, 2, 3, 4], "id": ids},
                     schema=SHARD_SCHEMA)
    pq.write_table(table, tmp_path / "in.parquet")
    prepare(str(tmp_path / "in.parquet"), str(tmp_path / "out"), PrepareConfig())
    back, _ = read_all(str(tmp_path / "out"))
    assert back.sort_by("id").equals(table.sort_by("id"))
    with pytest.raises(DataError, match="already holds Parquet files"):
        prepare(str(tmp_path / "in.parquet"), str(tmp_path / "out"), PrepareConfig())


def test_too_many_bad_images_fail_clearly(ray_session, tmp_path):
    make_folder(tmp_path / "src")
    with pytest.raises(DataError, match=r"images could not be decoded .* > cap 1.0%"):
        prepare(str(tmp_path / "src"), str(tmp_path / "out"), PrepareConfig(max_bad_fraction=0.01))


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "no such file or folder"),
        ("empty", "no image files found"),
        ("no_image_column", "no 'image' column"),
        ("wrong_type", "column 'image' is int64"),
    ],
)
def test_bad_sources_fail_with_one_line(ray_session, tmp_path, setup, message):
    src = tmp_path / "src"
    if setup == "empty":
        src.mkdir()
    elif setup == "no_image_column":
        src.mkdir()
        pq.write_table(pa.table({"pixels": [b"x"]}), src / "a.parquet")
    elif setup == "wrong_type":
        src.mkdir()
        pq.write_table(pa.table({"image": [1]}), src / "a.parquet")
    with pytest.raises(DataError, match=message) as error:
        prepare(str(src), str(tmp_path / "out"), PrepareConfig())
    assert str(src) in str(error.value) and "\n" not in str(error.value)


def test_split_by_record_id_is_exact_per_class_and_independent_of_order():
    from pipelines.images.prepare import split_by_record_id

    ids = [f"{c}/{i}.png" for c in ("a", "b", "c") for i in range(40 if c != "c" else 7)]
    classes = [i.split("/")[0] for i in ids]
    held = split_by_record_id(ids, classes, 0.2)
    assert [sum(h.startswith(c) for h in held) for c in "abc"] == [8, 8, 1]
    assert split_by_record_id(ids[::-1], classes[::-1], 0.2) == held
    assert split_by_record_id(ids, classes, 0.3) > held  # a larger fraction keeps the smaller one's ids


def test_own_folder_gets_train_and_test_splits(ray_session, tmp_path):
    root = tmp_path / "src"
    for index in range(24):
        cls = ["cats", "dogs"][index % 2]
        os.makedirs(root / cls, exist_ok=True)
        (root / cls / f"{index}.png").write_bytes(encode(rgb_image(index)))
    summary = prepare(str(root), str(tmp_path / "out"), PrepareConfig(test_fraction=0.25))
    assert summary["splits"]["train"]["images"] == 18 and summary["splits"]["test"]["images"] == 6
    train = set(read_all(str(tmp_path / "out" / "train"))[0].column("id").to_pylist())
    test_table = read_all(str(tmp_path / "out" / "test"))[0]
    test = set(test_table.column("id").to_pylist())
    assert not train & test and len(train | test) == 24
    assert sorted(test_table.column("label").to_pylist()) == [0, 0, 0, 1, 1, 1]  # 3 of each class's 12
    assert read_classes(str(tmp_path / "out" / "test")) == ["cats", "dogs"]
    again = prepare(str(root), str(tmp_path / "again"), PrepareConfig(test_fraction=0.25))
    assert set(read_all(again["splits"]["test"]["path"])[0].column("id").to_pylist()) == test


def test_shards_with_ids_get_train_and_test_splits(ray_session, tmp_path):
    """Shards (here written by prepare) split by record id: exact per label, the same as the
    rank rule picks, and shards without ids refused with the two-step recipe."""
    from pipelines.images.prepare import held_out_ids

    root = tmp_path / "src"
    for index in range(30):
        cls = ["cats", "dogs", "owls"][index % 3]
        os.makedirs(root / cls, exist_ok=True)
        (root / cls / f"{index}.png").write_bytes(encode(rgb_image(index)))
    prepare(str(root), str(tmp_path / "all"), PrepareConfig())
    summary = prepare(str(tmp_path / "all"), str(tmp_path / "split"), PrepareConfig(test_fraction=0.2))
    assert summary["splits"]["train"]["images"] == 24 and summary["splits"]["test"]["images"] == 6
    test_table = read_all(str(tmp_path / "split" / "test"))[0]
    assert sorted(test_table.column("label").to_pylist()) == [0, 0, 1, 1, 2, 2]
    assert set(test_table.column("id").to_pylist()) == held_out_ids(str(tmp_path / "all"), 0.2)
    assert read_classes(str(tmp_path / "split" / "train")) == ["cats", "dogs", "owls"]
    no_ids = tmp_path / "no_ids.parquet"
    pq.write_table(pa.table({"image": [encode(rgb_image(0))] * 4}), no_ids)
    with pytest.raises(DataError, match="has no `id` column to split by; write shards first"):
        held_out_ids(str(no_ids), 0.2)


def test_test_fraction_refusals_come_before_ray(tmp_path, capsys, monkeypatch):
    from pipelines import cli

    monkeypatch.setattr(cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray was started"))
    (tmp_path / "few" / "a").mkdir(parents=True)
    (tmp_path / "few" / "a" / "x.png").write_bytes(encode(rgb_image(0)))
    pq.write_table(pa.table({"image": [encode(rgb_image(0))] * 4}), tmp_path / "no_ids.parquet")
    for args, message in [
        (["sample:digits", "--test-fraction", "0.2"], "is a sample source with fixed train/test splits"),
        ([str(tmp_path / "no_ids.parquet"), "--test-fraction", "0.2"], "has no `id` column to split by"),
        ([str(tmp_path / "few"), "--test-fraction", "1.5"], "--test-fraction 1.5: must be in (0, 1)"),
        ([str(tmp_path / "few"), "--test-fraction", "0.2"], "would leave the test split of the 1 images empty"),
    ]:
        assert cli.main(["prepare", *args, "--out", str(tmp_path / "o")]) == 2
        lines = said_lines(capsys.readouterr().err)
        assert len(lines) == 1 and message in lines[0], lines
