"""Label-free metrics (RankMe, alignment, uniformity), the probe set, and the rank-collapse flag."""

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from methods import METHODS
from pipelines.evaluate.label_free import (
    alignment,
    alpha_req,
    check_rank,
    health_ratios,
    lidar,
    probe_metrics,
    rankme,
    uniformity,
)
from pipelines.images.probe import probe_table
from tests.helpers.runs import tiny_config


def test_rankme_of_known_spectra():
    assert rankme(torch.eye(64)) == pytest.approx(64, rel=1e-4)  # a flat spectrum: full rank
    rank_one = torch.randn(500, 1) @ torch.randn(1, 32)
    assert rankme(rank_one) == pytest.approx(1, abs=1e-3)
    # Two equal singular values and nothing else: exp(ln 2) = 2, whatever the rotation.
    two = torch.zeros(100, 16)
    two[:50, 3], two[50:, 7] = 1.0, 1.0
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert rankme(two @ rotation) == pytest.approx(2, rel=1e-4)
    # A known non-flat spectrum: singular values 3, 1 -> p = (0.75, 0.25).
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert rankme(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        rankme(torch.zeros(0, 3))


def _with_covariance(rows: int, spectrum: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`rows` centred feature rows whose covariance has exactly `spectrum` as eigenvalues, in a
    random orthonormal basis."""
    width = len(spectrum)
    noise = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(noise - noise.mean(dim=0))  # orthonormal, centred columns
    rotation, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return basis * (spectrum * (rows - 1)).sqrt() @ rotation


def _surrogate_classes(images: int, views: int, between: torch.Tensor, generator) -> torch.Tensor:
    """(images, views, d) features whose class means have covariance diag(`between`) exactly and
    whose pooled within-class covariance is exactly the identity."""
    width = len(between)
    means = _with_covariance(images, between, generator)
    deviations = torch.randn(images, views, width, generator=generator, dtype=torch.float64)
    deviations = (deviations - deviations.mean(dim=1, keepdim=True)).reshape(-1, width)
    covariance = deviations.T @ deviations / (images * (views - 1))
    values, vectors = torch.linalg.eigh(covariance)
    deviations = deviations @ vectors @ torch.diag(values.rsqrt()) @ vectors.T  # whitened: keeps each class's sum 0
    return means[:, None] + deviations.reshape(images, views, width)


def test_lidar_of_a_known_discriminant_rank():
    generator = torch.Generator().manual_seed(0)
    # Three equally discriminative directions out of 16, the rest moved by augmentation only.
    three = _surrogate_classes(200, 4, torch.tensor([5.0] * 3 + [0.0] * 13), generator)
    assert lidar(three) == pytest.approx(3, rel=1e-3)
    # A known non-flat discriminant: eigenvalues 3, 1 -> p = (0.75, 0.25), as RankMe's formula.
    two = _surrogate_classes(200, 4, torch.tensor([3.0, 1.0] + [0.0] * 6), generator)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert lidar(two) == pytest.approx(expected, rel=1e-3)
    # LDA is blind to invertible linear maps of the features (up to the ridge); their rank is not.
    stretch = torch.diag(torch.logspace(0, 1, 16, dtype=torch.float64)) @ torch.randn(16, 16, generator=generator,
                                                                                    dtype=torch.float64)
    assert lidar(three @ stretch) == pytest.approx(lidar(three), rel=1e-2)
    assert abs(rankme(three.reshape(-1, 16) @ stretch) - rankme(three.reshape(-1, 16))) > 1
    with pytest.raises(ValueError, match="views >= 2"):
        lidar(three[:, :1])


def test_alpha_req_recovers_a_known_power_law():
    generator = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 33, dtype=torch.float64)
    for alpha in (0.5, 1.0, 2.0):
        features = _with_covariance(500, ranks.pow(-alpha), generator)
        assert alpha_req(features) == pytest.approx(alpha, abs=1e-6)
        assert alpha_req(features * 7.0) == pytest.approx(alpha, abs=1e-6)  # scale-free
    flat = _with_covariance(500, torch.ones(32, dtype=torch.float64), generator)
    assert alpha_req(flat) == pytest.approx(0, abs=1e-6)
    # Features along one direction: a steep, finite decay rather than an error mid-run.
    one_direction = torch.randn(100, 1, generator=generator) @ torch.randn(1, 32, generator=generator)
    assert alpha_req(one_direction) > 2
    with pytest.raises(ValueError, match="N >= 3"):
        alpha_req(torch.randn(2, 8))


def test_alignment_and_uniformity_match_their_formulas():
    torch.manual_seed(0)
    a, b = torch.randn(40, 8), torch.randn(40, 8)
    na, nb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    looped = sum(float((na[i] - nb[i]).norm() ** 2) for i in range(40)) / 40
    assert alignment(a, b) == pytest.approx(looped, rel=1e-6)
    pairs = [float(torch.exp(-2 * (na[i] - na[j]).norm() ** 2)) for i in range(40) for j in range(i + 1, 40)]
    assert uniformity(a) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)
    assert alignment(a, a) == pytest.approx(0, abs=1e-12)
    assert uniformity(torch.ones(10, 4)) == pytest.approx(0, abs=1e-6)  # every image on one point
    with pytest.raises(ValueError, match="differ in shape"):
        alignment(a, b[:5])


def _shard(path, rows, with_id=True, start=0):
    import io

    from PIL import Image

    images = []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), ((start + i) % 256, 40, 90)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    columns = {"image": pa.array(images, pa.binary())}
    if with_id:
        columns["id"] = pa.array([f"r{start + i}" for i in range(rows)])
    pq.write_table(pa.table(columns), path)


def test_probe_set_is_the_same_records_every_time_spread_over_the_files(tmp_path):
    for index in range(4):
        _shard(tmp_path / f"part-{index}.parquet", 30, start=index * 100)
    first, again = probe_table(str(tmp_path), 20), probe_table(str(tmp_path), 20)
    assert first.column("id").to_pylist() == again.column("id").to_pylist()
    ids = first.column("id").to_pylist()
    assert len(ids) == 20 and len(set(ids)) == 20
    assert {int(i[1:]) // 100 for i in ids} == {0, 1, 2, 3}  # every file contributes
    assert probe_table(str(tmp_path), 1000).num_rows == 120  # at most the whole set


def test_probe_set_names_records_of_shards_without_ids(tmp_path):
    _shard(tmp_path / "only.parquet", 5, with_id=False)
    ids = probe_table(str(tmp_path), 3).column("id").to_pylist()
    assert ids == [f"{tmp_path}/only.parquet#{row}" for row in range(3)]


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_probe_metrics_use_the_methods_views_and_leave_the_training_rng_alone(method_name):
    from pipelines.config import build_method

    config = tiny_config(method_name)
    method = build_method(config)
    torch.manual_seed(0)
    canvases = torch.randint(0, 256, (24, 16, 16, 3), dtype=torch.uint8)
    batches = [{"image": canvases[:12]}, {"image": canvases[12:]}]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    metrics = probe_metrics(method, batches, "cpu")
    assert torch.equal(torch.rand(3), expected_next)  # the training RNG continues as if untouched
    assert metrics == probe_metrics(method, batches, "cpu")  # the same views every report
    width = method.features(method.eval_images(canvases[:2])).shape[1]
    assert 1 <= metrics["rankme"] <= min(24, width) and metrics["rankme_fraction"] == metrics["rankme"] / min(24, width)
    assert 0 < metrics["alignment"] < 4 and metrics["uniformity"] < 0 and metrics["probe_images"] == 24
    assert 1 <= metrics["lidar"] <= min(23, width) and metrics["alpha_req"] > 0
    assert metrics["alpha_req_gap"] == abs(metrics["alpha_req"] - 1.0)  # the band's centre, the paper's
    assert method.training  # put back in training mode


def test_a_probe_too_small_to_fit_a_spectrum_is_refused_before_ray():
    with pytest.raises(ValueError, match="train.probe_size=2: must be 0 \\(off\\) or an integer >= 3"):
        tiny_config("simclr", **{"train.probe_size": 2})
    assert tiny_config("simclr", **{"train.probe_size": 0}).train.probe_size == 0


def test_rank_collapse_flag_and_one_warning(caplog):
    warned = set()
    assert check_rank({"rankme": 30.0, "rank_vs_healthy": 0.9}, warned) == {"collapsed": 0.0}
    assert check_rank({"rankme": 30.0, "rank_vs_healthy": 0.9, "collapsed": 1.0}, warned) == {}  # DINO's flag stands
    assert check_rank({"loss": 1.0}, warned) == {}  # a report without the probe
    with caplog.at_level("WARNING", logger="selfsup"):
        assert check_rank({"rankme": 1.1, "rank_vs_healthy": 0.01}, warned) == {"collapsed": 1.0}
        assert check_rank({"rankme": 1.1, "rank_vs_healthy": 0.01}, warned) == {"collapsed": 1.0}
    warnings = [r.getMessage() for r in caplog.records if "dimensional collapse" in r.getMessage()]
    assert len(warnings) == 1 and "RankMe" in warnings[0]


def test_each_method_reads_its_measured_runs_on_its_own_scale():
    """docs/BENCHMARKS.md's runs, read on each method's HealthScale: SimCLR's collapsed run (base LR
    10) is flagged and its weakest healthy one (temperature 0.02) is not; the MAE trials that the
    old one-for-all threshold (0.02 of the width) flagged, the kNN-best among them, are not; and
    on SimCLR's scale the same MAE features would read as collapsed."""
    def flagged(method: str, rankme_fraction: float, embedding_std: float = 0.2) -> bool:
        ratios = health_ratios({"rankme_fraction": rankme_fraction, "embedding_std": embedding_std},
                               METHODS[method].health)
        return check_rank({"rankme": 2.0, **ratios}, set())["collapsed"] == 1.0

    assert flagged("simclr", 0.015) and not flagged("simclr", 0.032)
    assert not any(flagged("mae", fraction) for fraction in (0.0159, 0.0161, 0.0176, 0.0187, 0.0188))
    assert flagged("simclr", 0.0161)
    # the spread on the method's scale: SimCLR's ResNet features at the demo's end read near 1
    demo_end = health_ratios({"embedding_std": 0.12}, METHODS["simclr"].health)["spread_vs_healthy"]
    assert 0.5 < demo_end < 1.5 and health_ratios({}, METHODS["simclr"].health) == {}
    assert health_ratios({"embedding_std": 0.3, "rankme_fraction": 0.2}, None) == {}  # fine-tuning's classifier
