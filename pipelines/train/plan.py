"""A run's plan: its steps and LR schedule (`plan`), and the batch policy of elastic runs: the
recipe's global batch, whatever the world size (`batch_plan`).

Ray Train's elastic scaling (`ScalingConfig(num_workers=(min, max))`) restarts the worker group
from the last checkpoint with as many workers as the cluster holds. For self-supervised methods
the global batch is part of the recipe: it sets SimCLR's negatives, every method's learning rate
and DINO's center statistics. So at every (re)start of the group the per-worker batch, and where
`optim.max_worker_batch` requires it gradient accumulation, are derived again from the recipe's
global batch and the new world size. When the world size does not divide it, the nearest smaller
global batch is used, said in one log line, and the method's LR-scaling rule is applied to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from methods.schedules import scaled_lr, warmup_cosine
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
        split = f"{self.world_size} workers x {self.worker_batch} images" + (
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


@dataclass(frozen=True)
class Schedule:
    """A run's plan for the recipe's global batch (`plan`): its steps and its LR schedule, linear
    warmup from 0 to `peak_lr` (the base LR scaled by `lr_scaling`), then cosine to `min_lr`."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    lr_scaling: str
    min_lr: float

    def lr_at(self, position: float) -> float:
        """The LR at `position` (images seen, in steps of the recipe's global batch)."""
        return warmup_cosine(position, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)


def plan(config: RunConfig, train_rows: int) -> Schedule:
    """Steps per epoch, total steps, warmup steps and the scaled peak LR for the global batch."""
    steps_per_epoch = train_rows // config.optim.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"optim.batch_size={config.optim.batch_size}: larger than the {train_rows} training images"
        )
    rule = config.lr_rule()
    return Schedule(steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * config.optim.epochs,
                    warmup_steps=int(round(config.optim.warmup_epochs * steps_per_epoch)),
                    peak_lr=scaled_lr(config.optim.base_lr, config.optim.batch_size, rule), lr_scaling=rule,
                    min_lr=config.optim.min_lr)
