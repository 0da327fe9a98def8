"""Data makers shared by the benchmark scripts."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.images.shards import SHARD_SCHEMA


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


def photo_crop_jpegs(count: int, sides: tuple[int, int] = (256, 320), seed: int = 0) -> list[bytes]:
    """Random crops (each side drawn from `sides`) of the photographs scikit-image and
    scikit-learn ship (the MNIST-M backgrounds), flipped at random, as quality-90 JPEGs; the
    synthetic `photo_like_jpegs` where those packages are not installed."""
    try:
        from pipelines.images.samples import background_photos

        photos = [p for p in background_photos() if min(p.shape[:2]) >= sides[1]]
    except ImportError:
        photos = []
    if not photos:
        return photo_like_jpegs(count, sides[1], sides[0], seed)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        height, width = (int(rng.integers(sides[0], sides[1] + 1)) for _ in range(2))
        top = int(rng.integers(photo.shape[0] - height + 1))
        left = int(rng.integers(photo.shape[1] - width + 1))
        crop = photo[top:top + height, left:left + width]
        buffer = io.BytesIO()
        Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
