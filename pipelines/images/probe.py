"""The probe set: a fixed sample of unlabeled images on which every report measures the
label-free metrics (pipelines/evaluate/label_free.py).

Drawn once, before Ray Train starts, from the training shards (or from `--probe`'s shards):
the first rows of files spread evenly over the sorted shard list, so it costs a few row groups'
reads whatever the dataset's size, and the same shards give the same images on every run and
every resume. Shards that `selfsup prepare` wrote hold their records in a seeded random order,
so their first rows are a random sample; shards written class by class should be given a mixed
`--probe` set. The images travel as their encoded bytes and are decoded by Ray Data like the
validation set.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.images.decode_tasks import decode_records
from pipelines.images.shards import DataError, find_shards


def probe_table(location: str, size: int) -> pa.Table:
    """Up to `size` records `{"image", "id"}` of the shards at `location`: the first rows of up
    to `size` files spread evenly over the sorted list. Records without an `id` column are named
    `<file>#<row>`."""
    if size < 1:
        raise ValueError(f"probe size {size}: must be >= 1")
    shards = find_shards(location)
    count = min(len(shards.files), size)
    files = [shards.files[i * len(shards.files) // count] for i in range(count)]
    per_file = math.ceil(size / count)
    parts = []
    for path in files:
        try:
            reader = pq.ParquetFile(path, filesystem=shards.filesystem)
            columns = ["image", "id"] if shards.has_id else ["image"]
            batch = next(reader.iter_batches(batch_size=per_file, columns=columns), None)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{path}: not a readable Parquet file for the probe set ({error})") from None
        if batch is None:
            continue
        table = pa.Table.from_batches([batch])
        ids = (table.column("id").cast(pa.string()) if shards.has_id
               else pa.array([f"{path}#{row}" for row in range(len(table))], pa.string()))
        parts.append(pa.table({"image": table.column("image"), "id": ids}))
    if not parts:
        raise DataError(f"{location}: the probe set found no rows")
    return pa.concat_tables(parts, promote_options="permissive").slice(0, size)


def probe_dataset(table: pa.Table, canvas_size: int, max_pixels: int, quality_log):
    """The probe records as a Ray dataset of decoded `{"image": (S, S, 3) uint8}` rows (bad
    images are skipped and counted in `quality_log`, as in training)."""
    import ray.data

    return ray.data.from_arrow(table).map_batches(
        decode_records,
        fn_kwargs=dict(size=canvas_size, max_pixels=max_pixels, quality_log=quality_log, with_labels=False),
        batch_format="pyarrow",
        batch_size=256,
    )
