"""Data makers shared by the benchmark scripts."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.shards import SHARD_SCHEMA


def photo_like_jpegs(count: int, width=320, height=240, seed=0) -> list[bytes]:
    """Smooth colour fields plus texture, JPEG-compressed like camera photos (~10-20 kB each)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y))], -1)
        pixels = (127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(folder: str, images: list[bytes], shards: int = 8, row_group_size: int = 256) -> None:
    """`images` as shard-schema Parquet files in `folder`."""
    os.makedirs(folder, exist_ok=True)
    per = -(-len(images) // shards)
    for s in range(shards):
        chunk = images[s * per : (s + 1) * per]
        ids = [f"{s}-{i}" for i in range(len(chunk))]
        table = pa.table({"image": chunk, "label": [None] * len(chunk), "id": ids}, schema=SHARD_SCHEMA)
        pq.write_table(table, f"{folder}/part-{s}.parquet", row_group_size=row_group_size)
