"""The Method interface: everything the method-agnostic pipeline needs from a method.

A method is one file in `methods/` that subclasses `Method`. It owns its modules (a timm backbone
and heads), its view recipe, its loss (computed in `forward` so DistributedDataParallel sees the
call), its per-step hooks, its optimizer and weight-decay groups, its LR-scaling rule, its
hyperparameters with validation, its presets and default search space, `features()` for
evaluation, and the optional capabilities it declares. `register` adds it to the registry, which
importing the `methods` package fills by importing every module in it: the CLI's choices, Tune's
default spaces and the tests' fixtures all come from the registry.

The contract is stated in code: the abstract methods every method implements, the attributes the
pipeline reads (`sync_bn`; the `group` tag of every optimizer group, which weight-decay schedules
rely on), and what each capability needs. `register` checks the class, so a method that breaks the
contract fails at import with one line, not on a training worker; `checked_groups` checks the
groups an instance makes.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from methods.backbone import DECAY, NO_DECAY, BackboneConfig, create_backbone, decay_groups
from methods.checks import typed_values
from methods.views import ViewMaker, ViewRecipe

METHODS: dict[str, type[Method]] = {}
# capability -> the methods a class that declares it must implement (beyond the base's refusal)
CAPABILITIES = {"reconstruct": ("masking", "patch_mask", "reconstruct"), "attention": ("last_attention",)}


# The agreement with labels (Spearman against kNN) a label-free objective needs before a search's
# first trial is offered without a caveat (issue 36's bar), over at least TRUSTED_TRIALS trials:
# SimCLR's best metric of each 8-trial search lost the next search (docs/FINDINGS.md,
# "Label-free model selection"), so one search's figure is not yet a measured agreement.
TRUSTED_SPEARMAN = 0.5
TRUSTED_TRIALS = 16


@dataclasses.dataclass(frozen=True)
class LabelFreeObjective:
    """What `selfsup tune` ranks a method's trials by when the search has no labeled `--val`: a
    metric of the probe set (pipelines/evaluate/label_free.py) and its direction, with the
    agreement the label-free study measured between it and the trials' kNN top-1 (Spearman over
    `trials` trials; None where unmeasured). The study: docs/FINDINGS.md, "Label-free model
    selection"."""

    metric: str = "rankme"
    mode: str = "max"
    spearman: float | None = None
    trials: int = 0

    def agreement(self, method: str) -> str:
        """One line on how far this objective can be trusted, for the console and trials.md."""
        if self.spearman is None:
            return (f"its agreement with labels is not measured for {method}: treat the ranking as a screen against "
                    "collapse and give a small labeled --val where you have one")
        measured = (f"it ranked {self.trials} {method} trials against their kNN at Spearman {self.spearman:+.3g} "
                    "(docs/FINDINGS.md, \"Label-free model selection\")")
        if self.spearman < TRUSTED_SPEARMAN:
            return measured + (f", under the {TRUSTED_SPEARMAN:+.1f} a trusted objective needs: give a small labeled "
                               "--val where you have one")
        if self.trials < TRUSTED_TRIALS:
            return measured + (f", over fewer than the {TRUSTED_TRIALS} trials a trusted objective needs (one "
                               "search's winner can lose the next): give a small labeled --val where you have one")
        return measured


@dataclasses.dataclass(frozen=True)
class HealthScale:
    """What a method's healthy runs show at their last report: the embeddings' spread
    (`embedding_std`) and the probe's RankMe fraction. Reports divide by it (`spread_vs_healthy`,
    `rank_vs_healthy`), so about 1 reads as healthy for every method, and the collapse flag fires
    at a share of it (pipelines/evaluate/label_free.py). A method's file states its medians over
    the label-free searches' runs (docs/BENCHMARKS.md, "Health on one scale per method"); the
    defaults, for a method that has not measured its own, are evenly spread embeddings and
    SimCLR's ResNet."""

    embedding_std: float = 1.0
    rankme_fraction: float = 0.16


class MethodContractError(TypeError):
    """A method class that breaks the `Method` contract; its message is one line naming the class."""


def register(cls: type[Method]) -> type[Method]:
    """Adds `cls` to the registry after checking it against the contract (`contract_problems`)."""
    problems = contract_problems(cls)
    if problems:
        raise MethodContractError(f"{cls.__module__}.{cls.__qualname__}: {'; '.join(problems)} "
                                  "(the Method contract: methods/base.py)")
    METHODS[cls.name] = cls
    return cls


def contract_problems(cls: type) -> list[str]:
    """What `cls` lacks to be a registered method; [] when it keeps the contract."""
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        return ["not a subclass of methods.base.Method"]
    problems = []
    if cls.__abstractmethods__:
        problems.append(f"does not implement {', '.join(sorted(cls.__abstractmethods__))}")
    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and name.isidentifier() and name == name.lower()):
        problems.append(f"name={name!r} must be a lowercase identifier")
    elif name in METHODS and METHODS[name].__qualname__ != cls.__qualname__:
        problems.append(f"name {name!r} is already {METHODS[name].__module__}.{METHODS[name].__qualname__}")
    hparams = getattr(cls, "Hyperparameters", None)
    if not (dataclasses.is_dataclass(hparams) and callable(getattr(hparams, "validate", None))):
        problems.append("Hyperparameters must be a dataclass with validate()")
    if cls.lr_scaling not in ("linear", "sqrt"):
        problems.append(f"lr_scaling={cls.lr_scaling!r} must be linear or sqrt")
    if "tiny" not in cls.presets:
        problems.append("presets must hold `tiny` (the tests' and the smoke runs')")
    if cls.default_preset not in cls.presets:
        problems.append(f"default_preset={cls.default_preset!r} is not one of its presets")
    if not (isinstance(cls.search_space, list) and all(isinstance(d, str) for d in cls.search_space)):
        problems.append("search_space must be a list of NAME=DIST(ARGS) strings")
    if not (isinstance(cls.label_free, LabelFreeObjective) and cls.label_free.mode in ("max", "min")):
        problems.append("label_free must be a LabelFreeObjective with mode max or min")
    if not (isinstance(cls.health, HealthScale) and cls.health.embedding_std > 0 and cls.health.rankme_fraction > 0):
        problems.append("health must be a HealthScale of positive values")
    if not isinstance(cls.smoke_sets, dict):
        problems.append("smoke_sets must be a dict of --set overrides")
    for capability in sorted(cls.capabilities):
        needs = CAPABILITIES.get(capability)
        if needs is None:
            problems.append(f"capability {capability!r} is unknown (known: {', '.join(sorted(CAPABILITIES))})")
            continue
        missing = [hook for hook in needs
                   if inspect.getattr_static(cls, hook) is inspect.getattr_static(Method, hook)]
        if missing:
            problems.append(f"capability {capability!r} needs {', '.join(missing)}")
    if not isinstance(inspect.getattr_static(cls, "sync_bn"), property):
        problems.append("sync_bn is read from the hyperparameters (a `sync_bn` field), not set on the class")
    return problems


def checked_groups(groups: list[dict]) -> list[dict]:
    """`groups` (a method's `param_groups`), refused in one line unless every group holds
    `params` and a `group` tag, DECAY or NO_DECAY: weight-decay schedules (DINO's) touch DECAY
    groups only."""
    for index, group in enumerate(groups):
        if "params" not in group or group.get("group") not in (DECAY, NO_DECAY):
            raise MethodContractError(f"param_groups()[{index}] must hold params and a group tag ({DECAY!r} or "
                                      f"{NO_DECAY!r}), got keys {sorted(group)} with group={group.get('group')!r}")
    return groups


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Weight decay on the DECAY groups (biases and norms keep none)."""
    for group in optimizer.param_groups:
        if group.get("group") == DECAY:
            group["weight_decay"] = weight_decay


class Method(nn.Module, abc.ABC):
    """Base class. Subclasses set the class attributes and implement the abstract methods.

    Class attributes:
        name: registry key (`simclr`, `mae`, `dino`).
        Hyperparameters: a dataclass of the method's hyperparameters with `validate()`.
        lr_scaling: `linear` (base x B/256) or `sqrt` (base x sqrt(B)), in the global batch.
        presets: partial run configs by preset name (`tiny` for the CPU sample, `imagenet`).
        default_preset: the preset a run gets when it names none: the recipe that measured best
            on the bundled sample (`tiny` unless a method's file says why another).
        search_space: the `selfsup tune --space` dimensions searched when the user names none.
        label_free: the `LabelFreeObjective` a search without `--val` ranks trials by (RankMe,
            unmeasured, unless the method's file states the study's choice).
        health: the `HealthScale` its reports' health indicators and collapse flag are read on.
        smoke_sets: `--set` overrides on the `tiny` preset for the smallest run that goes through
            the whole pipeline (16 px views, a network of under a million weights): what the test
            suite trains every registered method with.
        capabilities: optional abilities the CLI may use: "reconstruct" (`viz mae`: the method
            implements `masking`, `patch_mask` and `reconstruct`), "attention" (`viz attention`: it
            implements `last_attention`); `register` checks the implementations are there.

    Abstract (every method implements them): `default_recipe`, `forward`, `make_optimizer`.
    Read by the pipeline: `sync_bn` (from the hyperparameters), `param_groups` (tagged groups),
    `eval_size`, and the hooks, whose defaults do nothing.
    """

    name: ClassVar[str]
    Hyperparameters: ClassVar[type]
    lr_scaling: ClassVar[str] = "linear"
    presets: ClassVar[dict[str, dict]] = {}
    default_preset: ClassVar[str] = "tiny"
    search_space: ClassVar[list[str]] = []
    label_free: ClassVar[LabelFreeObjective] = LabelFreeObjective()
    health: ClassVar[HealthScale] = HealthScale()
    smoke_sets: ClassVar[dict[str, Any]] = {}
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, backbone: BackboneConfig, hparams: Any, recipe: ViewRecipe):
        super().__init__()
        self.hparams = hparams
        self.recipe = recipe
        self.backbone = create_backbone(backbone)
        self.view_maker = ViewMaker(recipe)
        self.eval_size = recipe.views[next(iter(recipe.views))].size

    @property
    def sync_bn(self) -> bool:
        """BatchNorm becomes SyncBatchNorm on several workers: the hyperparameters' `sync_bn`
        field, for methods that have one (the global BN of SimCLR and BYOL)."""
        return bool(getattr(self.hparams, "sync_bn", False))

    @classmethod
    def pinned(cls, hparams: Any, recipe: ViewRecipe) -> Any:
        """The hyperparameters with what they point to outside the config checked and pinned, once
        on the driver before a run starts (`pipelines.config.pinned_config`): distillation reads its
        teacher's file, refuses a misfit and records the file's hash. The run's config, checkpoints
        and a rerun's comparison hold what comes back, so a changed file is refused like any changed
        setting, and a key ending in `_sha256` even by `--resume`. Refusals are ValueError, one line.
        By default `hparams` unchanged."""
        return hparams

    # --- views -------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        """The paper's views with the main view `size` px square (other views scale with it); a
        config's `views` overrides are applied on top of this."""

    @classmethod
    def display_recipe(cls, size: int) -> ViewRecipe:
        """The recipe `viz augment` draws for a `size` px canvas: by default the training one."""
        return cls.default_recipe(size)

    def views(self, canvases: torch.Tensor) -> list[torch.Tensor]:
        """`canvases: (N, H, W, 3) uint8` on the device -> the recipe's views, on the device."""
        return self.view_maker(canvases)

    def step_input(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """What a training step passes to `forward` from a batch `{"image": (N, H, W, 3) uint8, ...}`:
        the views of its images."""
        return self.views(batch["image"])

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
        return self.view_maker.whole_canvas(canvases, self.eval_size)

    # --- training ----------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss over this worker's views (global-batch semantics are the method's job) and
        statistics: `embeddings: (N, d)` for the collapse indicator, plus any detached scalar
        tensors, which the pipeline averages over each report window and passes to `diagnose`."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups, each tagged `group`: DECAY or NO_DECAY (`checked_groups`); by default
        weight decay on all but biases and norms."""
        return decay_groups(self, weight_decay)

    @abc.abstractmethod
    def make_optimizer(self, groups: list[dict], lr: float, optim: Any) -> torch.optim.Optimizer:
        """The method's optimizer over `groups` (`param_groups`) at the peak LR `lr`; `optim` is
        the run's optimizer config (momentum, betas, ...)."""

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
    (CUDA and CPU): one kernel updates every parameter instead of a chain of multi-tensor ops
    (docs/BENCHMARKS.md, "Step options": what it saves per step)."""
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
    hparams = cls(**typed_values(section, cls, values))
    hparams.validate()
    return hparams
