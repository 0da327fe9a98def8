import math

import pytest
import torch

from methods.schedules import scaled_lr, warmup_cosine
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
