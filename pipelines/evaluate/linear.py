"""The linear probe: a linear classifier trained on frozen features (MAE's protocol)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      test_labels: torch.Tensor, epochs: int = 100, batch_size: int = 256, lr: float = 0.01,
                      weight_decay: float = 1e-4, batch_norm: bool = True, seed: int = 0) -> float:
    """A linear classifier trained on frozen features, top-1 on the test features.

    With `batch_norm` the features first go through BatchNorm without affine parameters (MAE's
    linear-probe protocol; harmless for other methods, and it makes one learning rate fit all).
    AdamW with a cosine schedule; deterministic for a seed.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    dim = train_features.shape[1]
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False) if batch_norm else nn.Identity(),
                          nn.Linear(dim, classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_features) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    x, y = train_features.float(), train_labels
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue
            loss = F.cross_entropy(probe(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        return (probe(test_features.float()).argmax(1) == test_labels).float().mean().item()

