"""Pixel verification of near-duplicate candidates: is one image a crop, recolouring or
re-encoding of the other?

An encoder's cosine alone does not tell copies from look-alikes: one trained without crops never
puts a crop near its original, and one trained with crops puts unrelated images that close too
(docs/BENCHMARKS.md, "Curation"). So the pairs the index finds are candidates, and each is
checked in pixel space, as copy detection checks retrieved candidates.

Each image is kept as a small grey thumbnail (`selfsup embed`'s `thumbnail` column). For a
pair (a, b), every crop of a whose sides keep at least SMALLEST_CROP of a's (every whole-pixel
size at every position, by template matching; then half a pixel around the best) is resized to
b's size and compared with b by normalised cross-correlation, and the other way round. The best
correlation is the pair's match score: 1 for equal pixels, near 1 for a crop, a change of
brightness or contrast (which the correlation ignores) or a re-encoding, lower for two different
images.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.outputs.embed import THUMBNAIL_SIDE

SMALLEST_CROP = 0.8  # a crop keeping less of either side is not searched for
PAIRS_PER_CHUNK = 32  # bounds memory: a chunk's crops of every size at every position


def crop_sizes(side: int = THUMBNAIL_SIDE, smallest: float = SMALLEST_CROP) -> list[tuple[int, int]]:
    """(width, height) of the crops searched: every whole-pixel size from `side` down to
    `smallest` of it, each side on its own."""
    sizes = range(side, int(np.ceil(smallest * side)) - 1, -1)
    return list(itertools.product(sizes, sizes))


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation along the last dimension (0 where either is flat)."""
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    return torch.where(norms > 1e-6, (x * y).sum(-1) / norms.clamp_min(1e-6), torch.zeros_like(norms))


def crops_compared(source: torch.Tensor, target: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """(P, n) correlation of each crop of each source with its target, the crop resized to the
    target's size (bilinear). source, target: (P, 1, S, S) floats; crops: (P, n, 4) in pixels.
    One affine grid for every crop: Kornia's `crop_and_resize` gives the same scores, slower
    (docs/BENCHMARKS.md, "Curation")."""
    pairs, count, side = source.shape[0], crops.shape[1], source.shape[-1]
    x, y, w, h = crops.unbind(-1)
    theta = torch.zeros(pairs, count, 2, 3)  # output [-1, 1] -> the crop's span of the source, normalised
    theta[..., 0, 0], theta[..., 0, 2] = w / side, (2 * x + w) / side - 1
    theta[..., 1, 1], theta[..., 1, 2] = h / side, (2 * y + h) / side - 1
    grid = F.affine_grid(theta.view(-1, 2, 3), [pairs * count, 1, side, side], align_corners=False)
    resized = F.grid_sample(source, grid.view(pairs, count * side, side, 2), mode="bilinear",
                            padding_mode="border", align_corners=False)  # (P, 1, n * S, S)
    return correlation(resized.view(pairs, count, side * side), target.view(pairs, 1, side * side))


def every_position(source: torch.Tensor, target: torch.Tensor, width: int, height: int) -> tuple:
    """(the crop (P, 4) of each source of about `width` x `height` pixels, at the position where it
    best matches its target, and that correlation (P,)): the source is resized so that such a crop
    is the target's size, and the target slides over it, one resized pixel at a time (a grouped
    convolution: template matching)."""
    pairs, side = source.shape[0], source.shape[-1]
    rows, columns = round(side * side / height), round(side * side / width)
    resized = F.interpolate(source, size=(rows, columns), mode="bilinear", align_corners=False).view(1, pairs, rows,
                                                                                                     columns)
    template = target - target.mean(dim=(-2, -1), keepdim=True)
    template = template / template.flatten(1).norm(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    products = F.conv2d(resized, template, groups=pairs)[0]  # (P, positions down, positions across)
    area = side * side
    sums, squares = (F.avg_pool2d(values, side, stride=1)[0] * area for values in (resized, resized ** 2))
    spread = (squares - sums ** 2 / area).clamp_min(0).sqrt()
    scores = torch.where(spread > 1e-3, products / spread.clamp_min(1e-3), torch.zeros_like(spread)).flatten(1)
    best, at = scores.max(dim=1)
    down, across = at // products.shape[-1], at % products.shape[-1]
    scale_x, scale_y = side / columns, side / rows  # one resized pixel, in source pixels
    crops = torch.stack([across * scale_x, down * scale_y, torch.full_like(best, side * scale_x),
                         torch.full_like(best, side * scale_y)], dim=1)
    return crops, best


def refined(source: torch.Tensor, target: torch.Tensor, crops: torch.Tensor, step: float) -> torch.Tensor:
    """(P,) the best correlation of the crops `step` pixels from each pair's crop (P, 4) in position
    and size (81 a pair, kept inside the image and at least SMALLEST_CROP of it)."""
    side = source.shape[-1]
    near = crops[:, None, :] + step * torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=4)))[None]
    near[..., 2:] = near[..., 2:].clamp(SMALLEST_CROP * side, side)
    near[..., :2] = torch.minimum(near[..., :2].clamp_min(0), side - near[..., 2:])
    return crops_compared(source, target, near).max(dim=1).values


def best_crop(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(P,) the highest correlation of a crop of each source with its target: every size of
    `crop_sizes` at every position (`every_position`), then half a pixel around the best."""
    found = [every_position(source, target, width, height) for width, height in crop_sizes(source.shape[-1])]
    crops, scores = torch.stack([c for c, _ in found]), torch.stack([s for _, s in found])  # (sizes, P, ...)
    best, pairs = scores.argmax(dim=0), torch.arange(len(source))
    return torch.maximum(scores[best, pairs], refined(source, target, crops[best, pairs], 0.5))


def match_scores(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(P,) float32 match score of each pair of thumbnails ((P, THUMBNAIL_SIDE**2) uint8): the
    best correlation of a crop of either image with the other (see the module's docstring)."""
    side, scores = THUMBNAIL_SIDE, []
    for start in range(0, len(first), PAIRS_PER_CHUNK):
        a, b = (torch.from_numpy(np.asarray(images[start:start + PAIRS_PER_CHUNK], dtype=np.float32) / 255)
                .view(-1, 1, side, side) for images in (first, second))
        with torch.no_grad():
            scores.append(torch.maximum(best_crop(a, b), best_crop(b, a)))
    return torch.cat(scores).numpy() if scores else np.zeros(0, np.float32)
