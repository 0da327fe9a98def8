"""The Method interface: everything the method-agnostic pipeline needs from a method.

A method is one file in `methods/` that subclasses `Method`. It owns its modules (a timm backbone
and heads), its view recipe, its loss (computed in `forward` so DistributedDataParallel sees the
call), its per-step hooks, its optimizer and weight-decay groups, its LR-scaling rule, its
hyperparameters with validation, its presets and default search space, `features()` for
evaluation, and the optional capabilities it declares. `register` adds it to the registry, which
importing the `methods` package fills by importing every module in it: the CLI's choices, Tune's
default spaces and the tests' fixtures all come from the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbone import BackboneConfig, create_backbone, decay_groups
from methods.views import ViewMaker, ViewRecipe

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


class Method(nn.Module):
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    Class attributes:
        name: registry key (`simclr`, `mae`, `dino`).
        Hyperparameters: a dataclass of the method's hyperparameters with `validate()`.
        lr_scaling: `linear` (base x B/256) or `sqrt` (base x sqrt(B)), in the global batch.
        presets: partial run configs by preset name (`tiny` for the CPU sample, `imagenet`).
        search_space: the `selfsup tune --space` dimensions searched when the user names none.
        smoke_sets: `--set` overrides on the `tiny` preset for the smallest run that goes through
            the whole pipeline (16 px views, a network of under a million weights): what the test
            suite trains every registered method with.
        capabilities: optional abilities the CLI may use: "reconstruct" (`viz mae`: the method
            implements `reconstruct` and `masking`), "attention" (`viz attention`: it implements
            `last_attention`).
    """

    name: ClassVar[str]
    Hyperparameters: ClassVar[type]
    lr_scaling: ClassVar[str] = "linear"
    presets: ClassVar[dict[str, dict]] = {}
    search_space: ClassVar[list[str]] = []
    smoke_sets: ClassVar[dict[str, Any]] = {}
    capabilities: ClassVar[frozenset[str]] = frozenset()
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when training on several workers

    def __init__(self, backbone: BackboneConfig, hparams: Any, recipe: ViewRecipe):
        super().__init__()
        self.hparams = hparams
        self.recipe = recipe
        self.backbone = create_backbone(backbone)
        self.view_maker = ViewMaker(recipe)
        self.eval_size = recipe.views[next(iter(recipe.views))].size

    # --- views -------------------------------------------------------------------------
    @classmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        """The paper's views with the main view `size` px square (other views scale with it); a
        config's `views` overrides are applied on top of this."""
        raise NotImplementedError

    @classmethod
    def display_recipe(cls, size: int) -> ViewRecipe:
        """The recipe `viz augment` draws for a `size` px canvas: by default the training one."""
        return cls.default_recipe(size)

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

    # --- optional capabilities (declared in `capabilities`) ----------------------------------
    @classmethod
    def masking(cls, hparams: Any, patch_size: int | None) -> tuple[float, int] | None:
        """(mask ratio, patch size) of a method that hides patches of its input, else None."""
        return None

    @classmethod
    def patch_mask(cls, n: int, patches: int, ratio: float) -> torch.Tensor:
        """"reconstruct": which of `patches` patches the encoder does not see, drawn as in
        training -> `(n, patches)`, 1 = hidden."""
        raise NotImplementedError(f"{cls.name} does not mask its input")

    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """"reconstruct": `imgs: (N, 3, H, W)` -> (reconstruction, mask) for `viz mae`."""
        raise NotImplementedError(f"{self.name} does not reconstruct its input")

    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """"attention": `images: (N, 3, H, W)` -> the class token's last-block attention
        `(N, heads, H / p, W / p)` for `viz attention`."""
        raise NotImplementedError(f"{self.name} has no attention maps")

    def encoder_model_args(self) -> dict:
        """`timm.create_model` arguments that make the exported encoder's `forward` equal
        `features` (e.g. the pooling), beyond the backbone config's own."""
        return {}


def adamw(groups: list[dict], lr: float, betas) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) as MAE and DINO train with it, on PyTorch's fused kernel
    (CUDA and CPU): one kernel updates every parameter instead of a chain of multi-tensor ops.
    Measured on 2 CPU threads: the optimizer step 4.4-4.8x faster for the `tiny` presets, under
    1 % of their whole step either way (docs/BENCHMARKS.md); it counts for large models."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


@torch.no_grad()
def ema_update(targets: list[nn.Module], sources: list[nn.Module], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter, in one fused
    `torch._foreach_lerp_` (DINO's teacher, BYOL's target network). Buffers are not averaged."""
    target = [p for module in targets for p in module.parameters()]
    source = [p.detach() for module in sources for p in module.parameters()]
    torch._foreach_lerp_(target, source, 1 - momentum)


def hparams_from_dict(cls: type, values: dict, section: str = "hparams"):
    """Build a hyperparameter dataclass from a dict, refusing unknown keys, then validate."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(fields))})")
    hparams = cls(**values)
    hparams.validate()
    return hparams
