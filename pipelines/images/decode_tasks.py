"""What Ray Data's decode tasks run (`map_batches` UDFs): encoded records -> canvases, or JPEGs
routed to the training device, with the bad ones counted in the run's `QualityLog`.

No torch here, nor anything that imports it: every Ray process that unpickles a dataset's plan
imports this module, and in a run that is Train's controller, its `DatasetManager` and
`SplitCoordinator` and each decode worker. With torch, each paid for its import before its first
row (measured: docs/BENCHMARKS.md, "Each run's Ray processes").
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pyarrow as pa
import ray

from pipelines.images.decode import decode_batch, image_bytes, route_records
from pipelines.images.quality import check_bad_fraction

MIN_SEEN_FOR_EARLY_STOP = 1000
CONTENT_HASH = "content_hash"  # the column `with_ids` adds beside `id`


def decode_records(batch: pa.Table, size: int, max_pixels: int, quality_log, with_labels: bool,
                   with_ids: bool = False, stop_over: float | None = None) -> dict[str, np.ndarray]:
    """map_batches UDF: encoded bytes -> canvases; bad rows are dropped and reported to the log.

    `stop_over`: a bad fraction (of at least MIN_SEEN_FOR_EARLY_STOP records) at which the task
    fails, ending the pass in its first decode tasks. The consumer's own checks cannot do it when
    every record is bad: then no batch ever reaches it (issue 18). `iter_canvas_batches` turns
    the failed pass back into one `BadDataError`."""
    ids, images = record_ids(batch), batch.column("image").to_pylist()
    canvases, kept, bad = decode_batch(images, ids, size, max_pixels)
    report_bad(quality_log, batch.num_rows, bad, stop_over)
    out = {"image": canvases}
    if with_labels:
        if "label" in batch.column_names:
            labels = batch.column("label").fill_null(-1).to_numpy(zero_copy_only=False)
            out["label"] = labels.astype(np.int64)[kept]
        else:
            out["label"] = np.full(len(kept), -1, dtype=np.int64)
        # A stable integer per record (string ids cannot travel as tensors): splits eval sets.
        out["key"] = np.array([record_key(str(ids[i])) for i in kept], dtype=np.int64)
    if with_ids:
        out["id"] = np.array([str(ids[i]) for i in kept], dtype=object)
        out[CONTENT_HASH] = np.array([content_hash(image_bytes(images[i])) for i in kept], dtype=object)
    return out


def content_hash(data: bytes) -> str:
    """A record's `content_hash`: the hex BLAKE2b-128 of its encoded bytes (equal bytes, equal hash;
    what `selfsup curate` groups exact duplicates by)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def route_for_device(batch: pa.Table, size: int, max_pixels: int, quality_log,
                     stop_over: float | None = None) -> pa.Table:
    """map_batches UDF of `data.decode: gpu`: JPEGs stay encoded for the worker's device, the rest
    are decoded here (`decode.route_records`); bad rows are dropped and reported to the log,
    with the same early stop as `decode_records`."""
    table, bad = route_records(batch.column("image").to_pylist(), record_ids(batch), size, max_pixels)
    report_bad(quality_log, batch.num_rows, bad, stop_over)
    return table


def record_key(record: str) -> int:
    """The int64 `key` labeled batches carry for a record id: its CRC-32 (string ids cannot travel
    as tensors; `images.labeled` ranks records by the same number)."""
    return zlib.crc32(record.encode())


def record_ids(batch: pa.Table) -> list:
    """What names each record in error reports: its `id`, else the shard's path."""
    return batch.column("id" if "id" in batch.column_names else "path").to_pylist()


def report_bad(quality_log, seen: int, bad: list[tuple[str, str]], stop_over: float | None,
               where: str = "decode") -> None:
    """A decode step's counts to the log, waited for so the totals are complete when the consumer
    checks them at the end of a pass; over `stop_over` (once enough are seen) the step fails."""
    totals = ray.get(quality_log.record.remote(seen, bad))
    if stop_over is not None:
        check_bad_fraction(totals, stop_over, where, MIN_SEEN_FOR_EARLY_STOP)
