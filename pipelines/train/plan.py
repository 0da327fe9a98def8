"""A run's plan, made once on the driver before anything starts (`plan_run`) and handed to every
worker: its steps, its learning-rate schedule, and how the recipe's global batch splits at every
world size its worker group may take.

Ray Train's elastic scaling (`ScalingConfig(num_workers=(min, max))`) restarts the worker group
from the last checkpoint with as many workers as the cluster holds. For self-supervised methods
the global batch is part of the recipe: it sets SimCLR's negatives, every method's learning rate
and DINO's center statistics. So the plan holds a `BatchPlan` for each world size from the least
to the most workers: the per-worker batch and, where `optim.max_worker_batch` requires it,
gradient accumulation. When a world size does not divide the recipe's batch, the nearest smaller
global batch is used, said in one log line, and the method's LR-scaling rule is applied to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from methods.schedules import scaled_lr, warmup_cosine

if TYPE_CHECKING:  # a RunPlan travels to Train's controller, which then needs no timm (pipelines.config's)
    from pipelines.config import RunConfig


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split at a world size.

    Attributes:
        world_size: training workers.
        worker_batch: images per worker per forward pass (micro-batch).
        accumulation: forward/backward passes per optimizer step (gradient accumulation).
        global_batch: images per optimizer step = worker_batch x world_size x accumulation.
        recipe_batch: the config's `optim.batch_size`.
        lr_factor: the method's LR-scaling rule at global_batch over the same at recipe_batch
            (1.0 when the recipe's batch is kept).
    """

    world_size: int
    worker_batch: int
    accumulation: int
    global_batch: int
    recipe_batch: int
    lr_factor: float

    @property
    def exact(self) -> bool:
        return self.global_batch == self.recipe_batch

    def metrics(self) -> dict[str, float]:
        """What every report carries."""
        return {"world_size": self.world_size, "worker_batch": self.worker_batch,
                "accumulation_steps": self.accumulation, "global_batch": self.global_batch}

    def describe(self) -> str:
        split = f"{self.world_size} worker{'s' * (self.world_size > 1)} x {self.worker_batch} images" + (
            f" x {self.accumulation} accumulation steps" if self.accumulation > 1 else "")
        if self.exact:
            return f"{split} = global batch {self.global_batch} (the recipe's)"
        return (f"{split} = global batch {self.global_batch}, not the recipe's {self.recipe_batch} "
                f"(indivisible); learning rate x {self.lr_factor:.4f} by the method's scaling rule")


def batch_plan(recipe_batch: int, world_size: int, max_worker_batch: int = 0, rule: str = "linear") -> BatchPlan:
    """The split of `recipe_batch` over `world_size` workers, at most `max_worker_batch` images
    per worker per pass (0 = no limit). Prefers an exact split (using up to twice the least
    accumulation to find one); otherwise the largest global batch under the recipe's.

    >>> batch_plan(4096, 2, max_worker_batch=512).accumulation
    4
    >>> batch_plan(64, 3).global_batch
    63
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    least = 1 if not max_worker_batch else math.ceil(recipe_batch / (world_size * max_worker_batch))
    accumulation = next((a for a in range(least, 2 * least + 1) if recipe_batch % (world_size * a) == 0), least)
    worker_batch = recipe_batch // (world_size * accumulation)
    if worker_batch < 1:
        raise ValueError(f"optim.batch_size={recipe_batch}: fewer images than the {world_size} workers "
                         f"x {accumulation} accumulation steps")
    global_batch = worker_batch * world_size * accumulation
    lr_factor = scaled_lr(1.0, global_batch, rule) / scaled_lr(1.0, recipe_batch, rule)
    return BatchPlan(world_size, worker_batch, accumulation, global_batch, recipe_batch, lr_factor)


def peak_lr(config: RunConfig) -> float:
    """The recipe's peak LR: `optim.base_lr` scaled to `optim.batch_size` by the LR-scaling rule."""
    return scaled_lr(config.optim.base_lr, config.optim.batch_size, config.lr_rule())


@dataclass(frozen=True)
class RunPlan:
    """What a run does, for the recipe's global batch: its steps, its LR schedule (linear warmup
    from 0 to `peak_lr`, then cosine to `min_lr`), its worker range and the batch split at each
    world size in it (`splits[w - workers[0]]` for `w` workers).
    """

    train_rows: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    lr_scaling: str
    min_lr: float
    workers: tuple[int, int]
    splits: tuple[BatchPlan, ...]

    def lr_at(self, position: float) -> float:
        """The LR at `position` (images seen, in steps of the recipe's global batch)."""
        return warmup_cosine(position, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)

    def batches(self, world_size: int) -> BatchPlan:
        """The batch split for a group of `world_size` workers (an elastic group's size at its start)."""
        low, high = self.workers
        if not low <= world_size <= high:
            raise ValueError(f"{world_size} workers: outside the run's planned {low}-{high}")
        return self.splits[world_size - low]


def plan_run(config: RunConfig, train_rows: int, data: str = "the training shards") -> RunPlan:
    """The plan of a run of `config` over `train_rows` images (the shards at `data`, named in
    errors). Raises ValueError, in one line, when the images cannot fill one global batch or a
    world size of `train.workers` cannot split it."""
    batch, (low, high) = config.optim.batch_size, config.train.worker_range()
    if train_rows == 0:
        raise ValueError(f"--data {data}: the shards hold no images")
    if batch > train_rows:
        fits = train_rows - train_rows % high
        fix = f"use --set optim.batch_size={fits} or smaller" if fits else f"use at most {train_rows} workers"
        raise ValueError(f"optim.batch_size={batch}: larger than the {train_rows} training images in {data}; {fix}")
    rule = config.lr_rule()
    peak = peak_lr(config)
    if config.optim.lr_schedule == "cosine" and config.optim.min_lr > peak:
        raise ValueError(f"optim.min_lr={config.optim.min_lr:g}: above the peak LR {peak:.4g} at batch {batch}, so the "
                         "LR would rise after the warm-up; lower it, or hold the peak with optim.lr_schedule=constant")
    splits = tuple(batch_plan(batch, world, config.optim.max_worker_batch, rule) for world in range(low, high + 1))
    steps_per_epoch = train_rows // batch
    return RunPlan(train_rows=train_rows, steps_per_epoch=steps_per_epoch,
                   total_steps=steps_per_epoch * config.optim.epochs,
                   warmup_steps=int(round(config.optim.warmup_epochs * steps_per_epoch)),
                   peak_lr=peak, lr_scaling=rule,
                   min_lr=peak if config.optim.lr_schedule == "constant" else config.optim.min_lr,
                   workers=(low, high), splits=splits)
