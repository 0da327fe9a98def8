"""Label-free representation quality: RankMe, alignment and uniformity on a fixed probe set.

Users with millions of unlabeled images have no labeled `--val` set for the online kNN, and a
loss cannot rank temperatures or mask ratios against each other. These metrics need no labels:

- RankMe (Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained
  Self-Supervised Representations by Their Rank", ICML 2023): the effective rank of the
  embedding matrix, exp(entropy of its normalised singular values). Within a method it tracks
  downstream accuracy; it falls when the representation collapses onto a few dimensions.
- Alignment and uniformity (Wang & Isola, "Understanding Contrastive Representation Learning
  through Alignment and Uniformity on the Hypersphere", ICML 2020): how close two views of an
  image land, and how evenly the images spread over the unit sphere.

All three are computed on the encoder's frozen features (what kNN, linear probes and users get),
in eval mode, on the same probe images at every report (`pipelines/images/probe.py`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("selfsup")

# RankMe's epsilon: keeps log(p) finite for exactly zero singular values (the paper's 1e-7).
RANKME_EPS = 1e-7
# Wang & Isola's defaults: alpha = 2 for alignment, t = 2 for uniformity.
ALIGNMENT_ALPHA = 2.0
UNIFORMITY_T = 2.0
# Dimensional collapse: an effective rank below this fraction of what the probe can show
# (min(probe images, feature width)); it separates the one collapsed run from every healthy or
# merely weak one in docs/BENCHMARKS.md, "Label-free metrics".
RANK_COLLAPSE_FRACTION = 0.02
# A seed of its own, so the probe's views are the same at every report and drawing them leaves
# the training RNG (and so a resumed run's views) untouched.
PROBE_VIEW_SEED = 20230


def embedding_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """Collapse indicator as a 0-d tensor (no host sync): std over the batch of L2-normalised
    embeddings, averaged over dimensions, times sqrt(d). About 1 for spread-out embeddings; -> 0
    when they collapse."""
    normalised = F.normalize(embeddings.detach().float(), dim=1)
    return normalised.std(dim=0).mean() * math.sqrt(normalised.shape[1])


def embedding_std(embeddings: torch.Tensor) -> float:
    """`embedding_spread` as a number."""
    return embedding_spread(embeddings).item()


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe: `features: (N, d)` -> exp(-sum_k p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps,
    sigma the singular values of the (uncentred) feature matrix, as in the paper. Between 1
    (all features on one line) and min(N, d) (a flat spectrum)."""
    if features.ndim != 2 or min(features.shape) < 1:
        raise ValueError(f"features: expected a non-empty (N, d) matrix, got shape {tuple(features.shape)}")
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alignment(a: torch.Tensor, b: torch.Tensor, alpha: float = ALIGNMENT_ALPHA) -> float:
    """E ||f(x) - f(y)||^alpha over positive pairs, features L2-normalised. `a, b: (N, d)`, row i
    of each a view of image i. 0 when the views land on the same point; at most 2^alpha."""
    if a.shape != b.shape:
        raise ValueError(f"alignment: the two views' features differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return float((a - b).norm(dim=1).pow(alpha).mean())


@torch.no_grad()
def uniformity(features: torch.Tensor, t: float = UNIFORMITY_T) -> float:
    """log E exp(-t ||f(x) - f(y)||^2) over all pairs of distinct images, features
    L2-normalised. `features: (N, d)`, N >= 2. 0 when every image lands on one point; lower is
    more uniform (about -3.9 for t = 2 at a uniform spread in high dimensions)."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"uniformity: needs at least 2 feature rows, got shape {tuple(features.shape)}")
    z = F.normalize(features.double(), dim=1)
    squared = torch.pdist(z).pow(2)
    return float(torch.logsumexp(-t * squared, dim=0) - torch.log(torch.tensor(float(len(squared)))))


def probe_metrics(method, batches, device) -> dict[str, float]:
    """Label-free metrics of `method`'s encoder over the probe batches `{"image": (n, S, S, 3)
    uint8}`: `rankme`, `rankme_fraction` (of min(images, width)), `alignment` and `uniformity`
    (the mean over the two views, as Wang & Isola's loss). The views are the method's own
    (`Method.view_pair`), drawn from a fixed seed; the training RNG is restored afterwards."""
    plain, first, second = [], [], []
    was_training = method.training
    method.eval()
    forked = [device] if torch.device(device).type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=forked):
        torch.manual_seed(PROBE_VIEW_SEED)
        for batch in batches:
            canvases = batch["image"].to(device)
            plain.append(method.features(method.eval_images(canvases)).float().cpu())
            a, b = method.view_pair(canvases)
            first.append(method.features(a).float().cpu())
            second.append(method.features(b).float().cpu())
    method.train(was_training)
    if not plain:
        raise ValueError("probe: the probe set yielded no decodable images")
    features, a, b = torch.cat(plain), torch.cat(first), torch.cat(second)
    rank = rankme(features)
    return {
        "rankme": rank,
        "rankme_fraction": rank / min(features.shape),
        "alignment": alignment(a, b),
        "uniformity": (uniformity(a) + uniformity(b)) / 2,
        "probe_images": float(len(features)),
    }


def check_rank(metrics: dict, warned: set, fraction: float = RANK_COLLAPSE_FRACTION) -> dict[str, float]:
    """The dimensional-collapse flag from a report carrying `rankme_fraction`: `{"collapsed": 1}`
    (which stops Tune trials) and a warning, once per run, when the rank is below `fraction`;
    `{"collapsed": 0}` above it unless the method already flagged the report."""
    value = metrics.get("rankme_fraction")
    if value is None:
        return {}
    if value >= fraction:  # a method's own flag (DINO's) stands; otherwise the report says 0
        return {} if "collapsed" in metrics else {"collapsed": 0.0}
    if "rank" not in warned:
        warned.add("rank")
        log.warning(f"dimensional collapse: the features' effective rank (RankMe) is {metrics['rankme']:.1f}, "
                    f"{value:.3f} of what the probe can show (threshold {fraction}): the encoder uses a few "
                    "directions only. Lower the learning rate, check the temperature, or keep the projection head")
    return {"collapsed": 1.0}
