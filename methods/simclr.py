"""SimCLR: contrastive learning of visual representations.

Chen, Kornblith, Norouzi, Hinton. "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020. Two augmented views per image, a projection head, and the NT-Xent
loss over the *global* batch: every view is contrasted with all 2N-2 other views gathered from
every worker, with the gradient flowing back through the gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn

from methods.base import HealthScale, LabelFreeObjective, Method, register
from methods.checks import check_rules
from methods.distributed import gather_with_grad, rank
from methods.views import ViewRecipe, ViewSpec


def simclr_recipe(size: int = 224, blur: float = 0.5) -> ViewRecipe:
    """Two views (Chen et al., 2020, appendix A): crop 0.08-1, flip, colour jitter
    0.8 * (0.4, 0.4, 0.4, 0.1), grayscale 0.2, Gaussian blur."""
    return ViewRecipe({"view": ViewSpec(size=size, blur=blur, copies=2)})


class NTXentLoss(nn.Module):
    """Normalized temperature-scaled cross entropy over a batch distributed across workers.

    For each view, the positive is the other view of the same image and the negatives are the
    2N-2 views of the other images of the global batch (N = images over all workers).

    Args:
        temperature: softmax temperature tau > 0 on cosine similarities (0.1 for ImageNet,
            0.2-0.5 for CIFAR-size data, SimCLR paper appendix B.9).

    Inputs: `z1, z2: (n, d)` projections of this worker's two views (row i of each = image i).
    Output: the mean loss over this worker's 2n views. With one process this is the usual
    NT-Xent; averaging it over workers gives exactly the NT-Xent of the global batch.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: must be > 0")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"z1 and z2 must both be (n, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)  # (N, d) each, N = world * n
        candidates = torch.cat([all1, all2])  # (2N, d)
        n, total = z1.shape[0], all1.shape[0]
        own = rank() * n + torch.arange(n, device=z1.device)  # this worker's rows in all1/all2
        anchors = torch.cat([z1, z2])  # (2n, d)
        self_index = torch.cat([own, own + total])
        positive = torch.cat([own + total, own])
        logits = anchors @ candidates.T / self.temperature  # (2n, 2N)
        logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")
        return F.cross_entropy(logits, positive)


def projection_head(in_dim: int, hidden: int, out: int, layers: int, batch_norm: bool) -> nn.Sequential:
    """MLP: (Linear -> [BN] -> ReLU) x (layers - 1) -> Linear -> [BN without affine]."""
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden, bias=not batch_norm)]
        blocks += [nn.BatchNorm1d(hidden)] if batch_norm else []
        blocks += [nn.ReLU(inplace=True)]
        width = hidden
    blocks.append(nn.Linear(width, out, bias=not batch_norm))
    if batch_norm:
        blocks.append(nn.BatchNorm1d(out, affine=False))  # SimCLR v2's output BN
    return nn.Sequential(*blocks)


@dataclass
class SimCLRHyperparameters:
    """Args:
    temperature: NT-Xent temperature.
    proj_layers: layers of the projection MLP (2 in SimCLR v1, 3 in v2).
    proj_hidden: hidden width of the projection MLP (0 = the backbone's feature width).
    proj_out: output width (128 in the paper).
    head_batch_norm: BatchNorm in the projection head (per-worker statistics unless sync_bn).
    sync_bn: synchronise BatchNorm statistics across workers (global BN, paper section B.5).
    lars_trust: LARS trust coefficient.
    """

    temperature: float = 0.1
    proj_layers: int = 2
    proj_hidden: int = 0
    proj_out: int = 128
    head_batch_norm: bool = True
    sync_bn: bool = False
    lars_trust: float = 0.001

    def validate(self) -> None:
        check_rules("hparams", self, {
            "temperature": (isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 10, "in (0, 10]"),
            "proj_layers": (isinstance(self.proj_layers, int) and 1 <= self.proj_layers <= 4, "an integer in [1, 4]"),
            "proj_hidden": (isinstance(self.proj_hidden, int) and self.proj_hidden >= 0,
                            "a non-negative integer (0 = the backbone's width)"),
            "proj_out": (isinstance(self.proj_out, int) and self.proj_out >= 1, "an integer >= 1"),
            "lars_trust": (self.lars_trust > 0, "> 0"),
        })


@register
class SimCLR(Method):
    name = "simclr"
    Hyperparameters = SimCLRHyperparameters
    lr_scaling = "sqrt"
    search_space = ["temperature=loguniform(0.05, 1.0)", "batch_size=choice(64, 128, 256)"]
    # The label-free study's pick for SimCLR, the better of two that both fall short of +0.5: alpha-ReQ's
    # distance to 1 (docs/FINDINGS.md, "Label-free model selection", whose 16-trial row
    # tests/test_tune.py holds these figures to).
    label_free = LabelFreeObjective("alpha_req_gap", "min", spearman=0.31, trials=16)
    # Its healthy runs' medians (docs/BENCHMARKS.md, "Health on one scale per method").
    health = HealthScale(embedding_std=0.18, rankme_fraction=0.16)
    smoke_sets = {"views.view.size": 16, "backbone.kwargs.channels": [8, 16, 32, 64], "backbone.kwargs.stem_width": 8}
    # The demo's recipe: kNN 0.51-0.61 on MNIST-M against `tiny`'s 0.18-0.40 (docs/BENCHMARKS.md,
    # "The MNIST-M sample" and "The demo's learning rate").
    default_preset = "demo"
    presets = {
        # A CIFAR-style ResNet of width 16 at 32 px: learns visibly in a few CPU minutes.
        "tiny": {
            "backbone": {"name": "resnet18", "small_images": True,
                         "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
            "hparams": {"temperature": 0.2, "proj_hidden": 128, "proj_out": 64},
            "views": {"view.size": 32, "view.blur": 0.0, "view.scale": [0.2, 1.0]},
            "data": {"canvas_size": 32},
            "optim": {"epochs": 5, "batch_size": 256, "base_lr": 0.3, "lr_scaling": "sqrt",
                      "warmup_epochs": 1, "weight_decay": 1e-4, "momentum": 0.9},
        },
        # `selfsup demo`'s recipe for MNIST-M (docs/FINDINGS.md, "composition"; docs/BENCHMARKS.md,
        # "The demo's learning rate"): tiny's network with one block per stage, views without crops
        # (at 32 px a crop keeps the photo and loses the digit), strong colour, and the LR held at
        # its peak after the warm-up, since the run is short.
        "demo": {
            "backbone": {"name": "resnet18", "small_images": True,
                         "kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16, "layers": [1, 1, 1, 1]}},
            "hparams": {"temperature": 0.2, "proj_hidden": 128, "proj_out": 64},
            "views": {"view.size": 32, "view.flip": 0.0, "view.scale": [1.0, 1.0], "view.ratio": [1.0, 1.0],
                      "view.jitter": [0.8, 0.8, 0.8, 0.2], "view.grayscale": 0.5, "view.blur": 0.5,
                      "view.blur_sigma": [0.1, 1.0]},
            "data": {"canvas_size": 32},
            "optim": {"epochs": 15, "batch_size": 64, "base_lr": 0.3, "lr_scaling": "sqrt", "lr_schedule": "constant",
                      "warmup_epochs": 1, "weight_decay": 1e-4, "momentum": 0.9},
        },
        # The paper: ResNet-50, batch 4096, tau 0.1, LARS lr 0.3 x B/256, wd 1e-6, 10 warmup epochs.
        "imagenet": {
            "backbone": {"name": "resnet50"},
            "hparams": {"temperature": 0.1, "proj_hidden": 2048, "proj_out": 128, "sync_bn": True},
            "views": {"view.size": 224, "view.blur": 0.5},
            "data": {"canvas_size": 256},
            "optim": {"epochs": 100, "batch_size": 4096, "base_lr": 0.3, "lr_scaling": "linear",
                      "warmup_epochs": 10, "weight_decay": 1e-6, "momentum": 0.9},
        },
    }

    @classmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        return simclr_recipe(size)

    def __init__(self, backbone, hparams: SimCLRHyperparameters, recipe):
        super().__init__(backbone, hparams, recipe)
        if len(recipe.names) != 2:
            raise ValueError(f"views: SimCLR needs exactly two views, the recipe makes {len(recipe.names)}")
        width = self.backbone.num_features
        self.head = projection_head(width, hparams.proj_hidden or width, hparams.proj_out,
                                    hparams.proj_layers, hparams.head_batch_norm)
        self.criterion = NTXentLoss(hparams.temperature)

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`views: [(n, 3, s, s)] * 2` -> (NT-Xent over the global batch, {"embeddings": (2n, d)})."""
        n = views[0].shape[0]
        features = self.backbone(torch.cat(views))  # one pass: BN sees both views, as the paper
        projections = self.head(features)
        loss = self.criterion(projections[:n], projections[n:])
        return loss, {"embeddings": features.detach()}

    def make_optimizer(self, groups, lr, optim):
        """LARS (timm) with momentum; the no-decay group (biases, norms) has weight decay 0, which
        timm's LARS also takes as "no trust-ratio adaptation"."""
        return Lars(groups, lr=lr, momentum=optim.momentum, trust_coeff=self.hparams.lars_trust)
