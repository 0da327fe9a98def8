"""Augmented views made batched on the training device with Kornia.

A recipe is data: an ordered mapping of view name -> `ViewSpec`, plus the normalisation. Every
field can be overridden with `"<view>.<field>": value` (e.g. `"local.copies": 6`), so configs and
`--set` reach every parameter. Kornia draws random parameters per sample; seeding the torch RNG
(`torch.manual_seed`) makes a sequence of calls reproducible.

Each method's recipe lives in its own file (`Method.default_recipe`); this module is the machinery
they share, and the pipeline imports it from here (methods never import the pipeline).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn

from methods.checks import check_rules, typed_values

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViewSpec:
    """One kind of view. Probabilities are per sample; `copies` views of this kind are made.

    `mix` > 0 blends every view with another image of the batch, drawn per view and per sample,
    at a weight drawn uniformly from [0, mix] (Kornia's `RandomMixUpV2`; Zhang et al., 2018). The
    target stays the view's own image: the partner is clutter that differs between the two views
    of one image, so a contrastive method cannot match views by what is behind the object. On the
    MNIST-M sample, where every digit sits on a photo crop, instance discrimination otherwise
    learns the backgrounds (docs/BENCHMARKS.md). Related: Un-Mix (Shen et al., AAAI 2022) mixes
    images within a batch for self-supervision and adds the mixture as a soft target instead.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale: float = 0.2
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    mix: float = 0.0
    copies: int = 1

    def validate(self, name: str) -> None:
        check_rules(f"views.{name}", self, {
            "size": (isinstance(self.size, int) and self.size >= 4, "an integer >= 4"),
            "scale": (0 < self.scale[0] <= self.scale[1] <= 1, "0 < low <= high <= 1"),
            "ratio": (0 < self.ratio[0] <= self.ratio[1], "0 < low <= high"),
            **{prob: (0 <= getattr(self, prob) <= 1, "a probability in [0, 1]")
               for prob in ("flip", "jitter_p", "grayscale", "blur", "solarize")},
            "jitter": (len(self.jitter) == 4 and min(self.jitter) >= 0 and self.jitter[3] <= 0.5,
                       "(brightness, contrast, saturation, hue >= 0, hue <= 0.5)"),
            "blur_sigma": (0 < self.blur_sigma[0] <= self.blur_sigma[1], "0 < low <= high"),
            "mix": (0 <= self.mix <= 0.5, "in [0, 0.5] (the partner's largest weight)"),
            "copies": (isinstance(self.copies, int) and self.copies >= 0, "an integer >= 0"),
        })


@dataclass
class ViewRecipe:
    """Named view kinds in the order their views are returned, and the normalisation."""

    views: dict[str, ViewSpec]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def names(self) -> list[str]:
        """One name per returned view, e.g. ['global1', 'global2', 'local', 'local', ...]."""
        return [name for name, spec in self.views.items() for _ in range(spec.copies)]

    def with_overrides(self, overrides: dict) -> ViewRecipe:
        """A copy with `{"<view>.<field>" or "mean"/"std": value}` applied and validated."""
        views = {name: dataclasses.replace(spec) for name, spec in self.views.items()}
        mean, std = self.mean, self.std
        fields = {f.name: f for f in dataclasses.fields(ViewSpec)}
        for key, value in overrides.items():
            if key in ("mean", "std"):
                if len(value) != 3 or (key == "std" and min(value) <= 0):
                    raise ValueError(f"views.{key}={value!r}: must be three numbers (std > 0)")
                mean, std = (tuple(value), std) if key == "mean" else (mean, tuple(value))
                continue
            name, _, attribute = key.partition(".")
            if name not in views or attribute not in fields:
                raise ValueError(
                    f"views.{key}: unknown; views are {sorted(views)} with fields {sorted(fields)}"
                )
            setattr(views[name], attribute, typed_values(f"views.{name}", ViewSpec, {attribute: value})[attribute])
        recipe = ViewRecipe(views=views, mean=mean, std=std)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        for name, spec in self.views.items():
            spec.validate(name)
        if not self.names:
            raise ValueError("views: the recipe makes no view (every copies is 0)")


def _blur_kernel(size: int) -> int:
    kernel = max(3, int(0.1 * size))
    return kernel + 1 - kernel % 2  # odd


# On a CPU, batching the copies pays for small views only (docs/BENCHMARKS.md, "Views per second").
BATCHED_CPU_MAX_SIZE = 64


class _ViewKind(nn.Module):
    """One view kind's augmentation: the crop, then everything else at the crop's (output) size.

    `make(images, copies, batched)` -> `copies` tensors `(N, 3, size, size)`. Batched, each copy
    is cropped on its own (repeating the full canvases for one crop call would move `copies`
    times the input through memory) and the photometric ops run once over all the crops, so
    their per-call cost (parameter sampling, kernel launches on a GPU) is paid once. Kornia draws
    every parameter per sample, so each crop still gets its own. A kind that mixes images
    (`mix > 0`) is made per copy: an image's partner must be another image, not its own copy.
    """

    def __init__(self, spec: ViewSpec):
        super().__init__()
        self.crop = K.AugmentationSequential(K.RandomResizedCrop((spec.size, spec.size), scale=spec.scale,
                                                                 ratio=spec.ratio))
        steps: list[nn.Module] = []
        if spec.flip > 0:
            steps.append(K.RandomHorizontalFlip(p=spec.flip))
        if spec.jitter_p > 0 and any(spec.jitter):
            steps.append(K.ColorJitter(*spec.jitter, p=spec.jitter_p))
        if spec.grayscale > 0:
            steps.append(K.RandomGrayscale(p=spec.grayscale))
        if spec.blur > 0:
            steps.append(K.RandomGaussianBlur(_blur_kernel(spec.size), spec.blur_sigma, p=spec.blur))
        if spec.solarize > 0:
            # thresholds=0 -> exactly 0.5 (the reference code's 128 of 255); nothing added.
            steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=spec.solarize))
        self.photometric = K.AugmentationSequential(*steps) if steps else nn.Identity()
        # after the photometric ops: the partner is a view of its own
        self.mix = K.RandomMixUpV2(lambda_val=(0.0, spec.mix), p=1.0, data_keys=["input"]) if spec.mix > 0 else None

    def one(self, images: torch.Tensor) -> torch.Tensor:
        views = self.photometric(self.crop(images))
        return self.mix(views) if self.mix is not None else views

    def make(self, images: torch.Tensor, copies: int, batched: bool) -> list[torch.Tensor]:
        if copies > 1 and batched and self.mix is None:
            crops = torch.cat([self.crop(images) for _ in range(copies)])
            return list(self.photometric(crops).chunk(copies))
        return [self.one(images) for _ in range(copies)]


class ViewMaker(nn.Module):
    """Turns a batch of uint8 canvases into the recipe's normalised float views, on their device.

    Args:
        recipe: the views to make.
        batch_copies: crop each copy of a view kind (DINO's local crops) on its own, then run the
            photometric ops once over all of them (`_ViewKind`), instead of the whole
            augmentation once per copy. None (the default) decides per view kind: batched on a
            GPU and for views of at most BATCHED_CPU_MAX_SIZE px on a CPU, where it was measured
            to pay (benchmarks/performance/view_rates.py); True or False forces one path.

    Call with `canvases: (N, H, W, 3) uint8` (as streamed by the ingest) and get a list of
    `(N, 3, size, size) float32` tensors, one per entry of `recipe.names`.
    """

    def __init__(self, recipe: ViewRecipe, batch_copies: bool | None = None):
        super().__init__()
        recipe.validate()
        self.recipe = recipe
        self.batch_copies = batch_copies
        self.augmentations = nn.ModuleDict({name: _ViewKind(spec) for name, spec in recipe.views.items()})
        self.normalize = K.Normalize(mean=torch.tensor(recipe.mean), std=torch.tensor(recipe.std))
        self._denormalize = K.Denormalize(mean=torch.tensor(recipe.mean), std=torch.tensor(recipe.std))

    @torch.no_grad()
    def forward(self, canvases: torch.Tensor) -> list[torch.Tensor]:
        if canvases.dtype != torch.uint8 or canvases.ndim != 4 or canvases.shape[-1] != 3:
            raise ValueError(f"canvases must be (N, H, W, 3) uint8, got {tuple(canvases.shape)} {canvases.dtype}")
        images = canvases.permute(0, 3, 1, 2).float().div_(255)
        views = []
        for name, spec in self.recipe.views.items():
            batched = self.batch_copies
            if batched is None:
                batched = images.is_cuda or spec.size <= BATCHED_CPU_MAX_SIZE
            views.extend(self.normalize(view) for view in self.augmentations[name].make(images, spec.copies, batched))
        return views

    def whole_canvas(self, canvases: torch.Tensor, size: int) -> torch.Tensor:
        """Deterministic input for evaluation: the whole canvas resized to `size` and normalised
        like the views. `(N, H, W, 3) uint8 -> (N, 3, size, size) float`."""
        images = canvases.permute(0, 3, 1, 2).float().div_(255)
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                                     align_corners=False)
        return self.normalize(images)

    def denormalize(self, view: torch.Tensor) -> torch.Tensor:
        """Back to [0, 1] RGB for display. `view: (N, 3, h, w)`."""
        return self._denormalize(view).clamp(0, 1)
