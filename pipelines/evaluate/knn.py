"""Weighted kNN on frozen features (DINO's `eval_knn`), and the bank/query split of a labeled set
that the online evaluation scores it on."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on L2-normalised features, as DINO's `eval_knn` (Wu et al. 2018): the k most
    cosine-similar training samples vote for their class with weight exp(sim / T).

    `train_features: (n, d)`, `train_labels: (n,)`, `test_features: (m, d)` -> top-1 accuracy.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T
        top_sim, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_index], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return correct / len(test)


def split_bank_queries(keys: torch.Tensor, every: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic bank/query split of a labeled set by record key: key % every == 0 -> query."""
    query = keys % every == 0
    return ~query, query

