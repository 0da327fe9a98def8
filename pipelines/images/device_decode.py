"""JPEG decoding on the training device (`data.decode: gpu`).

GPU nodes often have few CPUs per GPU (a g5.2xlarge: 8 vCPUs for one A10G) while DINO's 10 crops
need well over 1,000 decoded images per second per GPU. With `data.decode: gpu` the Ray Data tasks
only read each record's header (`decode.route_records`, torch-free like every decode task): a JPEG
the device can decode travels to the worker still encoded, and everything else (PNG, CMYK JPEGs,
...) is decoded to a canvas by Pillow there, as with `data.decode: cpu`. On the worker, `device_canvases` decodes the JPEGs of a batch
in one `torchvision.io.decode_jpeg(device=...)` call (nvJPEG on CUDA) and fits each to the canvas
on the device. A JPEG the device refuses (a truncated file, a coding nvJPEG lacks) is decoded by
Pillow on the worker instead; one Pillow refuses too is a bad image, counted with its id.

The canvas is the one `decode.decode_canvas` makes (EXIF-oriented, RGB, the centre square resized
to `size` with antialiased bicubic), but for where the square is cut: `ImageOps.fit` cuts at a
fractional offset, `fit_canvas` at whole pixels (a half-pixel shift; docs/BENCHMARKS.md), and
Pillow decodes a JPEG of twice the canvas or more at a reduced DCT scale first.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pipelines.images.decode import ROUTE_CANVAS, ROUTE_JPEG, BadImage, decode_canvas


def decode_jpegs(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs to `(3, H, W)` uint8 RGB on `device`, in one batched call; None for each one
    the decoder refuses. A batched call returns nothing when one image fails, so a failed batch
    is decoded again one image at a time."""
    if not jpegs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    with warnings.catch_warnings():
        # Deprecated in torchvision 0.29 for TorchCodec, which we do not depend on (yet).
        warnings.simplefilter("ignore", UserWarning)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            decoded = []
            for tensor in tensors:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`(C, H, W)` turned upright as `PIL.ImageOps.exif_transpose` does for EXIF `orientation`."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def fit_canvas(image: torch.Tensor, size: int) -> torch.Tensor:
    """`(3, H, W)` uint8 -> the `(size, size, 3)` uint8 canvas: the centre square, resized with
    antialiased bicubic (as `ImageOps.fit` crops to the aspect ratio, then resizes)."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top:top + side, left:left + side]
    if side != size:
        resized = F.interpolate(square[None].float(), size=(size, size), mode="bicubic", antialias=True,
                                align_corners=False)[0]
        square = resized.round_().clamp_(0, 255).to(torch.uint8)
    return square.permute(1, 2, 0)


def device_canvases(batch: dict, size: int, device: torch.device | str,
                    max_pixels: int) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Worker side of `data.decode: gpu`: one batch of `route_records` rows -> canvases.

    Args:
        batch: numpy columns `encoded`, `route`, `orientation`, `id` (`iter_batches`' numpy format).
        device: where JPEGs are decoded and canvases made (the worker's GPU; CPU in tests).

    Returns:
        canvases: `(n_good, size, size, 3)` uint8 on `device`, in the batch's order.
        bad: `(id, reason)` of each JPEG neither the device nor Pillow could decode.
    """
    device = torch.device(device)
    encoded, routes = batch["encoded"], batch["route"]
    jpeg_rows = [row for row in range(len(encoded)) if routes[row] == ROUTE_JPEG]
    decoded = dict(zip(jpeg_rows, decode_jpegs([encoded[row] for row in jpeg_rows], device)))
    canvases, bad = [], []
    for row in range(len(encoded)):
        if routes[row] == ROUTE_CANVAS:
            canvas = torch.frombuffer(bytearray(encoded[row]), dtype=torch.uint8).view(size, size, 3)
            canvases.append(canvas.to(device))
        elif decoded[row] is not None:
            canvases.append(fit_canvas(orient(decoded[row], int(batch["orientation"][row])), size))
        else:  # the device refused it: Pillow decides, and names the reason when it refuses too
            try:
                canvas = decode_canvas(bytes(encoded[row]), size, max_pixels)
                canvases.append(torch.from_numpy(canvas.copy()).to(device))  # a writable copy
            except BadImage as error:
                bad.append((str(batch["id"][row]), str(error)))
    if not canvases:
        return torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device), bad
    return torch.stack(canvases), bad
