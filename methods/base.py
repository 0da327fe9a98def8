"""The Method interface: everything the method-agnostic pipeline needs from a method.

A method is one file that subclasses `Method`. It owns its modules (a timm backbone and heads),
its view recipe, its loss (computed in `forward` so DistributedDataParallel sees the call), its
per-step hooks, its optimizer and weight-decay groups, its LR-scaling rule, its hyperparameters
with validation, and `features()` for evaluation. `register` adds it to the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbone import BackboneConfig, create_backbone
from pipelines.views import ViewMaker, ViewRecipe

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    import methods  # noqa: F401  (imports every method module, filling the registry)

    if name not in METHODS:
        raise ValueError(f"method={name!r}: unknown (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    Class attributes:
        name: registry key (`simclr`, `mae`, `dino`).
        Hyperparameters: a dataclass of the method's hyperparameters with `validate()`.
        lr_scaling: `linear` (base x B/256) or `sqrt` (base x sqrt(B)), in the global batch.
        presets: partial run configs by preset name (`tiny` for the CPU sample, `imagenet`).
    """

    name: ClassVar[str]
    Hyperparameters: ClassVar[type]
    lr_scaling: ClassVar[str] = "linear"
    presets: ClassVar[dict[str, dict]] = {}
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when training on several workers

    def __init__(self, backbone: BackboneConfig, hparams: Any, recipe: ViewRecipe):
        super().__init__()
        self.hparams = hparams
        self.recipe = recipe
        self.backbone = create_backbone(backbone)
        self.view_maker = ViewMaker(recipe)
        self.eval_size = recipe.views[next(iter(recipe.views))].size

    # --- views -------------------------------------------------------------------------
    def views(self, canvases: torch.Tensor) -> list[torch.Tensor]:
        """`canvases: (N, H, W, 3) uint8` on the device -> the recipe's views, on the device."""
        return self.view_maker(canvases)

    def view_pair(self, canvases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of every image by the method's own recipe, for the alignment metric: the
        recipe's first two views when they share a shape (SimCLR's pair, DINO's global crops),
        else its first view drawn twice (MAE's one view). `(N, H, W, 3) uint8 -> 2 x (N, 3, s, s)`."""
        views = self.views(canvases)
        if len(views) > 1 and views[1].shape == views[0].shape:
            return views[0], views[1]
        return views[0], self.views(canvases)[0]

    def eval_images(self, canvases: torch.Tensor) -> torch.Tensor:
        """Deterministic input for evaluation: the whole canvas resized to the training view size
        and normalised like the views. `(N, H, W, 3) uint8 -> (N, 3, s, s) float`."""
        images = canvases.permute(0, 3, 1, 2).float().div_(255)
        if images.shape[-1] != self.eval_size:
            images = F.interpolate(images, size=(self.eval_size, self.eval_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.view_maker.normalize(images)

    # --- training ----------------------------------------------------------------------
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss over this worker's views (global-batch semantics are the method's job) and
        statistics: `embeddings: (N, d)` for the collapse indicator, plus any detached scalar
        tensors, which the pipeline averages over each report window and passes to `diagnose`."""
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups; by default weight decay on all but biases and norms."""
        from methods.backbone import decay_groups

        return decay_groups(self, weight_decay)

    def make_optimizer(self, groups: list[dict], lr: float, optim: Any) -> torch.optim.Optimizer:
        raise NotImplementedError

    def before_step(self, step: float, total_steps: int, epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Called before each optimizer step (schedules of temperature, weight decay, ...); returns
        metrics for the next report. `step` is the schedule position: images seen in steps of the
        recipe's global batch (fractional only when an elastic group cannot keep that batch)."""
        return {}

    def on_gradients(self, step: int, epoch: int) -> None:
        """Called after backward and clipping, before the optimizer step (e.g. freeze a layer by
        dropping its gradients)."""

    def after_step(self, step: float, total_steps: int) -> None:
        """Called after each optimizer step (e.g. EMA teacher update); `step` as in before_step."""

    def diagnose(self, metrics: dict[str, float]) -> dict[str, float]:
        """From a report's metrics (window means of the scalar statistics `forward` returns),
        extra metrics such as a `collapsed` flag; may log a warning."""
        return {}

    # --- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features for kNN / linear evaluation. `images: (N, 3, s, s)` -> `(N, d)`."""
        return self.backbone(images)

    def encoder(self) -> nn.Module:
        """The module that is exported / evaluated (the backbone)."""
        return self.backbone

    @torch.no_grad()
    def init_encoder(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from existing encoder weights (`--init-from`): `weights` is a state dict of
        exactly the backbone's keys and shapes (checked by the caller)."""
        self.backbone.load_state_dict(weights)

    def encoder_model_args(self) -> dict:
        """`timm.create_model` arguments that make the exported encoder's `forward` equal
        `features` (e.g. the pooling), beyond the backbone config's own."""
        return {}


def hparams_from_dict(cls: type, values: dict, section: str = "hparams"):
    """Build a hyperparameter dataclass from a dict, refusing unknown keys, then validate."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(fields))})")
    hparams = cls(**values)
    hparams.validate()
    return hparams
