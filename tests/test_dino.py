"""DINO's pieces: centering across workers, the EMA teacher, the loss pairs, the last-layer freeze,
the schedules. The collapse ablation and the attention picture run the pipeline in
test_dino_pipeline.py."""

import math

import pytest
import torch

from methods.backbone import BackboneConfig
from methods.dino import DINO, DINOHyperparameters, DINOLoss, dino_recipe
from methods.regularizers import koleo_loss
from pipelines.config import OptimConfig
from pipelines.console import to_stderr
from tests.helpers.twoworkers import run_two_workers, same, single_worker

IMAGES = 8  # global batch
VIT = BackboneConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4,
                     kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2, "dynamic_img_size": True})


def make_dino(backbone=VIT, **hparams):
    torch.manual_seed(0)
    values = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, **hparams}
    return DINO(backbone, DINOHyperparameters(**values), dino_recipe(16, 8, 2))


def fixed_views(generator_seed=1):
    generator = torch.Generator().manual_seed(generator_seed)
    return [torch.randn(IMAGES, 3, s, s, generator=generator) for s in (16, 16, 8, 8)]


def dino_loss_and_center(rank, world):
    """Each worker's share of the same global batch; checks its center against the mean of every
    worker's teacher outputs, computed here from the whole batch."""
    method = make_dino()
    views = fixed_views()
    with torch.no_grad():
        whole = method.teacher_head(method.teacher_backbone(torch.cat(views[:2])))
    per = IMAGES // world
    loss, _ = method([v[rank * per : (rank + 1) * per] for v in views])
    method.criterion.update_center()  # once per optimizer step (after_step)
    expected = 0.1 * whole.mean(dim=0, keepdim=True)  # center starts at 0, momentum 0.9
    assert torch.allclose(method.criterion.center, expected, atol=1e-5), "center is not the all-reduced mean"
    return loss, method


@pytest.mark.slow  # spawns its own processes (a worker group or a simulated cluster)
def test_center_is_the_all_reduced_mean_and_two_workers_equal_one(tmp_path):
    two = run_two_workers(dino_loss_and_center, tmp_path, "dino")  # asserts the center in each worker
    one = single_worker(dino_loss_and_center)
    assert same(two, one) == []


def test_accumulated_passes_move_the_center_once_by_the_whole_batch_mean():
    """Gradient accumulation keeps DINO's center statistics: two half-batch passes then one
    step's update give the center of one pass over the whole batch."""
    whole, halves = make_dino(), make_dino()
    views = fixed_views()
    whole(views)
    whole.criterion.update_center()
    half = IMAGES // 2
    for part in (slice(0, half), slice(half, IMAGES)):
        halves([v[part] for v in views])
    assert torch.equal(halves.criterion.center, torch.zeros_like(halves.criterion.center))  # not yet
    halves.criterion.update_center()
    assert torch.allclose(halves.criterion.center, whole.criterion.center, atol=1e-6)


def test_same_view_pairs_are_excluded_from_the_loss():
    generator = torch.Generator().manual_seed(3)
    n, k = 4, 10
    student = torch.randn(4 * n, k, generator=generator, requires_grad=True)  # 2 global + 2 local views
    teacher = torch.randn(2 * n, k, generator=generator)
    criterion = DINOLoss(k, student_temp=0.1)
    loss, _ = criterion(student, teacher, teacher_temp=0.04)
    # direct formula: mean over the 2 * 4 - 2 pairs (i, j != i)
    q = torch.softmax(teacher / 0.04, dim=-1).split(n)
    log_p = torch.log_softmax(student / 0.1, dim=-1).split(n)
    pairs = [-(q[i] * log_p[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]
    assert len(pairs) == 6 and torch.allclose(loss, torch.stack(pairs).mean(), atol=1e-6)
    # student view 0 learns only from teacher view 1: changing teacher view 0 leaves its gradient alone
    gradient = torch.autograd.grad(loss, student)[0]
    changed = teacher.clone()
    changed[:n] += torch.randn(n, k, generator=generator) * 5
    other = torch.autograd.grad(DINOLoss(k)(student, changed, 0.04)[0], student)[0]
    assert torch.allclose(gradient[:n], other[:n], atol=1e-7)
    assert not torch.allclose(gradient[n : 2 * n], other[n : 2 * n])


def test_ema_update_follows_the_cosine_momentum_schedule():
    method = make_dino()
    with torch.no_grad():
        for parameter in [*method.backbone.parameters(), *method.head.parameters()]:
            parameter.add_(torch.randn_like(parameter))
    student = [p.clone() for p in [*method.backbone.parameters(), *method.head.parameters()]]
    teacher = [p.clone() for p in [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]]
    method.after_step(step=25, total_steps=100)
    momentum = 1 - (1 - 0.996) * (1 + math.cos(math.pi * 25 / 100)) / 2
    assert method.momentum_at(25, 100) == pytest.approx(momentum)
    assert method.momentum_at(0, 100) == pytest.approx(0.996) and method.momentum_at(100, 100) == pytest.approx(1.0)
    updated = [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]
    for new, old, s in zip(updated, teacher, student):
        assert torch.allclose(new, momentum * old + (1 - momentum) * s, atol=1e-6)


def test_teacher_gets_no_gradient_and_is_not_in_the_optimizer():
    method = make_dino()
    optimizer = method.make_optimizer(method.param_groups(0.04), 1e-3, OptimConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    teacher = [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]
    assert not any(id(p) in in_optimizer for p in teacher)
    assert {id(p) for p in method.backbone.parameters()} <= in_optimizer
    before = [p.clone() for p in teacher]
    loss, _ = method(fixed_views())
    loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher))  # only after_step moves it


def test_koleo_reads_the_nearest_neighbour_and_its_gradient_spreads_a_cluster():
    assert koleo_loss(3 * torch.eye(4)).item() == pytest.approx(-math.log(math.sqrt(2)))  # scale-free
    twin = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert koleo_loss(twin).item() > 5  # a point on top of another costs ~ -log(eps) / n
    alone = torch.randn(1, 8, requires_grad=True)
    assert koleo_loss(alone).item() == 0.0 and koleo_loss(alone).requires_grad
    cluster = (torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
    cluster.requires_grad_()
    optimizer = torch.optim.SGD([cluster], lr=0.01)

    def nearest_distance():
        x = torch.nn.functional.normalize(cluster.detach(), dim=1)
        return (torch.cdist(x, x) + 9 * torch.eye(16)).min(dim=1).values.mean().item()

    before = nearest_distance()
    for _ in range(20):
        optimizer.zero_grad()
        koleo_loss(cluster).backward()
        optimizer.step()
    assert nearest_distance() > 3 * before


def test_koleo_is_added_on_the_students_global_view_features_only_when_weighted():
    views = fixed_views()
    plain_loss, plain_stats = make_dino()(views)
    method = make_dino(koleo_weight=0.5)
    loss, stats = method(views)
    features = method.backbone(torch.cat(views[:2])).split(IMAGES)
    expected = koleo_loss(features[0]) + koleo_loss(features[1])
    assert "koleo" not in plain_stats and stats["koleo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * expected.item(), rel=1e-5)


def run_steps(method, optimizer, epoch, steps=2):
    for step in range(steps):
        method.before_step(step, 10, epoch, optimizer)
        loss, _ = method(fixed_views(step))
        optimizer.zero_grad()
        loss.backward()
        method.on_gradients(step, epoch)
        optimizer.step()
        method.after_step(step, 10)


def test_last_layer_is_frozen_during_the_first_epoch_only():
    method = make_dino(norm_last_layer=False)  # magnitude trainable too
    optimizer = method.make_optimizer(method.param_groups(0.04), 1e-2, OptimConfig())
    last = lambda: [p.detach().clone() for p in method.head.last_layer.parameters()]  # noqa: E731
    mlp = method.head.mlp[0].weight.detach().clone()
    frozen = last()
    run_steps(method, optimizer, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, last()))
    assert not torch.equal(mlp, method.head.mlp[0].weight)  # the rest did train
    run_steps(method, optimizer, epoch=1)
    assert not all(torch.equal(a, b) for a, b in zip(frozen, last()))


def test_teacher_temperature_and_weight_decay_schedules():
    method = make_dino(teacher_temp_warmup_epochs=4)
    assert [round(method.teacher_temp_at(e), 4) for e in range(6)] == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    optimizer = method.make_optimizer(method.param_groups(0.04), 1e-3, OptimConfig())
    decay = {g["group"]: g for g in optimizer.param_groups}
    assert method.before_step(0, 100, 0, optimizer)["weight_decay"] == pytest.approx(0.04)
    method.before_step(100, 100, 9, optimizer)
    assert decay["decay"]["weight_decay"] == pytest.approx(0.4) and decay["no_decay"]["weight_decay"] == 0
    assert method.teacher_temp == pytest.approx(0.07)


def test_resnet_backbone_and_attention_maps():
    resnet = BackboneConfig(name="resnet18", small_images=True, kwargs={"channels": [8, 8, 16, 16], "stem_width": 8})
    loss, stats = make_dino(resnet)(fixed_views())
    assert torch.isfinite(loss) and stats["embeddings"].shape == (2 * IMAGES, 16)
    maps = make_dino().last_attention(torch.randn(2, 3, 16, 16))
    assert maps.shape == (2, 2, 4, 4)  # (images, heads, 16/4, 16/4)
    assert torch.all(maps >= 0) and torch.all(maps.sum(dim=(-2, -1)) <= 1 + 1e-5)


@pytest.fixture
def console():
    """selfsup's logger on stderr, as the CLI and the training workers set it up."""
    to_stderr()


def test_collapse_flag_trips_on_either_signature_only(console, capsys):
    method = make_dino()
    ln_k = math.log(64)
    healthy = {"teacher_batch_entropy": 0.9 * ln_k, "teacher_entropy": 0.5 * ln_k, "teacher_student_kl": 0.5,
               "embedding_std": 0.5}
    assert method.diagnose(healthy) == {"collapsed": 0.0, "drifting": 0.0}
    assert capsys.readouterr().err == ""
    assert method.diagnose({**healthy, "teacher_batch_entropy": 0.01})["collapsed"] == 1.0
    assert "[selfsup] WARNING: DINO collapse: one dimension dominates" in capsys.readouterr().err
    uniform = {**healthy, "teacher_batch_entropy": ln_k, "teacher_entropy": 0.999 * ln_k, "teacher_student_kl": 1e-4}
    assert method.diagnose(uniform)["collapsed"] == 1.0
    assert "loss sits at ln K" in capsys.readouterr().err


def test_bad_hyperparameters_are_refused_with_the_key():
    with pytest.raises(ValueError, match="hparams.teacher_momentum"):
        DINOHyperparameters(teacher_momentum=1.0).validate()
    with pytest.raises(ValueError, match="views: DINO needs two or more global views"):
        DINO(VIT, DINOHyperparameters(out_dim=8, hidden_dim=8, bottleneck_dim=8),
             dino_recipe(16, 8, 2).with_overrides({"global2.copies": 0}))


def drift_reports(method, entropies, batch_entropies, spreads) -> list[float]:
    ln_k = math.log(method.hparams.out_dim)
    return [method.diagnose({"teacher_entropy": e * ln_k, "teacher_batch_entropy": b * ln_k, "teacher_student_kl": 0.5,
                             "embedding_std": s})["drifting"] for e, b, s in zip(entropies, batch_entropies, spreads)]


def test_drift_towards_uniform_is_warned_once_with_the_knob(console, capsys):
    method = make_dino()
    # Entropy rising at every report by 0.06 of ln K in all, spread falling: drifting from the 4th report.
    flags = drift_reports(method, [0.50, 0.52, 0.54, 0.56, 0.58], [0.9] * 5, [0.6, 0.55, 0.5, 0.45, 0.4])
    assert flags == [0.0, 0.0, 0.0, 1.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("DINO drifting towards a uniform teacher output") == 1  # once per drift, not per report
    assert "teacher entropy 0.5 -> 0.56 of ln K" in err and "lower hparams.teacher_temp" in err


def test_drift_towards_one_dimension_names_centering(console, capsys):
    method = make_dino()
    flags = drift_reports(method, [0.5] * 4, [0.80, 0.77, 0.74, 0.71], [0.6, 0.55, 0.5, 0.45])
    assert flags[-1] == 1.0
    assert "towards one dominant dimension" in capsys.readouterr().err


def test_no_drift_when_the_trend_breaks_or_the_spread_holds(console, capsys):
    # A dip in the entropy rise, a rise too small, or a spread that does not fall: healthy noise.
    assert drift_reports(make_dino(), [0.50, 0.53, 0.52, 0.58], [0.9] * 4, [0.6, 0.5, 0.4, 0.3])[-1] == 0.0
    assert drift_reports(make_dino(), [0.50, 0.51, 0.52, 0.53], [0.9] * 4, [0.6, 0.5, 0.4, 0.3])[-1] == 0.0
    assert drift_reports(make_dino(), [0.50, 0.53, 0.56, 0.59], [0.9] * 4, [0.5, 0.55, 0.5, 0.5])[-1] == 0.0
    assert drift_reports(make_dino(), [0.043, 0.0432, 0.0434, 0.0436], [0.3] * 4, [0.526, 0.516, 0.505, 0.495])[-1] == 0.0
    # A healthy start: batch entropy falling from near uniform as the teacher learns, spread steady.
    assert drift_reports(make_dino(), [0.5] * 4, [0.70, 0.62, 0.55, 0.47], [0.722, 0.72, 0.718, 0.719])[-1] == 0.0
    assert capsys.readouterr().err == ""


def test_a_sharp_teacher_drifting_from_a_small_entropy_is_caught(console, capsys):
    # Measured: the tiny preset on MNIST-M over epochs 8-11 (its loss climbing back meanwhile).
    assert drift_reports(make_dino(), [0.043, 0.044, 0.046, 0.049], [0.3] * 4, [0.526, 0.516, 0.505, 0.495])[-1] == 1.0
    assert "teacher entropy 0.043 -> 0.049 of ln K" in capsys.readouterr().err
