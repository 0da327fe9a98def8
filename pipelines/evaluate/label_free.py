"""Label-free representation quality: RankMe, LiDAR, alpha-ReQ, alignment and uniformity on a
fixed probe set.

Users with millions of unlabeled images have no labeled `--val` set for the online kNN, and a
loss cannot rank temperatures or mask ratios against each other. These metrics need no labels:

- RankMe (Garrido et al., "RankMe: Assessing the Downstream Performance of Pretrained
  Self-Supervised Representations by Their Rank", ICML 2023): the effective rank of the
  embedding matrix, exp(entropy of its normalised singular values). Within a method it tracks
  downstream accuracy; it falls when the representation collapses onto a few dimensions.
- LiDAR (Thilak et al., "LiDAR: Sensing Linear Probing Performance in Joint Embedding SSL
  Architectures", ICLR 2024): the effective rank of the linear discriminant that separates
  surrogate classes, each class a few augmented views of one image. It counts the directions
  that tell images apart beyond what augmentation moves, which plain rank does not.
- alpha-ReQ (Agrawal et al., "alpha-ReQ: Assessing Representation Quality in Self-Supervised
  Learning by measuring eigenspectrum decay", NeurIPS 2022): the exponent alpha of the power law
  the feature covariance's eigenvalues follow, lambda_i ~ i^-alpha. Good encoders sit in a band
  around 1; far above it the features use few directions, far below they are close to white.
- Alignment and uniformity (Wang & Isola, "Understanding Contrastive Representation Learning
  through Alignment and Uniformity on the Hypersphere", ICML 2020): how close two views of an
  image land, and how evenly the images spread over the unit sphere.

All are computed on the encoder's frozen features (what kNN, linear probes and users get),
in eval mode, on the same probe images at every report (`pipelines/images/probe.py`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from methods.base import HealthScale

log = logging.getLogger("selfsup")

# What `probe_metrics` reports, by name.
PROBE_METRICS = ("rankme", "rankme_fraction", "lidar", "alpha_req", "alpha_req_gap", "alignment", "uniformity")
# RankMe's epsilon: keeps log(p) finite for exactly zero singular values (the paper's 1e-7).
RANKME_EPS = 1e-7
# LiDAR's surrogate classes: this many views of each probe image by the method's own recipe.
LIDAR_VIEWS = 4
# LiDAR's ridge on the within-class covariance, relative to its mean eigenvalue so the metric
# does not depend on the features' scale (the paper adds a fixed 1e-4 to unnormalised features).
LIDAR_RIDGE = 1e-4
# alpha-ReQ fits the leading quarter of the spectrum: past it, small networks' spectra fall off a
# cliff that is no power law (dead units; docs/FINDINGS.md, "Label-free model selection").
ALPHA_FIT_FRACTION = 0.25
# The centre of alpha-ReQ's band of good encoders (the paper's); `alpha_req_gap` is the distance to it.
ALPHA_BAND_CENTRE = 1.0
# alpha-ReQ reads eigenvalues below this fraction of the largest as this fraction: round-off, and a
# finite (large) alpha for features that vary along one direction.
ALPHA_FLOOR = 1e-10
# Wang & Isola's defaults: alpha = 2 for alignment, t = 2 for uniformity.
ALIGNMENT_ALPHA = 2.0
UNIFORMITY_T = 2.0
# Dimensional collapse: a RankMe fraction below this share of what the method's healthy runs show
# (Method.health); it separates the one collapsed run from every healthy or merely weak one
# (docs/BENCHMARKS.md, "Health on one scale per method").
COLLAPSE_OF_HEALTHY = 0.15
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
def lidar(views: torch.Tensor, ridge: float = LIDAR_RIDGE, eps: float = RANKME_EPS) -> float:
    """LiDAR: `views: (n, q, d)`, q >= 2 views (rows) of each of n >= 2 images (surrogate
    classes) -> the effective rank (RankMe's entropy formula) of the eigenvalues of
    Sigma_w^-1/2 Sigma_b Sigma_w^-1/2, Sigma_b the covariance of the n class means and Sigma_w the
    pooled within-class covariance plus the ridge. Between 1 and min(n - 1, d); unchanged by an
    invertible linear map of the features, up to the ridge."""
    if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
        raise ValueError(f"lidar: expected (images >= 2, views >= 2, d) features, got shape {tuple(views.shape)}")
    n, q, d = views.shape
    x = views.double()
    means = x.mean(dim=1)
    centred_means = means - means.mean(dim=0)
    between = centred_means.T @ centred_means / (n - 1)
    deviations = (x - means[:, None]).reshape(n * q, d)
    within = deviations.T @ deviations / (n * (q - 1))
    scale = float(within.trace()) / d
    within = within + ridge * (scale if scale > 0 else 1.0) * torch.eye(d, dtype=within.dtype)
    values, vectors = torch.linalg.eigh(within)
    whitening = vectors @ torch.diag(values.clamp_min(torch.finfo(torch.float64).tiny).rsqrt()) @ vectors.T
    discriminant = torch.linalg.eigvalsh(whitening @ between @ whitening).clamp_min(0)
    p = discriminant / discriminant.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alpha_req(features: torch.Tensor, fit_fraction: float = ALPHA_FIT_FRACTION, floor: float = ALPHA_FLOOR) -> float:
    """alpha-ReQ: `features: (N, d)` -> alpha of the least-squares line log lambda_i = c - alpha
    log i through the eigenvalues of the features' covariance, largest first: the leading
    `fit_fraction` of the min(N - 1, d) there are (at least 2), each at least `floor` times the
    largest. 0 for a flat spectrum; large when a few directions hold the variance."""
    if features.ndim != 2 or len(features) < 3 or features.shape[1] < 2:
        raise ValueError(f"alpha_req: needs an (N >= 3, d >= 2) matrix, got shape {tuple(features.shape)}")
    centred = features.double() - features.double().mean(dim=0)
    fitted = max(2, math.ceil(fit_fraction * min(len(features) - 1, features.shape[1])))
    eigenvalues = torch.linalg.svdvals(centred).pow(2)[:fitted]
    kept = eigenvalues.clamp_min(floor * float(eigenvalues[0]) + torch.finfo(torch.float64).tiny)
    log_rank = torch.arange(1, len(kept) + 1, dtype=torch.float64).log()
    log_value = kept.log()
    centred_rank = log_rank - log_rank.mean()
    return float(-(centred_rank * (log_value - log_value.mean())).sum() / centred_rank.pow(2).sum())


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
    uint8}`: `rankme`, `rankme_fraction` (of min(images, width)), `alpha_req` and its distance to
    the band's centre `alpha_req_gap` of the plain images' features, `lidar` over `LIDAR_VIEWS`
    views of each image, `alignment` and `uniformity` (the mean over the first two views, as Wang
    & Isola's loss). The views are the
    method's own (`Method.view_pair`), drawn from a fixed seed; the training RNG is restored
    afterwards."""
    plain, views = [], []
    was_training = method.training
    method.eval()
    forked = [device] if torch.device(device).type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=forked):
        torch.manual_seed(PROBE_VIEW_SEED)
        for batch in batches:
            canvases = batch["image"].to(device)
            plain.append(method.features(method.eval_images(canvases)).float().cpu())
            pairs = [method.view_pair(canvases) for _ in range(LIDAR_VIEWS // 2)]
            views.append(torch.stack([method.features(v).float().cpu() for pair in pairs for v in pair], dim=1))
    method.train(was_training)
    if not plain:
        raise ValueError("probe: the probe set yielded no decodable images")
    features, views = torch.cat(plain), torch.cat(views)
    a, b = views[:, 0], views[:, 1]
    rank, alpha = rankme(features), alpha_req(features)
    return {
        "rankme": rank,
        "rankme_fraction": rank / min(features.shape),
        "lidar": lidar(views),
        "alpha_req": alpha,
        "alpha_req_gap": abs(alpha - ALPHA_BAND_CENTRE),
        "alignment": alignment(a, b),
        "uniformity": (uniformity(a) + uniformity(b)) / 2,
        "probe_images": float(len(features)),
    }


def health_ratios(metrics: dict, healthy: HealthScale | None) -> dict[str, float]:
    """The report's health indicators on the method's scale: `spread_vs_healthy` (its
    `embedding_std`) and `rank_vs_healthy` (its `rankme_fraction`) over what the method's healthy
    runs show; about 1 healthy, towards 0 collapsed. Each only where the report has its metric;
    none for a model without a scale (fine-tuning's classifier)."""
    ratios = {}
    if healthy is None:
        return ratios
    if "embedding_std" in metrics:
        ratios["spread_vs_healthy"] = metrics["embedding_std"] / healthy.embedding_std
    if "rankme_fraction" in metrics:
        ratios["rank_vs_healthy"] = metrics["rankme_fraction"] / healthy.rankme_fraction
    return ratios


def check_rank(metrics: dict, warned: set) -> dict[str, float]:
    """The dimensional-collapse flag from a report carrying `rank_vs_healthy`: `{"collapsed": 1}`
    (which stops Tune trials) and a warning, once per run, below COLLAPSE_OF_HEALTHY;
    `{"collapsed": 0}` above it unless the method already flagged the report."""
    value = metrics.get("rank_vs_healthy")
    if value is None:
        return {}
    if value >= COLLAPSE_OF_HEALTHY:  # a method's own flag (DINO's) stands; otherwise the report says 0
        return {} if "collapsed" in metrics else {"collapsed": 0.0}
    if "rank" not in warned:
        warned.add("rank")
        log.warning(f"dimensional collapse: the features' effective rank (RankMe) is {metrics['rankme']:.1f}, "
                    f"{value:.2f} of what this method's healthy runs show (threshold {COLLAPSE_OF_HEALTHY}): the "
                    "encoder uses a few directions only. Lower the learning rate, check the temperature, or keep the "
                    "projection head")
    return {"collapsed": 1.0}
