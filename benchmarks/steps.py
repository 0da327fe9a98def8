"""A method's training step without data, timed: what the benchmarks that measure the model alone
share (performance/step_options, pretrain_method, gpu_pipeline, gpu_check). `StepBench` builds
the method as a Ray Train worker does (`build_method`, `wrap_model`, the method's optimizer at
the recipe's peak LR, the run's autocast) with views made from random canvases; `timed` runs a
step function, skipping warm-up steps, and reads the clock after the device has finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from methods.base import checked_groups
from pipelines.config import RunConfig, build_method
from pipelines.evaluate.features import autocast_for
from pipelines.train.plan import peak_lr
from pipelines.train.worker import as_step_input, wrap_model


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    first_s: float  # the warm-up steps together (compilation, cuDNN autotuning, ...)
    step_s: float  # each timed step, on average

    def rate(self, images_per_step: int) -> float:
        return images_per_step / self.step_s


def timed(step: Callable[[int], Any], steps: int, warmup: int = 1, device: torch.device | None = None) -> Timing:
    """Runs `step(i)` for `warmup + steps` steps and times the last `steps`."""
    device = device or torch.device("cpu")
    started = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(device)
    first, timed_from = time.perf_counter() - started, time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync(device)
    return Timing(first, (time.perf_counter() - timed_from) / steps)


@dataclass
class StepBench:
    """One method's training step on views made once from random canvases (`build`)."""

    config: RunConfig
    device: torch.device
    method: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Any
    canvases: torch.Tensor
    channels_last: bool
    views: list[torch.Tensor]

    @classmethod
    def build(cls, config: RunConfig, device: torch.device | None = None, compile: bool | None = None,
              channels_last: bool | None = None, seed: int = 0) -> StepBench:
        """`compile` and `channels_last` default to the config's `train.compile` / `train.channels_last`."""
        device = device or torch.device("cpu")
        torch.manual_seed(seed)
        method = build_method(config)
        channels_last = config.train.channels_last if channels_last is None else channels_last
        model = wrap_model(method, 1, device, config.train.compile if compile is None else compile, channels_last)
        optimizer = method.make_optimizer(checked_groups(method.param_groups(config.optim.weight_decay)),
                                          peak_lr(config), config.optim)
        autocast, _ = autocast_for(config.train.precision, device)
        size = config.data.canvas_size
        canvases = torch.randint(0, 256, (config.optim.batch_size, size, size, 3), dtype=torch.uint8, device=device)
        bench = cls(config, device, method, model, optimizer, autocast, canvases, channels_last, [])
        bench.make_views()
        return bench

    @property
    def batch(self) -> int:
        return self.config.optim.batch_size

    def make_views(self, _: int = 0) -> None:
        """The method's step input from the canvases (its views, and distillation's teacher
        embeddings), as the worker loop makes it."""
        self.views = as_step_input(self.method.step_input({"image": self.canvases}), self.channels_last)

    def model_step(self, _: int = 0) -> torch.Tensor:
        """Forward, backward and optimizer step on the views made last; the loss, on the device."""
        with self.autocast:
            loss, _ = self.model(self.views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_step(self, step: int, total_steps: int = 1000) -> torch.Tensor:
        """The worker loop's whole step without data: new views, the method's hooks, forward,
        backward, clipping (`optim.clip_grad`) and the optimizer; the loss, on the device."""
        self.make_views()
        self.method.before_step(step, total_steps, 1, self.optimizer)
        with self.autocast:
            loss, _ = self.model(self.views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.config.optim.clip_grad)
        self.method.on_gradients(step, 1)
        self.optimizer.step()
        self.method.after_step(step, total_steps)
        return loss.detach()
