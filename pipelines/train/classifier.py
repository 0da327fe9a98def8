"""Fine-tuning's training objective: a pretrained encoder as a timm classifier (the encoder's own
architecture, rebuilt by `weights.timm_model`, with a linear head) trained end to end on labels.

`Classifier` keeps the hooks the method-agnostic loop calls on a method (`step_input`, `forward`,
`param_groups`, `make_optimizer`, the step hooks, `eval_images`, `features`), so fine-tuning runs
on the same Ray Train worker, checkpoints and resume as pretraining. The recipes follow the MAE
paper's fine-tuning (He et al., 2022, appendix A.1: AdamW, layer-wise LR decay, warm-up, label
smoothing) for ViTs and the same optimizer without layer decay for ResNets; `FINETUNE_PRESETS`
holds one per backbone family and image size (docs/BENCHMARKS.md, "Fine-tuning").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbone import DECAY, NO_DECAY
from methods.base import adamw
from methods.checks import check_rules
from methods.views import ViewMaker, ViewRecipe, ViewSpec
from pipelines.config import RunConfig, build_method, build_section
from pipelines.weights.timm_model import timm_model


@dataclass
class FineTuneConfig:
    """Args:
    layer_decay: a ViT block's LR is this times the next one's, the head's is the peak
        (Clark et al., 2020; MAE's fine-tuning); 1.0 = one LR for all.
    label_smoothing: of the cross-entropy.
    views: overrides of the one fine-tuning view, `{"view.<field>": value}` as in pretraining's
        `views` (random resized crop and flip; no colour).
    """

    layer_decay: float = 0.75
    label_smoothing: float = 0.1
    views: dict = field(default_factory=dict)

    def validate(self) -> None:
        check_rules("finetune", self, {
            "layer_decay": (0 < self.layer_decay <= 1, "in (0, 1]"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "views": (isinstance(self.views, dict), "a mapping of view.<field>: value"),
        })


SMALL_IMAGES = 64  # a view this size or smaller takes the `-small-images` preset of its family

# The base LR scales linearly with the batch, as in MAE's fine-tuning (lr = base x B / 256), whatever
# the pretraining method's own rule (SimCLR's sqrt rule gave its fine-tunes 45x the LR).
FINETUNE_LR_SCALING = "linear"

# Partial configs: `finetune` (FineTuneConfig) and `optim` (pipelines.config.OptimConfig).
FINETUNE_PRESETS = {
    # MAE's ViT-B fine-tuning: batch 1024, base LR 5e-4, layer decay 0.65, 5 warm-up epochs of 100.
    "vit": {"finetune": {"layer_decay": 0.65, "label_smoothing": 0.1, "views": {"view.scale": [0.08, 1.0]}},
            "optim": {"epochs": 100, "batch_size": 1024, "base_lr": 5e-4, "warmup_epochs": 5, "weight_decay": 0.05,
                      "betas": [0.9, 0.999], "min_lr": 1e-6}},
    "resnet": {"finetune": {"layer_decay": 1.0, "label_smoothing": 0.1, "views": {"view.scale": [0.08, 1.0]}},
               "optim": {"epochs": 100, "batch_size": 1024, "base_lr": 5e-4, "warmup_epochs": 5,
                         "weight_decay": 0.05, "betas": [0.9, 0.999]}},
    # The CPU sample's 32 px: crops that keep most of the image, no flip (digits), small batches.
    "vit-small-images": {"finetune": {"layer_decay": 0.75, "label_smoothing": 0.1,
                                      "views": {"view.scale": [0.6, 1.0], "view.flip": 0.0}},
                         "optim": {"epochs": 50, "batch_size": 32, "base_lr": 8e-3, "warmup_epochs": 5,
                                   "weight_decay": 0.05, "betas": [0.9, 0.999]}},
    # Peak LR 4.5e-2 at batch 32: of 1e-3 to 0.25, the best for pretrained ResNets (docs/BENCHMARKS.md,
    # "The ResNets' fine-tuning LR"; scratch runs peak higher).
    "resnet-small-images": {"finetune": {"layer_decay": 1.0, "label_smoothing": 0.1,
                                         "views": {"view.scale": [0.6, 1.0], "view.flip": 0.0}},
                            "optim": {"epochs": 50, "batch_size": 32, "base_lr": 0.36, "warmup_epochs": 5,
                                      "weight_decay": 0.05, "betas": [0.9, 0.999]}},
}


def default_preset(model: nn.Module, view_size: int) -> str:
    """The preset for a model of this family at this view size."""
    family = "vit" if hasattr(model, "blocks") else "resnet"
    return family + ("-small-images" if view_size <= SMALL_IMAGES else "")


def finetune_recipe(size: int, pretraining: ViewRecipe, overrides: dict) -> ViewRecipe:
    """The one fine-tuning view: a random resized crop to `size` and a flip, normalised like the
    pretraining views; `overrides` as `views` in a run config."""
    view = ViewSpec(size=size, scale=(0.08, 1.0), jitter_p=0.0, grayscale=0.0)
    return ViewRecipe({"view": view}, pretraining.mean, pretraining.std).with_overrides(overrides)


class Classifier(nn.Module):
    """`model`: a timm classifier (`forward_features`, `forward_head`, `get_classifier`);
    `recipe`: its training view. Training input is `[views (N, 3, s, s), labels (N,)]`."""

    sync_bn = False
    health = None  # no healthy scale of a classifier's own: its reports carry no health ratios or rank flag

    def __init__(self, model: nn.Module, recipe: ViewRecipe, settings: FineTuneConfig):
        super().__init__()
        self.model = model
        self.settings = settings
        self.view_maker = ViewMaker(recipe)
        self.eval_size = recipe.views["view"].size

    def step_input(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """What one training step feeds `forward`: the augmented view and the labels."""
        return [self.view_maker(batch["image"])[0], batch["label"]]

    def forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = inputs
        features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        logits = self.model.get_classifier()(features)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.settings.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return loss, {"embeddings": features.detach(), "train_top1": accuracy}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """timm's layer-decay groups (each with its `lr_scale`), tagged DECAY / NO_DECAY."""
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(self.model, weight_decay, self.model.no_weight_decay()
                                          if hasattr(self.model, "no_weight_decay") else (),
                                          layer_decay=self.settings.layer_decay)
        return [{**group, "group": DECAY if group["weight_decay"] > 0 else NO_DECAY} for group in groups]

    def make_optimizer(self, groups: list[dict], lr: float, optim) -> torch.optim.Optimizer:
        return adamw(groups, lr, optim.betas)

    def before_step(self, step, total_steps, epoch, optimizer) -> dict[str, float]:
        return {}

    def on_gradients(self, step, epoch) -> None:
        pass

    def after_step(self, step, total_steps) -> None:
        pass

    def diagnose(self, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def eval_images(self, canvases: torch.Tensor) -> torch.Tensor:
        """The whole canvas at the view size, normalised: `(N, H, W, 3) uint8 -> (N, 3, s, s)`."""
        return self.view_maker.whole_canvas(canvases, self.eval_size)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The class scores `(N, classes)` (what evaluation's `collect_features` collects)."""
        return self.model(images)

    @torch.no_grad()
    def init_encoder(self, weights: dict[str, torch.Tensor]) -> None:
        """Start from encoder weights: every tensor but the head's must be there."""
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        missing = [key for key in missing if not key.startswith(head_prefix(self.model))]
        if missing or unexpected:
            raise ValueError(f"encoder weights do not fit the classifier: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")


def head_prefix(model: nn.Module) -> str:
    """The attribute name of a timm model's classifier (`head`, `fc`)."""
    classifier = model.get_classifier()
    return next(name for name, module in model.named_children() if module is classifier) + "."


@dataclass(frozen=True)
class ClassifierBuild:
    """Builds a run's `Classifier` on each worker (what `start_worker` calls instead of
    `build_method`): the run config's encoder architecture with a head of `num_classes`, random
    weights seeded by `train.seed` (the scratch run keeps them; a pretrained run loads its encoder
    over them)."""

    settings: dict
    num_classes: int

    def __call__(self, config: RunConfig) -> Classifier:
        settings = build_section(FineTuneConfig, self.settings, "finetune")
        method = build_method(config)  # the encoder's architecture and pooling
        torch.manual_seed(config.train.seed)
        model, _, _ = timm_model(method, config, self.num_classes)
        return Classifier(model, finetune_recipe(method.eval_size, config.recipe(), settings.views), settings)
