"""DINO: self-distillation with no labels.

Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin. "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021. A student network is trained to match the output distribution of a
teacher network over K dimensions across multi-crop views: the teacher sees the two global crops,
the student every crop, and the loss averages the cross-entropy H(teacher(view i), student(view j))
over every pair i != j. The teacher is an exponential moving average of the student and never gets
gradients. Collapse is avoided by centering (subtracting a running mean of the teacher's outputs,
all-reduced across workers) and sharpening (a low teacher temperature).
"""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from methods.backbone import vit_last_attention
from methods.base import HealthScale, LabelFreeObjective, Method, adamw, ema_update, register, set_weight_decay
from methods.checks import check_rules
from methods.distributed import all_reduce_mean
from methods.regularizers import koleo_loss
from methods.schedules import warmup_cosine
from methods.views import ViewRecipe, ViewSpec


def dino_recipe(global_size: int = 224, local_size: int = 96, local_copies: int = 8) -> ViewRecipe:
    """Multi-crop (Caron et al., 2021, `DataAugmentationDINO` of the reference code): two global
    crops (0.4-1; blur 1.0 / 0.1, solarize on the second) and N local crops (0.05-0.4)."""
    jitter = (0.4, 0.4, 0.2, 0.1)
    return ViewRecipe(
        {
            "global1": ViewSpec(size=global_size, scale=(0.4, 1.0), jitter=jitter, blur=1.0),
            "global2": ViewSpec(size=global_size, scale=(0.4, 1.0), jitter=jitter, blur=0.1, solarize=0.2),
            "local": ViewSpec(size=local_size, scale=(0.05, 0.4), jitter=jitter, blur=0.5, copies=local_copies),
        }
    )

log = logging.getLogger("selfsup")  # the pipeline decides where its lines go (pipelines/console.py)


class DINOHead(nn.Module):
    """MLP (Linear-GELU x2, Linear to the bottleneck) -> L2-normalise -> weight-normalised Linear
    to `out_dim` without bias.

    Args:
        in_dim: the backbone's feature width.
        out_dim: K, the number of output dimensions (65,536 at ImageNet scale).
        hidden_dim, bottleneck_dim: 2048 and 256 in the paper.
        norm_last_layer: fix the weight-norm magnitude g to 1 (the paper's default for ViT-S;
            more stable, slightly lower accuracy).
        batch_norm: BatchNorm after the hidden layers (the reference code's `use_bn_in_head`).
    `forward(x: (N, in_dim)) -> (N, out_dim)` logits.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, batch_norm: bool = False):
        super().__init__()

        def hidden(width_in: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            return [nn.Linear(width_in, hidden_dim), *norm, nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher distribution of each global view and
    the student distribution of every other view, averaged over the pairs and the batch.

    Args:
        out_dim: K.
        student_temp: student softmax temperature (0.1).
        center_momentum: center <- m * center + (1 - m) * batch mean of teacher outputs (0.9).
            The batch mean is all-reduced across workers, so every worker holds the same center.
        centering: subtract the center from teacher outputs (off only for collapse ablations).
        global_views: G, how many views the teacher sees (2).

    Inputs: `student_out: (V * n, K)` logits of V views, view-major (rows v*n..(v+1)*n-1 are
    view v); `teacher_out: (G * n, K)` logits of the G global views, in the same order as the
    student's first G views; `teacher_temp` for this step.
    Output: the loss and detached statistics (teacher entropy, teacher-student KL, entropy of
    the batch-mean teacher distribution, center norm) for collapse monitoring.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: bool = True, global_views: int = 2):
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"student_temp={student_temp!r}: must be > 0")
        if not 0 <= center_momentum < 1:
            raise ValueError(f"center_momentum={center_momentum!r}: must be in [0, 1)")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.global_views = global_views
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending, self._pending_passes = None, 0

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float):
        n = teacher_out.shape[0] // self.global_views
        if teacher_out.shape[0] != n * self.global_views or student_out.shape[0] % n or student_out.shape[1] != teacher_out.shape[1]:
            raise ValueError(
                f"student_out {tuple(student_out.shape)} / teacher_out {tuple(teacher_out.shape)}: expected "
                f"(V * n, K) and ({self.global_views} * n, K)"
            )
        teacher_out = teacher_out.detach().float()
        student_views = student_out.float().div(self.student_temp).split(n)
        shifted = teacher_out - self.center if self.centering else teacher_out
        teacher_probs = F.softmax(shifted / teacher_temp, dim=-1)

        total, pairs = 0.0, 0
        for i, target in enumerate(teacher_probs.split(n)):
            for j, logits in enumerate(student_views):
                if i == j:  # the same crop for teacher and student: trivially matched, no signal
                    continue
                total = total + torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
                pairs += 1
        loss = total / pairs
        with torch.no_grad():
            entropy = -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-12))).sum(-1).mean()
            batch_probs = all_reduce_mean(teacher_probs.mean(0))
            batch_entropy = -(batch_probs * torch.log(batch_probs.clamp_min(1e-12))).sum()
            stats = {
                "teacher_entropy": entropy,
                "teacher_student_kl": loss.detach() - entropy,
                "teacher_batch_entropy": batch_entropy,
                "center_norm": self.center.norm(),
            }
        self.accumulate_center(teacher_out)
        return loss, stats

    @torch.no_grad()
    def accumulate_center(self, teacher_out: torch.Tensor) -> None:
        """`teacher_out: (G * n, K)` raw teacher logits of one forward pass, kept for the step's
        center update (several passes per step under gradient accumulation)."""
        mean = teacher_out.mean(dim=0, keepdim=True)
        self._pending = mean if self._pending is None else self._pending + mean
        self._pending_passes += 1

    @torch.no_grad()
    def update_center(self) -> None:
        """Once per optimizer step: center <- m * center + (1 - m) * the mean teacher output of
        the step's whole global batch (every worker's rows, every accumulated pass: passes have
        equal size, so the mean of their means is the batch mean)."""
        if self._pending is None:
            return
        batch_center = all_reduce_mean(self._pending / self._pending_passes)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
        self._pending, self._pending_passes = None, 0


@dataclass
class DINOHyperparameters:
    """Args:
    out_dim: K, the head's output dimensions (65,536 at ImageNet scale).
    hidden_dim, bottleneck_dim: the head's MLP (2048 -> 256).
    norm_last_layer: weight-norm magnitude of the last layer fixed to 1.
    head_batch_norm: BatchNorm in the head's MLP (`use_bn_in_head`; per-worker statistics).
    freeze_last_layer_epochs: the last layer gets no updates for this many epochs (1).
    teacher_momentum: EMA momentum at step 0; it follows a cosine to 1 at the last step (0.996).
    warmup_teacher_temp, teacher_temp, teacher_temp_warmup_epochs: the teacher temperature rises
        linearly per epoch from the first to the second over the warmup epochs (0.04 -> 0.07, 30).
    student_temp: 0.1; center_momentum: 0.9.
    centering: subtract the center (off only for collapse ablations).
    weight_decay_end: weight decay follows a cosine from optim.weight_decay (0.04) to this (0.4).
    koleo_weight: DINOv2's KoLeo term (`koleo_loss`) on the student's backbone features of each
        global view, summed over the views, times this (0: the DINO paper; DINOv2 uses 0.1).
    """

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    head_batch_norm: bool = False
    freeze_last_layer_epochs: int = 1
    teacher_momentum: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    centering: bool = True
    weight_decay_end: float = 0.4
    koleo_weight: float = 0.0

    def validate(self) -> None:
        value = functools.partial(getattr, self)
        check_rules("hparams", self, {
            **{key: (isinstance(value(key), int) and value(key) >= 2, "an integer >= 2")
               for key in ("out_dim", "hidden_dim", "bottleneck_dim")},
            **{key: (isinstance(value(key), int) and value(key) >= 0, "an integer >= 0")
               for key in ("freeze_last_layer_epochs", "teacher_temp_warmup_epochs")},
            **{key: (0 <= value(key) < 1, "in [0, 1)") for key in ("teacher_momentum", "center_momentum")},
            **{key: (0 < value(key) <= 10, "in (0, 10]") for key in ("warmup_teacher_temp", "teacher_temp", "student_temp")},
            "weight_decay_end": (0 <= self.weight_decay_end < 1, "in [0, 1)"),
            "koleo_weight": (0 <= self.koleo_weight <= 10, "in [0, 10]"),
            **{key: (isinstance(value(key), bool), "true or false") for key in ("norm_last_layer", "head_batch_norm", "centering")},
        })


# Collapse signatures (Caron et al. 2021, section 5.3 and figure 7), as fractions of ln K; the
# thresholds were set on the runs of docs/FINDINGS.md, "DINO: centering and sharpening".
DOMINANT_BATCH_ENTROPY = 0.1  # the batch-mean teacher distribution sits on ~1 dimension
UNIFORM_TEACHER_ENTROPY = 0.95  # every teacher output is (near) uniform: the loss sits at ln K
UNIFORM_KL = 0.03  # ... and the student matches it (0.01 flagged no run that had collapsed)
# Slow drift, seen before either end state: a teacher entropy moving the same way at every one of
# DRIFT_REPORTS reports, in all by DRIFT_FRACTION of ln K or DRIFT_RELATIVE of its own value (a
# sharp teacher drifts from a small entropy), while the embeddings' spread falls by
# DRIFT_SPREAD_FALL of itself (a healthy start lowers the entropy with the spread steady). The
# runs these were set on: docs/BENCHMARKS.md, "DINO at small scale: 30 epochs on MNIST-M".
DRIFT_REPORTS = 4
DRIFT_FRACTION = 0.05
DRIFT_RELATIVE = 0.1
DRIFT_SPREAD_FALL = 0.05


@register
class DINO(Method):
    name = "dino"
    Hyperparameters = DINOHyperparameters
    lr_scaling = "linear"
    capabilities = frozenset({"attention"})
    search_space = ["teacher_temp=loguniform(0.01, 0.07)", "batch_size=choice(64, 128, 256)"]
    # The label-free study's best on two searches of digits (FINDINGS.md, "Label-free model selection";
    # tests/test_tune.py); its healthy runs' medians (BENCHMARKS.md, "Health on one scale per method").
    label_free = LabelFreeObjective("uniformity", "min", spearman=0.31, trials=16)
    health = HealthScale(embedding_std=0.97, rankme_fraction=0.23)
    # The tiny preset at 16 px: 2 global + 2 local crops, a 2-block ViT of width 32.
    smoke_sets = {"views.global1.size": 16, "views.global2.size": 16, "views.local.size": 8, "views.local.copies": 2,
                  "backbone.img_size": 16, "backbone.kwargs.embed_dim": 32, "backbone.kwargs.depth": 2,
                  "backbone.kwargs.num_heads": 2, "hparams.out_dim": 256, "hparams.hidden_dim": 64,
                  "hparams.bottleneck_dim": 32, "optim.base_lr": 2e-3}
    presets = {
        # A ViT of width 96, depth 4, patch 4: 32 px global crops (64 tokens), 16 px locals. BatchNorm
        # in the head and a sharper teacher, because at this scale the paper's head collapses to a
        # uniform output (docs/BENCHMARKS.md, "DINO pretraining on the sample").
        "tiny": {
            "backbone": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4,
                         "kwargs": {"embed_dim": 96, "depth": 4, "num_heads": 3, "dynamic_img_size": True}},
            "hparams": {"out_dim": 1024, "hidden_dim": 512, "bottleneck_dim": 128, "head_batch_norm": True,
                        "teacher_momentum": 0.99, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02,
                        "teacher_temp_warmup_epochs": 0},
            "views": {"global1.size": 32, "global2.size": 32, "local.size": 16, "local.copies": 4},
            "data": {"canvas_size": 32},
            "optim": {"epochs": 10, "batch_size": 256, "base_lr": 2e-3, "warmup_epochs": 1,
                      "weight_decay": 0.04, "clip_grad": 3.0},
        },
        # The paper's ViT-S/16: batch 1024, lr 5e-4 x B/256, 10 warmup epochs, 8 local crops.
        "imagenet": {
            "backbone": {"name": "vit_small_patch16_224", "kwargs": {"dynamic_img_size": True}},
            "hparams": {"out_dim": 65536},
            "views": {"global1.size": 224, "global2.size": 224, "local.size": 96, "local.copies": 8},
            "data": {"canvas_size": 256},
            "optim": {"epochs": 100, "batch_size": 1024, "base_lr": 5e-4, "warmup_epochs": 10,
                      "weight_decay": 0.04, "clip_grad": 3.0, "min_lr": 1e-6},
        },
    }

    @classmethod
    def default_recipe(cls, size: int = 224) -> ViewRecipe:
        """Global crops of `size`, eight local crops of 96/224 of it (the paper's ratio)."""
        return dino_recipe(size, max(4, round(size * 96 / 224)), 8)

    @classmethod
    def display_recipe(cls, size: int) -> ViewRecipe:
        return cls.default_recipe(size).with_overrides({"local.copies": 4})  # a picture of 6 views

    def __init__(self, backbone, hparams: DINOHyperparameters, recipe):
        super().__init__(backbone, hparams, recipe)
        names = recipe.names
        self.global_views = sum(name.startswith("global") for name in names)
        if self.global_views < 2 or not all(name.startswith("global") for name in names[: self.global_views]):
            raise ValueError(f"views: DINO needs two or more global views first, the recipe makes {names}")
        self.head = DINOHead(self.backbone.num_features, hparams.out_dim, hparams.hidden_dim,
                             hparams.bottleneck_dim, hparams.norm_last_layer, hparams.head_batch_norm)
        # The teacher starts as a copy of the student and only ever moves by EMA.
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.criterion = DINOLoss(hparams.out_dim, hparams.student_temp, hparams.center_momentum,
                                  hparams.centering, self.global_views)
        self.teacher_temp = hparams.warmup_teacher_temp
        self.weight_decay_start = 0.0
        self.eval_size = recipe.views[names[0]].size
        self.recent_reports: collections.deque = collections.deque(maxlen=DRIFT_REPORTS)
        self.drift_warned = ""

    # --- the schedules -------------------------------------------------------------------
    def teacher_temp_at(self, epoch: int) -> float:
        """`linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)[epoch]`, then teacher_temp
        (the reference code's per-epoch schedule)."""
        warmup, start, end = self.hparams.teacher_temp_warmup_epochs, self.hparams.warmup_teacher_temp, self.hparams.teacher_temp
        if epoch >= warmup:
            return end
        return start if warmup == 1 else start + (end - start) * epoch / (warmup - 1)

    def momentum_at(self, step: int, total_steps: int) -> float:
        return warmup_cosine(step, total_steps, self.hparams.teacher_momentum, 1.0)

    def weight_decay_at(self, step: int, total_steps: int) -> float:
        return warmup_cosine(step, total_steps, self.weight_decay_start, self.hparams.weight_decay_end)

    # --- the Method interface --------------------------------------------------------------
    def student_forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass per run of equal-size views (global crops together, local crops
        together), then the head once. `views: [(n, 3, s_v, s_v)] * V` -> the head's logits
        `(V * n, K)` and the backbone's features `(V * n, d)`, both view-major."""
        runs = itertools.groupby(views, key=lambda view: view.shape[-2:])
        features = torch.cat([self.backbone(torch.cat(list(run))) for _, run in runs])
        return self.head(features), features

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`views: [(n, 3, S, S)] * G global + [(n, 3, s, s)] * L local` -> (the DINO loss, plus
        the KoLeo term when `koleo_weight` > 0; collapse statistics and the teacher's global-view
        features as `embeddings: (G * n, d)`)."""
        student_out, student_features = self.student_forward(views)
        with torch.no_grad():
            teacher_features = self.teacher_backbone(torch.cat(views[: self.global_views]))
            teacher_out = self.teacher_head(teacher_features)
        loss, stats = self.criterion(student_out, teacher_out, self.teacher_temp)
        if self.hparams.koleo_weight > 0:
            koleo = sum(koleo_loss(view) for view in student_features[: len(teacher_features)].chunk(self.global_views))
            stats["koleo"] = koleo.detach()
            loss = loss + self.hparams.koleo_weight * koleo
        stats["embeddings"] = teacher_features.detach()
        return loss, stats

    def param_groups(self, weight_decay: float) -> list[dict]:
        self.weight_decay_start = weight_decay
        return super().param_groups(weight_decay)

    def make_optimizer(self, groups, lr, optim):
        return adamw(groups, lr, optim.betas)

    def before_step(self, step: float, total_steps: int, epoch: int, optimizer) -> dict[str, float]:
        self.teacher_temp = self.teacher_temp_at(epoch)
        weight_decay = self.weight_decay_at(step, total_steps)
        set_weight_decay(optimizer, weight_decay)
        return {"teacher_temp": self.teacher_temp, "weight_decay": weight_decay,
                "teacher_momentum": self.momentum_at(step, total_steps)}

    def on_gradients(self, step: int, epoch: int) -> None:
        """The last layer is frozen during the first epoch(s): dropping its gradients makes AdamW
        skip it entirely (no update, no weight decay), as the reference code does."""
        if epoch < self.hparams.freeze_last_layer_epochs:
            for parameter in self.head.last_layer.parameters():
                parameter.grad = None

    @torch.no_grad()
    def after_step(self, step: float, total_steps: int) -> None:
        """The step's center update, then teacher <- m * teacher + (1 - m) * student, with m on
        its cosine schedule."""
        self.criterion.update_center()
        ema_update([self.teacher_backbone, self.teacher_head], [self.backbone, self.head],
                   self.momentum_at(step, total_steps))

    def diagnose(self, metrics: dict[str, float]) -> dict[str, float]:
        """The collapse flag from a report's averaged statistics, with a warning when it trips."""
        ln_k = math.log(self.hparams.out_dim)
        reasons = []
        if metrics["teacher_batch_entropy"] < DOMINANT_BATCH_ENTROPY * ln_k:
            reasons.append(
                f"one dimension dominates the teacher output (batch entropy {metrics['teacher_batch_entropy']:.3f} "
                f"of ln K = {ln_k:.2f}); check that centering is on and center_momentum < 1"
            )
        if metrics["teacher_entropy"] > UNIFORM_TEACHER_ENTROPY * ln_k and metrics["teacher_student_kl"] < UNIFORM_KL * ln_k:
            reasons.append(
                f"the teacher output is uniform and the loss sits at ln K = {ln_k:.2f} (teacher entropy "
                f"{metrics['teacher_entropy']:.3f}); sharpen: lower teacher_temp"
            )
        if reasons:
            log.warning(f"DINO collapse: {'; '.join(reasons)}")
        drift = self.drift(metrics)
        direction = drift.split(":")[0]
        if drift and direction != self.drift_warned:  # once per drift, not at every report of it
            log.warning(f"DINO drifting {drift}")
        self.drift_warned = direction
        return {"collapsed": float(bool(reasons)), "drifting": float(bool(drift))}

    def drift(self, metrics: dict[str, float]) -> str:
        """Which way the last DRIFT_REPORTS reports are drifting, with the knob to turn, or "".

        Towards uniform: the teacher's per-sample entropy rises at every report (its outputs
        flatten, the loss heads back to ln K) while the embeddings' spread falls. Towards one
        dimension: the entropy of the batch-mean teacher output falls at every report while the
        spread falls. Both are judged on trends, so a run warns before it reaches the end states
        `diagnose` flags."""
        self.recent_reports.append({k: metrics[k] for k in ("teacher_entropy", "teacher_batch_entropy", "embedding_std")})
        if len(self.recent_reports) < DRIFT_REPORTS:
            return ""
        ln_k, reports = math.log(self.hparams.out_dim), list(self.recent_reports)
        spread = [r["embedding_std"] for r in reports]
        if spread[-1] > spread[0] * (1 - DRIFT_SPREAD_FALL):
            return ""
        entropy, batch_entropy = ([r[k] / ln_k for r in reports] for k in ("teacher_entropy", "teacher_batch_entropy"))

        def moved(values: list[float], rising: bool) -> bool:  # at every report, and by enough in all
            steady = all((b > a) == rising and a != b for a, b in zip(values, values[1:]))
            return steady and abs(values[-1] - values[0]) >= min(DRIFT_FRACTION, DRIFT_RELATIVE * values[0])

        over = f"over the last {DRIFT_REPORTS} reports, embedding std {spread[0]:.3f} -> {spread[-1]:.3f}"
        if moved(entropy, rising=True):
            return (f"towards a uniform teacher output: teacher entropy {entropy[0]:.3g} -> {entropy[-1]:.3g} of ln K "
                    f"{over}; sharpen: lower hparams.teacher_temp (now {self.teacher_temp:g}) or raise "
                    f"hparams.teacher_momentum (now {self.hparams.teacher_momentum:g})")
        if moved(batch_entropy, rising=False):
            return (f"towards one dominant dimension: batch entropy {batch_entropy[0]:.3g} -> {batch_entropy[-1]:.3g} "
                    f"of ln K {over}; centre harder: lower hparams.center_momentum (now "
                    f"{self.hparams.center_momentum:g}) or raise hparams.teacher_temp (now {self.teacher_temp:g})")
        return ""

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's backbone (the better encoder, and the one DINO evaluates)."""
        return self.teacher_backbone(images)

    def encoder(self) -> nn.Module:
        return self.teacher_backbone

    @torch.no_grad()
    def init_encoder(self, weights: dict[str, torch.Tensor]) -> None:
        """Student and teacher start from the same weights, as they start from the same init."""
        self.backbone.load_state_dict(weights)
        self.teacher_backbone.load_state_dict(weights)

    @torch.no_grad()
    def last_attention(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's last-block class-token attention per head (`backbone.vit_last_attention`)."""
        return vit_last_attention(self.teacher_backbone, images)
