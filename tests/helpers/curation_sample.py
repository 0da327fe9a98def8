"""A sample to curate, built from a bundled one: one class ten times as frequent as each other,
and duplicates injected with a record of where each came from (issue 33's must-show).

Each injected copy is one of: the same bytes (`exact`), a crop of 85-95 % of each side resized
back (`crop`), brightness, contrast and saturation each scaled by 0.75-1.25 (`colour`), or the image
re-encoded as JPEG at quality 60-85 (`jpeg`), in turn. Ids of copies say nothing of their source.
"""

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageEnhance

from pipelines.curate.match import correlation
from pipelines.images.decode import decode_canvas
from pipelines.images.samples import sample_tables
from pipelines.images.shards import SHARD_SCHEMA
from pipelines.outputs.embed import thumbnails

KINDS = ("exact", "crop", "colour", "jpeg")
CROP_SIDE = (0.85, 0.95)  # a crop keeps this fraction of each side


def copy_of(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    """An injected duplicate of the encoded image `data` (see the module's docstring)."""
    if kind == "exact":
        return data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "crop":
        width, height = image.size
        w, h = (int(round(side * rng.uniform(*CROP_SIDE))) for side in (width, height))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = image.crop((left, top, left + w, top + h)).resize((width, height), Image.BICUBIC)
    elif kind == "colour":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(float(rng.uniform(0.75, 1.25)))
    out = io.BytesIO()
    if kind == "jpeg":
        image.save(out, format="JPEG", quality=int(rng.integers(60, 86)))
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def curation_sample(name: str = "mnist-m", heavy_class: int = 0, factor: int = 10, duplicates: float = 0.25,
                    repeats: int = 1, seed: int = 0) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """(shard-schema table, [(copy id, source id, kind)]): the train split of sample `name` with
    every image of `heavy_class` and 1/`factor` of each other class (drawn at random), then
    `duplicates` x that many copies of random images of it injected. `repeats` > 1 adds that many
    augmented rounds of the whole set (a larger set for memory benchmarks; not recorded)."""
    rng = np.random.default_rng(seed)
    train = sample_tables(name)["train"]
    labels = np.array(train.column("label").to_pylist())
    heavy = int((labels == heavy_class).sum())
    keep = np.concatenate([np.flatnonzero(labels == c) if c == heavy_class else
                           rng.choice(np.flatnonzero(labels == c), heavy // factor, replace=False)
                           for c in np.unique(labels)])
    images = train.column("image").to_pylist()
    rows = [(images[i], int(labels[i]), f"{name}/{i}") for i in sorted(keep)]
    record = []
    for number, source in enumerate(rng.choice(len(rows), int(round(duplicates * len(rows))), replace=True)):
        data, label, source_id = rows[source]
        kind = KINDS[number % len(KINDS)]
        record.append((f"{name}/copy{number:05d}", source_id, kind))
        rows.append((copy_of(data, kind, rng), label, record[-1][0]))
    for round_ in range(1, repeats):
        rows += [(copy_of(data, KINDS[1 + (i + round_) % 3], rng), label, f"{item}~r{round_}")
                 for i, (data, label, item) in enumerate(rows[:len(keep) + len(record)])]
    order = rng.permutation(len(rows))
    return pa.table({"image": [rows[i][0] for i in order], "label": [rows[i][1] for i in order],
                     "id": [rows[i][2] for i in order]}, schema=SHARD_SCHEMA), record


def true_pairs(record: list[tuple[str, str, str]]) -> set[tuple[str, str]]:
    """Every pair of images that come from the same original (the original and its copies), a < b."""
    families: dict[str, set[str]] = {}
    for copy, source, _ in record:
        families.setdefault(source, {source}).add(copy)
    return {(a, b) for family in families.values() for a in family for b in family if a < b}


def found_pairs(groups: pa.Table) -> set[tuple[str, str]]:
    """Every pair of images that curate put in the same duplicate group, a < b."""
    members: dict[int, list[str]] = {}
    for group, item in zip(groups.column("group").to_pylist(), groups.column("id").to_pylist()):
        members.setdefault(group, []).append(item)
    return {(a, b) for family in members.values() for a in family for b in family if a < b}


def thumbnails_of(images: list[bytes]) -> np.ndarray:
    """(n, 32 * 32) uint8: the thumbnails `selfsup embed --thumbnails` writes for these encoded
    images on a 32-pixel canvas."""
    return thumbnails(torch.from_numpy(np.stack([decode_canvas(data, 32) for data in images]))).numpy()


def look_alikes(thumbnails: np.ndarray, pairs: list[tuple[str, str]], ids: list[str],
                nearest: int = 6) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(the row pairs of `pairs`, each image's `nearest` others by plain pixel correlation of the
    `thumbnails` that are not among them: the hardest negatives for a pixel test), rows a < b."""
    row = {item: i for i, item in enumerate(ids)}
    positive = sorted(tuple(sorted((row[a], row[b]))) for a, b in pairs)
    flat = torch.tensor(thumbnails, dtype=torch.float32)
    similar = correlation(flat[:, None, :], flat[None, :, :]).fill_diagonal_(-2).topk(nearest, dim=1).indices
    negative = sorted({tuple(sorted((i, int(j)))) for i in range(len(ids)) for j in similar[i]} - set(positive))
    return positive, negative
