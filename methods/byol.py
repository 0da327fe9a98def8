"""BYOL: bootstrap your own latent.

Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot,
Kavukcuoglu, Munos, Valko. "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", NeurIPS 2020. An online network (backbone, projector, predictor) predicts the target
network's projection of another view of the same image; the target (backbone, projector) is an
exponential moving average of the online one and gets no gradient. No negatives: the predictor
and the slow target are what keep it from collapsing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn

from methods.base import HealthScale, LabelFreeObjective, Method, ema_update, register
from methods.checks import check_rules
from methods.schedules import warmup_cosine
from methods.views import ViewRecipe, ViewSpec


def byol_recipe(size: int = 224) -> ViewRecipe:
    """The paper's asymmetric pair (appendix B, table 6): crop 0.08-1, flip, colour jitter
    0.8 * (0.4, 0.4, 0.2, 0.1), grayscale 0.2 on both; Gaussian blur always on the first view and
    with p 0.1 on the second, which alone is solarized with p 0.2."""
    jitter = (0.4, 0.4, 0.2, 0.1)
    return ViewRecipe({
        "view1": ViewSpec(size=size, jitter=jitter, blur=1.0),
        "view2": ViewSpec(size=size, jitter=jitter, blur=0.1, solarize=0.2),
    })


def mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """The paper's projector and predictor: Linear -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


class BYOLLoss(nn.Module):
    """BYOL's symmetric normalised-MSE loss (paper equation 2 and its symmetrised sum).

    For a prediction p of one view and the target projection z of the other,
    ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), averaged over the images; the loss is the sum of the two
    directions (p1 against z2, p2 against z1), so it lies in [0, 8] and is 0 when every
    prediction points exactly where its target does.

    Inputs: `p1, p2: (n, d)` online predictions of views 1 and 2, `z1, z2: (n, d)` target
    projections of the same views (no gradient flows into them). The loss is a mean over this
    worker's images, so the average DistributedDataParallel takes over equal-size workers is the
    loss of the global batch; no gather is needed, as there are no negatives.
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        shapes = {tuple(t.shape) for t in (p1, p2, z1, z2)}
        if len(shapes) != 1 or p1.ndim != 2:
            raise ValueError(f"p1, p2, z1, z2 must all be the same (n, d), got {sorted(shapes)}")
        return self.direction(p1, z2) + self.direction(p2, z1)

    @staticmethod
    def direction(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """`2 - 2 cos(p, z)` averaged over the rows; the target is detached."""
        return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


@dataclass
class BYOLHyperparameters:
    """Args:
    proj_hidden: hidden width of the projector (4096 in the paper).
    proj_out: projection width (256).
    pred_hidden: hidden width of the predictor (4096).
    target_momentum: EMA momentum of the target at step 0; it follows a cosine to 1 at the last
        step (paper section 3.2: 0.996).
    sync_bn: synchronise BatchNorm statistics across workers (the paper's global BN).
    lars_trust: LARS trust coefficient.
    """

    proj_hidden: int = 4096
    proj_out: int = 256
    pred_hidden: int = 4096
    target_momentum: float = 0.996
    sync_bn: bool = False
    lars_trust: float = 0.001

    def validate(self) -> None:
        check_rules("hparams", self, {
            **{key: (isinstance(getattr(self, key), int) and not isinstance(getattr(self, key), bool)
                     and getattr(self, key) >= 1, "a positive integer") for key in ("proj_hidden", "proj_out", "pred_hidden")},
            "target_momentum": (isinstance(self.target_momentum, (int, float)) and 0 <= self.target_momentum < 1,
                                "in [0, 1)"),
            "lars_trust": (self.lars_trust > 0, "> 0"),
        })


@register
class BYOL(Method):
    name = "byol"
    Hyperparameters = BYOLHyperparameters
    lr_scaling = "linear"
    search_space = ["hparams.target_momentum=uniform(0.9, 0.999)", "batch_size=choice(64, 128, 256)"]
    # The label-free study's best metric for BYOL, on two searches of the digits sample: alpha-ReQ, higher
    # better (docs/FINDINGS.md, "Label-free model selection", whose row tests/test_tune.py holds these to).
    label_free = LabelFreeObjective("alpha_req", "max", spearman=0.497, trials=16)
    # Its healthy runs' medians (docs/BENCHMARKS.md, "Health on one scale per method").
    health = HealthScale(embedding_std=0.56, rankme_fraction=0.36)
    smoke_sets = {"views.view1.size": 16, "views.view2.size": 16, "backbone.kwargs.channels": [8, 16, 32, 64],
                  "backbone.kwargs.stem_width": 8, "hparams.proj_hidden": 64, "hparams.proj_out": 32,
                  "hparams.pred_hidden": 64}
    presets = {
        # SimCLR's tiny network (a CIFAR-style ResNet of width 16 at 32 px); no blur at 32 px, and
        # the slower-moving target of solo-learn's CIFAR recipe (0.99) for runs of a few hundred steps.
        "tiny": {
            "backbone": {"name": "resnet18", "small_images": True,
                         "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
            "hparams": {"proj_hidden": 512, "proj_out": 128, "pred_hidden": 512, "target_momentum": 0.99},
            "views": {"view1.size": 32, "view2.size": 32, "view1.blur": 0.0, "view2.blur": 0.0,
                      "view1.scale": [0.2, 1.0], "view2.scale": [0.2, 1.0]},
            "data": {"canvas_size": 32},
            "optim": {"epochs": 5, "batch_size": 256, "base_lr": 1.0, "lr_scaling": "linear",
                      "warmup_epochs": 1, "weight_decay": 1e-5, "momentum": 0.9},
        },
        # The paper: ResNet-50, batch 4096, LARS lr 0.2 x B/256, wd 1.5e-6, 10 warmup epochs, tau 0.996.
        "imagenet": {
            "backbone": {"name": "resnet50"},
            "hparams": {"sync_bn": True},
            "views": {"view1.size": 224, "view2.size": 224},
            "data": {"canvas_size": 256},
            "optim": {"epochs": 300, "batch_size": 4096, "base_lr": 0.2, "lr_scaling": "linear",
                      "warmup_epochs": 10, "weight_decay": 1.5e-6, "momentum": 0.9},
        },
    }

    @classmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        return byol_recipe(size)

    def __init__(self, backbone, hparams: BYOLHyperparameters, recipe):
        super().__init__(backbone, hparams, recipe)
        if len(recipe.names) != 2:
            raise ValueError(f"views: BYOL needs exactly two views, the recipe makes {len(recipe.names)}")
        self.projector = mlp(self.backbone.num_features, hparams.proj_hidden, hparams.proj_out)
        self.predictor = mlp(hparams.proj_out, hparams.pred_hidden, hparams.proj_out)
        # The target starts as a copy of the online network and only ever moves by EMA.
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.criterion = BYOLLoss()

    def momentum_at(self, step: float, total_steps: int) -> float:
        """1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 (paper section 3.2)."""
        return warmup_cosine(step, total_steps, self.hparams.target_momentum, 1.0)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`views: [(n, 3, s, s)] * 2` -> (the symmetric BYOL loss, {"embeddings": (2n, d)} of the
        online backbone). Each view goes through the networks on its own, as in the reference
        code, so BatchNorm normalises each view's batch separately."""
        features = [self.backbone(view) for view in views]
        p1, p2 = (self.predictor(self.projector(f)) for f in features)
        with torch.no_grad():
            z1, z2 = (self.target_projector(self.target_backbone(view)) for view in views)
        loss = self.criterion(p1, p2, z1, z2)
        return loss, {"embeddings": torch.cat(features).detach()}

    def make_optimizer(self, groups, lr, optim):
        """LARS (timm) with momentum, as the paper; the no-decay group (biases, norms) has weight
        decay 0, which timm's LARS also takes as "no trust-ratio adaptation" (the paper excludes
        them from both)."""
        return Lars(groups, lr=lr, momentum=optim.momentum, trust_coeff=self.hparams.lars_trust)

    def before_step(self, step: float, total_steps: int, epoch: int, optimizer) -> dict[str, float]:
        return {"target_momentum": self.momentum_at(step, total_steps)}

    @torch.no_grad()
    def after_step(self, step: float, total_steps: int) -> None:
        """target <- m * target + (1 - m) * online, with m on its cosine schedule."""
        ema_update([self.target_backbone, self.target_projector], [self.backbone, self.projector],
                   self.momentum_at(step, total_steps))

    @torch.no_grad()
    def init_encoder(self, weights: dict[str, torch.Tensor]) -> None:
        """Online and target start from the same weights, as they start from the same init."""
        self.backbone.load_state_dict(weights)
        self.target_backbone.load_state_dict(weights)
