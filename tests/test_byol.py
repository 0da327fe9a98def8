"""BYOL: the loss against its formula, the EMA target and the asymmetric views. That it learns
through the whole pipeline, by a measured margin: tests/test_learns.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from methods.backbone import BackboneConfig
from methods.byol import BYOL, BYOLHyperparameters, BYOLLoss, byol_recipe
from tests.helpers.runs import tiny_config


def tiny_byol(**values) -> BYOL:
    torch.manual_seed(0)
    backbone = BackboneConfig(name="resnet18", small_images=True,
                              kwargs={"channels": [8, 16, 32, 64], "stem_width": 8})
    hparams = BYOLHyperparameters(**{"proj_hidden": 32, "proj_out": 16, "pred_hidden": 32, **values})
    return BYOL(backbone, hparams, byol_recipe(16))


def test_loss_is_two_minus_two_cosine_summed_over_both_directions():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 8) for _ in range(4))
    expected = sum((((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(dim=1)).mean()
                   for p, z in ((p1, z2), (p2, z1)))
    assert torch.allclose(BYOLLoss()(p1, p2, z1, z2), expected, atol=1e-6)
    assert BYOLLoss()(p1, p2, 3 * p2, 0.5 * p1).item() == pytest.approx(0, abs=1e-6)  # scale-free
    assert BYOLLoss()(p1, p2, -p2, -p1).item() == pytest.approx(8, abs=1e-5)  # opposite: 4 each way
    with pytest.raises(ValueError, match=r"same \(n, d\)"):
        BYOLLoss()(p1, p2, z1, z2[:, :4])


def test_loss_of_a_batch_is_the_mean_of_its_equal_halves():
    # What DistributedDataParallel's gradient average relies on: two workers' losses averaged
    # equal the loss of their joined batch (no term couples images, unlike a contrastive loss).
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(8, 5) for _ in range(4))
    halves = [BYOLLoss()(*(t[i:i + 4] for t in (p1, p2, z1, z2))) for i in (0, 4)]
    assert torch.allclose(BYOLLoss()(p1, p2, z1, z2), (halves[0] + halves[1]) / 2, atol=1e-6)


def test_gradients_reach_the_online_network_and_never_the_target():
    method = tiny_byol()
    views = method.views(torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8))
    loss, stats = method(views)
    loss.backward()
    assert stats["embeddings"].shape == (16, method.backbone.num_features)
    for module in (method.backbone, method.projector, method.predictor):
        # (the residual branches' convs get exactly 0 at init: their last BN scale starts at 0)
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
        assert sum(p.grad.abs().sum() for p in module.parameters() if p.requires_grad) > 0
    for module in (method.target_backbone, method.target_projector):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def test_target_is_an_ema_of_the_online_network_on_a_cosine_to_one():
    method = tiny_byol(target_momentum=0.9)
    assert method.momentum_at(0, 100) == pytest.approx(0.9)
    assert method.momentum_at(50, 100) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 2) + 1) / 2)
    assert method.momentum_at(100, 100) == pytest.approx(1.0)
    with torch.no_grad():
        for p in [*method.backbone.parameters(), *method.projector.parameters()]:
            p.add_(1.0)  # an optimizer step moved the online network
    before = [p.clone() for p in method.target_projector.parameters()]
    online = [p.clone() for p in method.projector.parameters()]
    method.after_step(0, 100)
    for target, old, new in zip(method.target_projector.parameters(), before, online):
        assert torch.allclose(target, 0.9 * old + 0.1 * new, atol=1e-6)
    assert method.before_step(0, 100, 0, None) == {"target_momentum": pytest.approx(0.9)}


def test_views_are_the_papers_asymmetric_pair_and_other_recipes_are_refused():
    recipe = byol_recipe(24)
    assert recipe.names == ["view1", "view2"]
    assert (recipe.views["view1"].blur, recipe.views["view2"].blur) == (1.0, 0.1)
    assert (recipe.views["view1"].solarize, recipe.views["view2"].solarize) == (0.0, 0.2)
    with pytest.raises(ValueError, match="exactly two views"):
        BYOL(BackboneConfig(name="resnet18", small_images=True), BYOLHyperparameters(),
             byol_recipe(16).with_overrides({"view2.copies": 2}))
    with pytest.raises(ValueError, match="hparams.target_momentum=1"):
        tiny_config("byol", **{"hparams.target_momentum": 1})


def test_encoder_initialised_from_weights_starts_online_and_target_alike():
    method = tiny_byol()
    weights = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
               for k, v in method.backbone.state_dict().items()}
    method.init_encoder(weights)
    for online, target in zip(method.backbone.state_dict().values(), method.target_backbone.state_dict().values()):
        assert torch.equal(online, target)
