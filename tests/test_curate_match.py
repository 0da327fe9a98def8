"""`curate.match`: a crop, recolouring or re-encoding of an image matches it pixel by pixel, an
unrelated image does not, the crop search is what finds crops, and `pairs_in` keeps only the
candidates that match."""

import io

import kornia
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipelines.curate.curate import CurateOptions
from pipelines.curate.duplicates import duplicate_groups, pairs_in
from pipelines.curate.match import correlation, crops_compared, match_scores
from pipelines.images.decode_tasks import CONTENT_HASH
from pipelines.outputs.embed import THUMBNAIL
from tests.helpers.curation_sample import copy_of, curation_sample, look_alikes, thumbnails_of, true_pairs

# Measured on these 24 textures (seed 0): crops match at 0.969 or more, recolourings and JPEG at
# 0.996 or more; without the crop search a crop correlates at most 0.755; unrelated textures at
# most 0.357.
MATCH = CurateOptions().match
# The MNIST-M curation sample's true pairs match at 0.944 or more, its hard negatives at most 0.925
# (docs/BENCHMARKS.md, "Curation", `curation separation`): deterministic, no encoder is trained.


def texture(seed: int, side: int = 64) -> bytes:
    """A PNG of smooth random colour (blurred noise): a picture with no two alike."""
    noise = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
    smooth = kornia.filters.gaussian_blur2d(noise, (13, 13), (2.0, 2.0))
    smooth = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin())
    out = io.BytesIO()
    Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def originals() -> list[bytes]:
    return [texture(seed) for seed in range(24)]


@pytest.mark.parametrize("kind", ["crop", "colour", "jpeg"])
def test_a_copy_matches_its_original(originals, kind):
    rng = np.random.default_rng(0)
    copies = thumbnails_of([copy_of(data, kind, rng) for data in originals])
    assert match_scores(thumbnails_of(originals), copies).min() >= MATCH


def test_unrelated_images_do_not_match(originals):
    first, second = np.triu_indices(len(originals), k=1)
    thumbs = thumbnails_of(originals)
    assert match_scores(thumbs[first], thumbs[second]).max() < 0.6


def test_the_crop_search_is_what_finds_a_crop(originals):
    rng = np.random.default_rng(0)
    thumbs, crops = thumbnails_of(originals), thumbnails_of([copy_of(data, "crop", rng) for data in originals])
    whole = correlation(torch.tensor(thumbs, dtype=torch.float32), torch.tensor(crops, dtype=torch.float32))
    assert whole.max() < MATCH <= match_scores(thumbs, crops).min()


def test_a_crop_box_spans_its_pixels_edges():
    """A crop (x, y, width, height) covers source pixels x to x + width edge to edge, as a resize
    of that slice does: the affine grid gives it back (0.995: at its border the slice has no
    neighbours to blend), and a box one pixel off does not (0.20, 0.66 on this noise)."""
    source = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.nn.functional.interpolate(source[..., 4:28, 6:26], size=(32, 32), mode="bilinear",
                                             align_corners=False)  # rows 4-27, columns 6-25
    boxes = torch.tensor([[[6.0, 4.0, 20.0, 24.0], [7.0, 4.0, 20.0, 24.0], [6.0, 4.0, 21.0, 24.0]]])
    exact, shifted, wider = crops_compared(source, target, boxes)[0].tolist()
    assert exact > 0.99 and max(shifted, wider) < 0.9, (exact, shifted, wider)


def candidates_table(images: list[bytes], hashes: list[str], rng) -> pa.Table:
    """Rows whose embeddings are all alike (every pair a candidate), with the images' thumbnails."""
    vectors = np.ones((len(images), 8), np.float32) + 0.001 * rng.standard_normal((len(images), 8)).astype(np.float32)
    thumbs = thumbnails_of(images)
    return pa.table({
        "id": [f"img{i:02d}" for i in range(len(images))],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8),
        CONTENT_HASH: hashes,
        THUMBNAIL: pa.FixedSizeListArray.from_arrays(pa.array(thumbs.reshape(-1)), thumbs.shape[1]),
    })


def test_pairs_in_keeps_the_candidates_whose_pixels_match(originals):
    rng = np.random.default_rng(1)
    images = originals[:4] + [copy_of(originals[0], "crop", rng), originals[1]]  # a crop of 0, the bytes of 1
    table = candidates_table(images, ["h0", "h1", "h2", "h3", "h4", "h1"], rng)
    # every pair is a candidate by the embeddings: the pixels decide
    assert len(pairs_in(table, 0.99)) == 1 + 5 * 4 // 2
    found = {(row["a"], row["b"]): row["match"] for row in pairs_in(table, 0.99, match=MATCH).to_pylist()}
    assert set(found) == {("img00", "img04"), ("img01", "img05")}
    assert found[("img01", "img05")] == 1.0 and MATCH <= found[("img00", "img04")] < 1.0


def test_pairs_already_joined_are_not_checked_and_the_groups_are_those_of_checking_all(originals):
    rng = np.random.default_rng(2)
    families = [[originals[f]] + [copy_of(originals[f], kind, rng) for kind in ("crop", "colour", "jpeg", "crop")]
                for f in range(3)]
    images = [image for family in families for image in family] + originals[3:8]
    table = candidates_table(images, [f"h{i}" for i in range(len(images))], rng)
    thumbs = thumbnails_of(images)
    first, second = np.triu_indices(len(images), k=1)
    every = match_scores(thumbs[first], thumbs[second]) >= MATCH
    expected = duplicate_groups((f"img{a:02d}", f"img{b:02d}") for a, b in zip(first[every], second[every]))
    kept = pairs_in(table, 0.99, match=MATCH, candidates=len(images))
    assert duplicate_groups(zip(kept.column("a").to_pylist(), kept.column("b").to_pylist())) == expected
    assert len(set(expected.values())) == 3 and len(expected) == 15  # three families of five
    assert len(kept) < every.sum()  # fewer pairs checked than there are matching pairs


@pytest.mark.slow
def test_the_default_match_separates_the_curation_samples_copies_from_its_look_alikes():
    """Every true pair of the MNIST-M curation sample against each image's 6 nearest others by
    plain pixel correlation (the hardest negatives for a pixel test): the default lies between."""
    table, record = curation_sample("mnist-m")
    thumbs = thumbnails_of(table.column("image").to_pylist())
    positive, negative = look_alikes(thumbs, sorted(true_pairs(record)), table.column("id").to_pylist())
    copies, others = (match_scores(thumbs[[a for a, _ in pairs]], thumbs[[b for _, b in pairs]])
                      for pairs in (positive, negative))
    assert copies.min() >= MATCH > others.max()
