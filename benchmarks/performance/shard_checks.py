"""How long the checks before Ray take on a folder of many shards: `checked_shards` reads every
file's footer (in parallel) and compares schemas. Writes N one-row-group shards of 10 rows to a
temporary folder and times the check.

    python -m benchmarks.performance.shard_checks --files 2000
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.images.shards import SHARD_SCHEMA, checked_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    table = pa.table({"image": [buffer.getvalue()] * 10, "label": [0] * 10, "id": [str(i) for i in range(10)]},
                     schema=SHARD_SCHEMA)
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.files):
            pq.write_table(table, f"{folder}/part-{index:05d}.parquet")
        started = time.perf_counter()
        rows = checked_shards(folder).num_rows
        seconds = time.perf_counter() - started
    print(json.dumps({"files": args.files, "rows": rows, "check_seconds": round(seconds, 3)}))


if __name__ == "__main__":
    main()
