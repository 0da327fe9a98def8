"""Small image corpora made on the fly: every colour mode the decoder must handle, and every kind
of bad record it must skip."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.images.shards import SHARD_SCHEMA


def encode(img: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def rgb_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def good_images() -> dict[str, bytes]:
    """One valid encoded image per mode/format the decoder must turn into RGB."""
    base = rgb_image(0)
    wide = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))  # 16-bit white
    return {
        "rgb.jpg": encode(base, "JPEG"),
        "rgb.png": encode(base),
        "l.png": encode(base.convert("L")),
        "la.png": encode(base.convert("LA")),
        "p.png": encode(base.convert("P")),
        "p.gif": encode(base.convert("P"), "GIF"),
        "rgba.png": encode(base.convert("RGBA")),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "i16.png": encode(wide),
        "rgb.webp": encode(base, "WEBP"),
        "rgb.bmp": encode(base, "BMP"),
    }


def bomb_png() -> bytes:
    """A 10,000 x 10,000 one-bit PNG: ~1 kB on disk, 100 M pixels (over Pillow's 89 M limit)."""
    return encode(Image.new("1", (10_000, 10_000)))


def _damaged_png() -> bytes:
    """A PNG whose header is intact but whose compressed pixel data is overwritten."""
    data = bytearray(encode(rgb_image(2, (64, 64))))
    start = data.index(b"IDAT") + 8
    data[start : start + 200] = b"\xff" * 200
    return bytes(data)


def bad_images() -> dict[str, bytes]:
    """Bytes that must be skipped with a reason; keys name the kind of damage."""
    jpeg = encode(rgb_image(1, (64, 64)), "JPEG")
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "corrupt.png": _damaged_png(),
        "empty.png": b"",
        "text.jpg": b"this is not an image, just some text that happens to end in .jpg",
        "bomb.png": bomb_png(),
    }


def write_shards(folder, values, rows_per_shard=4):
    """Shards of `rows_per_shard` rows with ids `r0`, `r1`, ... and null labels."""
    folder.mkdir()
    for start in range(0, len(values), rows_per_shard):
        chunk = values[start : start + rows_per_shard]
        pq.write_table(
            pa.table(
                {"image": chunk, "label": [None] * len(chunk), "id": [f"r{start + i}" for i in range(len(chunk))]},
                schema=SHARD_SCHEMA,
            ),
            folder / f"part-{start:04d}.parquet",
        )
