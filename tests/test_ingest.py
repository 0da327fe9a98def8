import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.images.ingest import IngestConfig, image_dataset, iter_canvas_batches
from pipelines.images.quality import BadDataError
from tests.helpers.corpus import bad_images, encode, good_images, rgb_image, write_shards


def one_pass(location, config, epoch=0, batch_size=64, with_labels=True):
    dataset, log = image_dataset(location, config, with_labels=with_labels)
    batches = list(iter_canvas_batches(dataset, batch_size, log, config, epoch=epoch))
    return batches, log


def test_streams_every_row_of_many_shards_in_a_new_order_each_epoch(digits):
    out, summary = digits
    config = IngestConfig(canvas_size=16, shuffle_buffer=0, seed=3)
    dataset, log = image_dataset(f"{out}/train", config, with_labels=True)
    orders = []
    for epoch in range(2):
        batches = list(iter_canvas_batches(dataset, 100, log, config, epoch=epoch))
        labels = torch.cat([b["label"] for b in batches])
        assert len(labels) == summary["splits"]["train"]["images"]
        assert batches[0]["image"].shape[1:] == (16, 16, 3) and batches[0]["image"].dtype == torch.uint8
        assert labels.unique().numel() == 10
        orders.append(labels)
    assert not torch.equal(orders[0], orders[1])  # shard order reshuffled between passes
    assert torch.equal(orders[0].sort().values, orders[1].sort().values)


def test_corrupt_records_are_skipped_counted_and_named(ray_session, tmp_path):
    good = list(good_images().values()) * 3
    bad = list(bad_images().values()) + [None]
    values = good + bad
    write_shards(tmp_path / "mixed", values)
    config = IngestConfig(canvas_size=8, max_bad_fraction=0.5, shuffle_buffer=0)
    batches, log = one_pass(str(tmp_path / "mixed"), config, batch_size=5)
    assert sum(len(b["image"]) for b in batches) == len(good)
    summary = ray_session.get(log.summary.remote())
    assert summary["seen"] == len(values) and summary["bad"] == len(bad)
    bad_ids = {f"r{len(good) + i}" for i in range(len(bad))}
    assert {e["id"] for e in summary["bad_examples"]} == bad_ids
    assert set(summary["bad_by_reason"]) == {"corrupt image", "not an image", "empty bytes", "decompression bomb", "null image"}


def test_bad_fraction_over_the_cap_stops_with_a_clear_error(ray_session, tmp_path):
    values = [encode(rgb_image(i)) for i in range(20)] + [b"garbage"] * 2
    write_shards(tmp_path / "mixed", values)
    with pytest.raises(BadDataError, match=r"2 of 22 images could not be decoded \(9.1% > cap 1.0%"):
        one_pass(str(tmp_path / "mixed"), IngestConfig(canvas_size=8))


def test_hf_struct_images_without_ids_stream(ray_session, tmp_path):
    struct = pa.array(
        [{"bytes": encode(rgb_image(i)), "path": None} for i in range(5)] + [{"bytes": None, "path": None}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    pq.write_table(pa.table({"image": struct}), tmp_path / "hf.parquet")
    batches, log = one_pass(str(tmp_path / "hf.parquet"), IngestConfig(canvas_size=8, max_bad_fraction=0.5))
    assert sum(len(b["image"]) for b in batches) == 5
    assert (batches[0]["label"] == -1).all()
    example = ray_session.get(log.summary.remote())["bad_examples"][0]
    assert example["id"].endswith("hf.parquet") and example["reason"] == "null image"


def test_bad_ingest_config_is_refused():
    with pytest.raises(ValueError, match="data.max_bad_fraction=2"):
        IngestConfig(max_bad_fraction=2).validate()
