"""Terms a method can add to its loss to shape its features (DINO adds KoLeo at
`hparams.koleo_weight` > 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The KoLeo regulariser (Sablayrolles, Douze, Schmid, Jegou, "Spreading vectors for similarity
    search", ICLR 2019), as DINOv2 adds it to DINO's loss (Oquab et al. 2023, section 4): the mean
    of -log(distance to the nearest other row) of the L2-normalised `features: (n, d)`. It falls as
    the rows spread over the sphere; with fewer than 2 rows it is 0 (no neighbour)."""
    if len(features) < 2:
        return features.sum() * 0.0
    x = F.normalize(features.float(), dim=1, eps=eps)
    with torch.no_grad():  # the neighbour is chosen, not differentiated
        similarity = x @ x.T
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    return -(F.pairwise_distance(x, x[nearest], eps=eps) + eps).log().mean()
