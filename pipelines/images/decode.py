"""Decode encoded image bytes into fixed-size uint8 "canvas" arrays, or, for `data.decode: gpu`,
route the JPEGs the device can decode to it still encoded (`route_records`; the device side is
device_decode.py).

Runs inside Ray Data `map_batches` tasks on CPU workers (through decode_tasks.py), so it imports
no torch. Every failure is turned into a `BadImage` with a short reason, so callers can skip the
record, count it and name its `id`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

# 16-bit and 32-bit integer modes that `Image.convert("RGB")` would clip instead of scale.
_WIDE_INTEGER_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
JPEG_MAGIC = b"\xff\xd8\xff"
# nvJPEG's RGB output equals Pillow's conversion for these; Adobe CMYK/YCCK JPEGs go to Pillow.
DEVICE_JPEG_MODES = ("RGB", "L")
EXIF_ORIENTATION = 0x0112
# Travels with each record: how a device-decoded JPEG is routed, or a canvas Pillow made.
ROUTE_CANVAS, ROUTE_JPEG = 0, 1


class BadImage(ValueError):
    """An image record that cannot be decoded; the message is the reason."""


def image_bytes(value) -> bytes | None:
    """The encoded bytes of one `image` value: raw binary, or a Hugging Face struct {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None
    return bytes(value)


def header_size(data: bytes | None) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, without decoding it; None when it does not open."""
    try:
        with Image.open(io.BytesIO(data or b"")) as img:
            return img.size
    except Exception:  # noqa: BLE001  (Pillow raises many kinds; the caller only reports the size)
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(img, dtype=np.int64)
        top = 65535 if wide.max(initial=0) > 255 or img.mode != "I" else 255
        grey = np.clip(wide * 255 // top, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels carry arbitrary colour underneath; show them as white, like a viewer.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open and fully decode one encoded image, mapping every failure to `BadImage`.

    Raises:
        BadImage: null or empty bytes, bytes that are not an image, a truncated or corrupt
            file, or more than `max_pixels` pixels (a decompression bomb).
    """
    if data is None:
        raise BadImage("null image")
    if len(data) == 0:
        raise BadImage("empty bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} pixels > limit {max_pixels}")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # DCT-domain downscale: far less work
            img.load()
            return img
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"decompression bomb: {error}") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... on corrupt data
        raise BadImage(f"corrupt image ({type(error).__name__}: {error})") from None


def decode_canvas(data: bytes | None, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one encoded image into a `(size, size, 3)` uint8 RGB canvas.

    The image is EXIF-oriented, converted to RGB (L, LA, P, RGBA, CMYK, 16-bit, ...), then
    its shorter side is resized to `size` and the centre square is kept.

    Raises:
        BadImage: see `open_image`.
    """
    img = open_image(data, max_pixels, draft_size=size)
    try:
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
    except Exception as error:
        raise BadImage(f"corrupt image ({type(error).__name__}: {error})") from None
    return np.asarray(img, dtype=np.uint8)


def decode_batch(
    images, ids, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode a batch; bad records are skipped.

    Returns:
        canvases: `(n_good, size, size, 3)` uint8.
        kept: indices into the input of the records that decoded.
        bad: `(id, reason)` for each skipped record.
    """
    canvases, kept, bad = [], [], []
    for index, value in enumerate(images):
        try:
            canvases.append(decode_canvas(image_bytes(value), size, max_pixels))
            kept.append(index)
        except BadImage as error:
            bad.append((str(ids[index]) if ids is not None else str(index), str(error)))
    array = np.stack(canvases) if canvases else np.zeros((0, size, size, 3), dtype=np.uint8)
    return array, kept, bad


def jpeg_orientation(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation (1-8) of a JPEG the device can decode, from its header alone; None
    for anything else (other formats, CMYK, too many pixels, a header Pillow cannot read), which
    Pillow decodes on the CPU and, when bad, names the reason."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        header = Image.open(io.BytesIO(data))  # reads the markers up to the frame header only
        width, height = header.size
        if header.format != "JPEG" or header.mode not in DEVICE_JPEG_MODES or width * height > max_pixels:
            return None
        orientation = header.getexif().get(EXIF_ORIENTATION, 1)
        return orientation if orientation in range(1, 9) else 1
    except Exception:
        return None


def route_records(images: list, ids: list, size: int, max_pixels: int) -> tuple[pa.Table, list[tuple[str, str]]]:
    """Ray Data side of `data.decode: gpu`: JPEGs for the device stay encoded, the rest become
    canvases (Pillow), the bad ones are dropped.

    Returns:
        table: one row per kept record: `encoded` (binary: the JPEG, or the `(size, size, 3)`
            uint8 canvas' bytes), `route` (int8: ROUTE_JPEG or ROUTE_CANVAS), `orientation`
            (int8: EXIF 1-8 of a JPEG) and `id` (string).
        bad: `(id, reason)` of each record dropped here.
    """
    encoded, routes, orientations, kept_ids, bad = [], [], [], [], []
    for index, value in enumerate(images):
        record_id = str(ids[index])
        data = image_bytes(value)
        orientation = jpeg_orientation(data, max_pixels) if data else None
        if orientation is not None:
            encoded.append(data)
            routes.append(ROUTE_JPEG)
        else:
            try:
                encoded.append(decode_canvas(data, size, max_pixels).tobytes())
            except BadImage as error:
                bad.append((record_id, str(error)))
                continue
            routes.append(ROUTE_CANVAS)
            orientation = 1
        orientations.append(orientation)
        kept_ids.append(record_id)
    table = pa.table({
        "encoded": pa.array(encoded, type=pa.binary()),
        "route": pa.array(routes, type=pa.int8()),
        "orientation": pa.array(orientations, type=pa.int8()),
        "id": pa.array(kept_ids, type=pa.string()),
    })
    return table, bad
