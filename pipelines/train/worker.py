"""One Ray Train worker's training objects, built at every (re)start of the group: the method,
wrapped for the group (DDP on several workers, channels-last, compiled), its optimizer, and where
the run is (`Progress`), restored from the latest checkpoint when there is one (`start_worker`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from methods import Method
from methods.base import checked_groups
from pipelines.config import RunConfig, build_method
from pipelines.console import log
from pipelines.evaluate.features import autocast_for
from pipelines.train.plan import BatchPlan, RunPlan
from pipelines.weights.checkpoint import CheckpointDamaged, load_state, newest_loadable, set_rng_state


@dataclass
class Progress:
    """Where a run is, saved in every checkpoint (as a plain dict) and restored on resume. Images
    are counted besides steps because an elastic group may step with another global batch."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    samples_in_epoch: int = 0
    world_size: int = 0

    def position(self, recipe_batch: int) -> float:
        """Where the schedules are: images seen, in steps of the recipe's global batch (fractional
        only when an elastic group cannot keep that batch)."""
        return self.samples / recipe_batch

    def stepped(self, images: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.samples += images
        self.samples_in_epoch += images

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = self.samples_in_epoch = 0

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if f.name in state})


@dataclass
class Worker:
    """One worker's training objects, built at every (re)start of the group."""

    config: RunConfig
    plan: RunPlan
    batches: BatchPlan  # the plan's split at this start's world size: an elastic group may come back resized
    rank: int
    world: int
    device: torch.device
    method: Method
    model: torch.nn.Module  # the method, wrapped in DistributedDataParallel on several workers
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    resumed_from: int = 0
    warned: set = dataclasses.field(default_factory=set)  # warnings given once per run


def wrap_model(method: torch.nn.Module, world: int, device: torch.device, compile: bool = False,
               channels_last: bool = False) -> torch.nn.Module:
    """What the step calls: the method on its device (its weights in channels-last memory when
    asked: feed it `as_step_input` views), in DDP when there are several workers, compiled when
    asked (the method itself stays the uncompiled module that checkpoints save)."""
    if channels_last:
        method.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(method) if world > 1 else method.to(device)
    return torch.compile(model) if compile else model


def as_step_input(views: list[torch.Tensor], channels_last: bool) -> list[torch.Tensor]:
    """The step's input, views in channels-last memory when asked (other tensors, labels, as they are)."""
    if not channels_last:
        return views
    return [view.contiguous(memory_format=torch.channels_last) if view.dim() == 4 else view for view in views]


def step_threads(torch_threads: int, cpus_per_worker: float, node_cpus: float, workers_on_node: int) -> int:
    """A worker's intra-op threads: `train.torch_threads` when set, else the node's CPUs shared
    among the training workers on it (at least `cpus_per_worker`). The decode tasks share those
    cores through the OS, and at small sizes need a fraction of one (docs/BENCHMARKS.md, "One
    stream across epochs, and the cores for the step"). Set `train.torch_threads` where decoding
    needs the cores (large images on a CPU node)."""
    if torch_threads:
        return torch_threads
    return max(1, int(cpus_per_worker), int(node_cpus // max(1, workers_on_node)))


def start_worker(config: RunConfig, loop_config: dict) -> tuple[Worker, Progress]:
    """Build the method, wrap it for this group, and restore the latest checkpoint if there is one."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if config.data.decode == "gpu" and device.type != "cuda":
        raise ValueError(f"data.decode=gpu: worker {rank} on {device} has no CUDA device; use data.decode=cpu")
    node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
    torch.set_num_threads(step_threads(config.train.torch_threads, config.train.cpus_per_worker,
                                       node["Resources"].get("CPU", 1), context.get_local_world_size()))
    plan: RunPlan = loop_config["plan"]
    batches = plan.batches(world)
    method = (loop_config.get("build") or build_method)(config)  # fine-tuning builds its classifier
    if loop_config.get("init_weights") is not None:  # a checkpoint, when resuming, overrides it below
        method.init_encoder(ray.get(loop_config["init_weights"]))
    if method.sync_bn and world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model = wrap_model(method, world, device, config.train.compile, config.train.channels_last)
    optimizer = method.make_optimizer(checked_groups(method.param_groups(config.optim.weight_decay)), plan.peak_lr,
                                      config.optim)
    autocast, use_scaler = autocast_for(config.train.precision, device)
    worker = Worker(config, plan, batches, rank, world, device, method, model, optimizer,
                    torch.amp.GradScaler(device.type, enabled=use_scaler), autocast)
    progress = Progress(world_size=world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = resume_state(checkpoint, rank)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        worker.scaler.load_state_dict(state["scaler"])
        progress = Progress.from_state(state["progress"])
        set_rng_state(state["rng"], rank)
        worker.resumed_from = progress.step
        if rank == 0:
            log.info(f"resumed from step {progress.step} (epoch {progress.epoch})")
    else:
        torch.manual_seed(config.train.seed * 1000 + rank)  # different views on every worker
    if rank == 0 and progress.world_size not in (0, world):
        log.info(f"resized {progress.world_size} -> {world} workers at step {progress.step}: {batches.describe()}")
    elif rank == 0 and (not batches.exact or batches.accumulation > 1):
        log.info(f"batch: {batches.describe()}")
    progress.world_size = world
    return worker, progress


def resume_state(checkpoint, rank: int) -> dict:
    """The state of Ray's latest checkpoint or, when that one is damaged (a crash while it was
    copied, a full disk), of the newest older one in the run folder that loads: retrying the
    damaged file would fail the same way every time."""
    with checkpoint.as_directory() as folder:
        try:
            return load_state(folder)
        except CheckpointDamaged as damaged:
            fallback = newest_loadable(os.path.dirname(checkpoint.path.rstrip("/")), below=checkpoint.path)
            if fallback is None:
                raise
            if rank == 0:
                log.warning(f"{damaged}; resuming from the previous checkpoint {fallback[0]}")
            return fallback[1]
