import math

import pytest
import torch

from methods.schedules import scaled_lr, warmup_cosine
from pipelines.evaluate.frozen import result_line, top1_margin
from pipelines.evaluate.knn import knn_top1, split_bank_queries
from pipelines.evaluate.label_free import embedding_std
from pipelines.evaluate.linear import linear_probe_top1


def clusters(n_per_class=40, classes=4, dim=16, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_knn_and_linear_probe_separate_clusters_and_fail_on_noise():
    x, y = clusters()
    tx, ty = clusters(seed=1)
    tx, ty = x + 0.1 * torch.randn_like(x), y  # queries near the bank
    assert knn_top1(x, y, tx, ty, k=5) == 1.0
    assert linear_probe_top1(x, y, tx, ty, epochs=30) > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(3))]
    noise = torch.randn_like(x)
    assert knn_top1(noise, shuffled, torch.randn_like(x), y, k=5) < 0.5


def test_embedding_std_is_about_one_when_spread_and_zero_when_collapsed():
    assert embedding_std(torch.randn(4096, 64)) == pytest.approx(1.0, abs=0.05)
    assert embedding_std(torch.ones(256, 64) + 1e-6 * torch.randn(256, 64)) < 0.01


def test_top1_margin_covers_95_percent_of_test_sets_of_its_size():
    """Wilson's interval around a top-1 on n test images holds the encoder's true accuracy in about
    95% of test sets of that size; a margin of the plain sqrt(p(1-p)/n) (no 1.96) would hold it in
    about 68%, and one that forgot n's square root in far fewer."""
    assert top1_margin(0.5, 100) == pytest.approx(0.0962, abs=1e-4)  # Wilson's, worked by hand
    generator = torch.Generator().manual_seed(0)
    for true, images in ((0.65, 40), (0.9, 200), (0.3, 1000)):
        measured = (torch.rand(4000, images, generator=generator) < true).float().mean(dim=1).tolist()
        step = 0.5 / images  # a top-1 moves in steps of 1/n
        covered = [abs(p - true) <= top1_margin(p, images) + step for p in measured]
        assert 0.93 <= sum(covered) / len(covered) <= 0.995, (true, images, sum(covered) / len(covered))
    with pytest.raises(ValueError, match="at least one test image"):
        top1_margin(0.5, 0)
    line = result_line({"protocol": "knn", "top1": 0.65, "random_init_top1": 0.75, "raw_pixels_top1": 0.6,
                        "test_images": 40, "top1_margin_95": top1_margin(0.65, 40)})
    assert line == ("eval knn: top-1 0.650 | random-init encoder 0.750 | raw pixels 0.600; each within about "
                    "±0.14 (95%) on 40 test images")


def test_bank_query_split_is_deterministic_and_disjoint():
    keys = torch.arange(100)
    bank, query = split_bank_queries(keys)
    assert query.sum() == 20 and not (bank & query).any()


def test_schedules():
    assert warmup_cosine(0, 100, 1.0, 0.0, 10) == 0.0
    assert warmup_cosine(5, 100, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 1.0, 0.0, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)
    values = [warmup_cosine(s, 100, 1.0, 0.0, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    with pytest.raises(ValueError, match="lr_scaling"):
        scaled_lr(0.1, 256, "cubic")
    assert math.isfinite(warmup_cosine(0, 1, 1.0))


def test_one_feature_extractor_serves_eval_and_embed():
    """`selfsup eval` and `selfsup embed` share the actor: each encoder's features of a batch,
    the random init reproducible (the floor), raw pixels on request, and embed's Parquet table."""
    import numpy as np
    import pyarrow as pa

    from pipelines.config import build_method
    from pipelines.evaluate.features import PIXELS, Encoder, FeatureExtractor
    from pipelines.outputs.embed import EMBEDDING, Embedder
    from tests.helpers.runs import tiny_config

    config = tiny_config()
    trained = build_method(tiny_config(**{"train.seed": 7}))  # other weights than the seed-0 init
    weights = {k: v.clone() for k, v in trained.state_dict().items()}
    canvases = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    batch = {"image": canvases, "label": np.arange(5), "key": np.arange(5) * 3, "id": np.array(list("abcde"), object),
             "content_hash": np.array(list("vwxyz"), object)}
    extractor = FeatureExtractor(config.to_dict(), (Encoder("top1", weights), Encoder("random_init_top1")), pixels=True)
    out = extractor(batch)
    assert sorted(out) == ["key", "label", PIXELS, "random_init_top1", "top1"]
    assert out["top1"].shape == out["random_init_top1"].shape == (5, trained.backbone.num_features)
    assert not np.allclose(out["top1"], out["random_init_top1"])  # each encoder its own weights
    again = FeatureExtractor(config.to_dict(), (Encoder("random_init_top1"),))(batch)
    assert np.array_equal(again["random_init_top1"], out["random_init_top1"])  # the floor is the same every time
    assert out[PIXELS].shape == (5, 16 * 16 * 3) and out[PIXELS].max() <= 1
    table = Embedder(config.to_dict(), weights, "fp32")(batch)
    assert table.column_names == ["id", EMBEDDING, "content_hash", "label"]
    assert table.column("id").to_pylist() == list("abcde") and table.column("content_hash").to_pylist() == list("vwxyz")
    assert pa.types.is_fixed_size_list(table.schema.field(EMBEDDING).type)
    assert np.allclose(np.stack(table.column(EMBEDDING).to_numpy(zero_copy_only=False)), out["top1"], atol=1e-5)

