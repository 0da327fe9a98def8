"""The method-agnostic training loop that runs on every Ray Train worker.

Read top to bottom: set up -> restore -> for each epoch: stream batches, make views on the device,
loss -> backward -> clip -> step -> method hooks; report metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from methods import get_method
from methods.distributed import all_reduce_mean
from methods.schedules import scaled_lr, warmup_cosine
from pipelines.checkpoint import (CheckpointDamaged, build_method, load_state, newest_loadable, save_checkpoint,
                                  set_rng_state)
from pipelines.config import RunConfig, config_from_dict
from pipelines.console import StepProgress, log, to_relay
from pipelines.elastic import batch_plan
from pipelines.evaluate import collect_features, embedding_spread, knn_top1, split_bank_queries
from pipelines.label_free import check_rank, probe_metrics
from pipelines.ingest import iter_canvas_batches
from pipelines.quality import BadDataError

class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def plan(config: RunConfig, train_rows: int) -> dict:
    """Steps per epoch, total steps, warmup steps and the scaled peak LR for the global batch."""
    steps_per_epoch = train_rows // config.optim.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"optim.batch_size={config.optim.batch_size}: larger than the {train_rows} training images"
        )
    rule = config.optim.lr_scaling or get_method(config.method).lr_scaling
    return {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * config.optim.epochs,
        "warmup_steps": int(round(config.optim.warmup_epochs * steps_per_epoch)),
        "peak_lr": scaled_lr(config.optim.base_lr, config.optim.batch_size, rule),
        "lr_scaling": rule,
        "min_lr": config.optim.min_lr,
    }


def lr_at(step: float, schedule: dict) -> float:
    return warmup_cosine(step, schedule["total_steps"], schedule["peak_lr"], schedule["min_lr"],
                         schedule["warmup_steps"])


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), precision == "fp16"


def _online_evaluation(method, config: RunConfig, device, has_val: bool, has_probe: bool) -> dict[str, float]:
    """Rank 0's evaluation at the end of an epoch: the kNN top-1 on the labeled validation set
    and the label-free metrics on the probe set, whichever the run has."""
    metrics = {}
    if has_val:
        val = ray.train.get_dataset_shard("val")
        features, labels, keys = collect_features(val.iter_torch_batches(batch_size=512, device=device), method, device)
        bank, query = split_bank_queries(keys)
        metrics["knn_top1"] = knn_top1(features[bank], labels[bank], features[query], labels[query],
                                       config.train.knn_k, config.train.knn_temperature)
    if has_probe:
        probe = ray.train.get_dataset_shard("probe")
        metrics.update(probe_metrics(method, probe.iter_torch_batches(batch_size=256, device=device), device))
    return metrics


def _resume_state(checkpoint, rank: int) -> dict:
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


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """One worker's training; returns `{"stopped": reason, "message": ...}` when it stops early."""
    config = config_from_dict(loop_config["config"])
    schedule, quality_log, has_val = loop_config["schedule"], loop_config["quality_log"], loop_config["has_val"]
    has_probe = loop_config.get("has_probe", False)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    to_relay(loop_config.get("console"), loop_config.get("console_prefix", ""))  # lines reach the driver's console
    device = ray.train.torch.get_device()
    torch.set_num_threads(config.train.torch_threads or max(1, int(config.train.cpus_per_worker)))
    # Derived again at every (re)start: an elastic group may come back with another world size.
    batches = batch_plan(config.optim.batch_size, world, config.optim.max_worker_batch, schedule["lr_scaling"])

    method = build_method(config)
    if loop_config.get("init_weights") is not None:  # a checkpoint, when resuming, overrides it below
        method.init_encoder(ray.get(loop_config["init_weights"]))
    if method.sync_bn and world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    model = ray.train.torch.prepare_model(method) if world > 1 else method.to(device)
    optimizer = method.make_optimizer(method.param_groups(config.optim.weight_decay), schedule["peak_lr"], config.optim)
    autocast, use_scaler = autocast_for(config.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    progress = {"epoch": 0, "step": 0, "step_in_epoch": 0, "samples": 0, "samples_in_epoch": 0}
    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = _resume_state(checkpoint, rank)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        progress = {**_samples_of(state["progress"], config.optim.batch_size), **state["progress"]}
        set_rng_state(state["rng"], rank)
        resumed_from = progress["step"]
        if rank == 0:
            log.info(f"resumed from step {resumed_from} (epoch {progress['epoch']})")
    else:
        torch.manual_seed(config.train.seed * 1000 + rank)  # different views on every worker
    previous_world = progress.get("world_size", world)
    if rank == 0 and previous_world != world:
        log.info(f"resized {previous_world} -> {world} workers at step {resumed_from}: {batches.describe()}")
    elif rank == 0 and (not batches.exact or batches.accumulation > 1):
        log.info(f"batch: {batches.describe()}")
    progress["world_size"] = world

    train_shard = ray.train.get_dataset_shard("train")
    total = schedule["total_steps"]
    samples_per_epoch = schedule["steps_per_epoch"] * config.optim.batch_size
    online, warned = {}, set()  # the last online evaluation; warnings given once per run
    ticker = StepProgress(total, config.optim.epochs, progress["step"]) if rank == 0 else None
    while progress["epoch"] < config.optim.epochs:
        epoch = progress["epoch"]
        window = ReportWindow()
        lr, hook_metrics = lr_at(position(progress, config), schedule) * batches.lr_factor, {}
        stream = iter(iter_canvas_batches(train_shard, batches.worker_batch, quality_log, config.data, device,
                                          drop_last=True, where="train", epoch=epoch))
        while progress["samples_in_epoch"] + batches.global_batch <= samples_per_epoch:
            # The schedules run on images seen, in units of the recipe's steps: a step of another
            # global batch moves them by global / recipe batch.
            at = position(progress, config)
            lr = lr_at(at, schedule) * batches.lr_factor
            for group in optimizer.param_groups:
                group["lr"] = lr
            hook_metrics = method.before_step(at, total, epoch, optimizer)
            optimizer.zero_grad(set_to_none=True)
            started, waited = time.perf_counter(), 0.0
            for micro in range(batches.accumulation):
                fetch = time.perf_counter()
                try:
                    batch, bad_data = next(stream, None), ""
                except BadDataError as error:  # over the bad-record cap: retrying would meet it again
                    batch, bad_data = None, str(error)
                waited += time.perf_counter() - fetch
                if batch is None and not bad_data:  # fewer rows than planned (bad images skipped): the epoch ends here
                    break
                if bad_data:  # joins the step's all-reduce with a NaN, so every rank stops at this step
                    loss_and_flag = all_reduce_mean(torch.tensor([float("nan"), 1.0], device=device))
                else:
                    views = method.views(batch["image"])
                    # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                    last = micro == batches.accumulation - 1
                    with (model.no_sync() if world > 1 and not last else contextlib.nullcontext()), autocast:
                        loss, stats = model(views)
                    loss_and_flag = all_reduce_mean(torch.stack([loss.detach().float(), loss.new_zeros((), dtype=torch.float32)]))
                global_loss = loss_and_flag[0]
                if not torch.isfinite(global_loss):  # every rank sees the same value and stops here
                    # Returned, not raised: Ray Train would retry a worker error from the last
                    # checkpoint and meet the same NaN (or the same bad data) again. The driver
                    # raises NonFiniteLossError or BadDataError.
                    if loss_and_flag[1] > 0:
                        message = bad_data or "another worker stopped on bad data (its line says which)"
                        log.warning(f"stopping: {message}")
                        return {"stopped": "bad_data", "message": message}
                    message = (f"loss is {global_loss.item()} at step {progress['step']} (epoch {epoch}); the last good "
                               "checkpoint is kept: lower optim.base_lr, enable optim.clip_grad, or check the data")
                    log.warning(f"stopping: {message}")
                    return {"stopped": "non_finite_loss", "message": message}
                scaler.scale(loss / batches.accumulation).backward()
                window.add(global_loss, stats)
            if batch is None:
                break
            if config.optim.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(method.parameters(), config.optim.clip_grad)
            method.on_gradients(progress["step"], epoch)
            scaler.step(optimizer)
            scaler.update()
            method.after_step(at, total)
            progress["step"] += 1
            progress["step_in_epoch"] += 1
            progress["samples"] += batches.global_batch
            progress["samples_in_epoch"] += batches.global_batch
            window.timed(batches.global_batch, waited, time.perf_counter() - started)
            if ticker:
                ticker.step(batches.global_batch, waited, time.perf_counter() - started, progress["step"], epoch)
            every = config.train.checkpoint_every_steps
            epoch_done = progress["samples_in_epoch"] + batches.global_batch > samples_per_epoch
            if every and progress["step"] % every == 0 and not epoch_done:
                _report(window, lr, hook_metrics, progress, config, method, optimizer, scaler, rank, schedule,
                        resumed_from, online, batches, warned)
                window = ReportWindow()
        progress["epoch"] += 1
        progress["step_in_epoch"] = progress["samples_in_epoch"] = 0
        final = progress["epoch"] == config.optim.epochs
        due = final or (config.train.knn_every_epochs and progress["epoch"] % config.train.knn_every_epochs == 0)
        if due and rank == 0 and (has_val or has_probe):
            online = _online_evaluation(method, config, device, has_val, has_probe)
        metrics = _report(window, lr, hook_metrics, progress, config, method, optimizer, scaler, rank, schedule,
                          resumed_from, online if due else {}, batches, warned)
        if rank == 0:
            log.info(f"epoch {progress['epoch']}/{config.optim.epochs} step {progress['step']}/{total} "
                     f"loss {metrics['loss']:.4f} lr {lr:.4g} · {metrics['images_per_s']:,.0f} img/s"
                     + (f" · knn_top1 {online['knn_top1']:.4f}" if due and "knn_top1" in online else "")
                     + (f" · rankme {online['rankme']:.1f}" if due and "rankme" in online else ""))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return None


def position(progress: dict, config: RunConfig) -> float:
    """Where the schedules are: images seen, in steps of the recipe's global batch."""
    return progress["samples"] / config.optim.batch_size


def _samples_of(progress: dict, recipe_batch: int) -> dict:
    """Image counts of a checkpoint written before they were recorded (every step a recipe batch)."""
    return {"samples": progress["step"] * recipe_batch, "samples_in_epoch": progress["step_in_epoch"] * recipe_batch}


class ReportWindow:
    """Sums over the steps since the last report, kept as tensors on the device (the NaN check is
    a step's only host sync; measured free on an H200); averaged and all-reduced when reported."""

    def __init__(self):
        self.passes, self.steps, self.images, self.wait, self.time = 0, 0, 0, 0.0, 0.0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """One forward pass (micro-batch): its loss and statistics."""
        values = {"loss": loss, "embedding_std": embedding_spread(stats["embeddings"])}
        values.update({k: v.detach().float() for k, v in stats.items() if k != "embeddings" and torch.is_tensor(v) and v.numel() == 1})
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.passes += 1

    def timed(self, images: int, waited: float, elapsed: float) -> None:
        """One optimizer step: images over all workers, seconds waiting for data and in total."""
        self.steps += 1
        self.images += images
        self.wait += waited
        self.time += elapsed

    def means(self) -> dict[str, float]:
        """Every rank must call this (it all-reduces)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = all_reduce_mean(torch.stack([self.sums[k].reshape(()) for k in keys]) / self.passes)
        return dict(zip(keys, stacked.tolist()))


def _report(window: ReportWindow, lr, hook_metrics, progress, config, method, optimizer, scaler, rank, schedule,
            resumed_from, online, batches, warned) -> dict:
    """Metrics for this window and a checkpoint (rank 0 writes it; every rank reaches report)."""
    statistics = window.means()
    metrics = {
        "epoch": progress["epoch"],
        "step": progress["step"],
        "total_steps": schedule["total_steps"],
        "samples": progress["samples"],
        "loss": statistics.pop("loss", float("nan")),
        "lr": lr,
        "images_per_s": window.images / max(window.time, 1e-9),
        "data_wait_frac": window.wait / max(window.time, 1e-9),
        "resumed_from_step": resumed_from,
        **batches.metrics(),
        **statistics,
        **hook_metrics,
    }
    if statistics:
        metrics.update(method.diagnose(metrics) if rank == 0 else {})
    metrics.update(online)
    if rank == 0:  # dimensional collapse, for every method (DINO's diagnose also flags its own)
        metrics.update(check_rank(metrics, warned))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(folder, method, optimizer, scaler, dict(progress), config)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
    return metrics
