"""The method-agnostic training loop that runs on every Ray Train worker.

Read top to bottom: `train_loop_per_worker` sets up (`start_worker`: build, wrap, restore) and
starts reading the epochs' passes ahead (`EpochStream`); `_train` then, for each epoch, takes
optimizer steps on its pass (`_step`: views on the device, loss, backward, clip, step, the method's
hooks) and reports metrics with a checkpoint (`_report`). A run that must stop (a NaN loss, too
much bad data) returns a `Stop` instead of raising.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from typing import Iterator

import ray.train
import torch
import torch.distributed as dist

from methods.distributed import all_reduce_mean
from pipelines.config import RunConfig, config_from_dict
from pipelines.console import StepProgress, log, to_relay
from pipelines.evaluate.features import collect_features
from pipelines.evaluate.knn import knn_top1, split_bank_queries
from pipelines.evaluate.label_free import check_rank, embedding_spread, health_ratios, probe_metrics
from pipelines.images.ingest import EpochStream, iter_canvas_batches
from pipelines.images.quality import BadDataError
from pipelines.train.stops import Stop
from pipelines.train.worker import Progress, Worker, as_step_input, start_worker
from pipelines.weights.checkpoint import save_checkpoint


def train_loop_per_worker(loop_config: dict) -> Stop | None:
    """One worker's training. `loop_config`: the run config as a dict, its `RunPlan`, the
    quality log, whether the run has `val` / `probe` sets, the console relay and initial weights."""
    config = config_from_dict(loop_config["config"])
    to_relay(loop_config.get("console"), loop_config.get("console_prefix", ""))  # lines reach the driver's console
    worker, progress = start_worker(config, loop_config)
    if worker.rank == 0:  # the driver's console says, until the first step, that the data is what it waits for
        log.info(f"{worker.world} worker{'s' * (worker.world > 1)} ready on {worker.device.type}; the first step "
                 "waits for the first decoded batches", extra={"waiting": "waiting for the first decoded batches"})
    has_val, has_probe = loop_config["has_val"], loop_config.get("has_probe", False)
    train_shard = ray.train.get_dataset_shard("train")

    def open_pass(epoch: int) -> Iterator[dict]:
        return iter_canvas_batches(train_shard, worker.batches.worker_batch, loop_config["quality_log"], config.data,
                                   worker.device, drop_last=True, where="train", epoch=epoch)

    passes = (EpochStream(open_pass, range(progress.epoch, config.optim.epochs), config.data.prefetch_batches)
              if config.data.prefetch_batches else None)
    try:
        return _train(worker, progress, passes, open_pass, has_val, has_probe)
    finally:
        if passes:
            passes.close()


def _train(worker: Worker, progress: Progress, passes: EpochStream | None, open_pass, has_val: bool,
           has_probe: bool) -> Stop | None:
    """The epochs: steps over each epoch's pass (read ahead by `passes`, else opened here), a
    report with a checkpoint every `train.checkpoint_every_steps` and at each epoch's end."""
    config = worker.config
    total, recipe_batch = worker.plan.total_steps, config.optim.batch_size
    samples_per_epoch = worker.plan.steps_per_epoch * recipe_batch
    online = {}  # the last online evaluation
    ticker = StepProgress(total, config.optim.epochs, progress.step) if worker.rank == 0 else None
    while progress.epoch < config.optim.epochs:
        window, hook_metrics = ReportWindow(), {}
        lr = worker.plan.lr_at(progress.position(recipe_batch)) * worker.batches.lr_factor
        stream = iter(passes.next_pass() if passes else open_pass(progress.epoch))
        while progress.samples_in_epoch + worker.batches.global_batch <= samples_per_epoch:
            # The schedules run on images seen, in units of the recipe's steps: a step of another
            # global batch moves them by global / recipe batch.
            at = progress.position(recipe_batch)
            lr = worker.plan.lr_at(at) * worker.batches.lr_factor
            for group in worker.optimizer.param_groups:  # `lr_scale`: layer-wise decay (fine-tuning's)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            hook_metrics = worker.method.before_step(at, total, progress.epoch, worker.optimizer)
            started = time.perf_counter()
            outcome, waited = _step(worker, stream, progress, window)
            if isinstance(outcome, Stop):
                log.warning(f"stopping: {outcome.message}")
                return outcome
            if not outcome:  # fewer rows than planned (bad images skipped): the epoch ends here
                break
            worker.method.after_step(at, total)
            progress.stepped(worker.batches.global_batch)
            elapsed = time.perf_counter() - started
            window.timed(worker.batches.global_batch, waited, elapsed)
            if ticker:
                ticker.step(worker.batches.global_batch, waited, elapsed, progress.step, progress.epoch)
            every = config.train.checkpoint_every_steps
            epoch_done = progress.samples_in_epoch + worker.batches.global_batch > samples_per_epoch
            if every and progress.step % every == 0 and not epoch_done:
                _report(worker, window, progress, lr, hook_metrics, online={})
                window = ReportWindow()
        progress.next_epoch()
        final = progress.epoch == config.optim.epochs
        due = final or (config.train.knn_every_epochs and progress.epoch % config.train.knn_every_epochs == 0)
        if due and worker.rank == 0 and (has_val or has_probe):
            online = _online_evaluation(worker.method, config, worker.device, has_val, has_probe)
        metrics = _report(worker, window, progress, lr, hook_metrics, online if due else {})
        if worker.rank == 0:
            log.info(f"epoch {progress.epoch}/{config.optim.epochs} step {progress.step}/{total} "
                     f"loss {metrics['loss']:.4f} lr {lr:.4g} · {metrics['images_per_s']:,.0f} img/s"
                     + (f" · knn_top1 {online['knn_top1']:.4f}" if due and "knn_top1" in online else "")
                     + (f" · rankme {online['rankme']:.1f}" if due and "rankme" in online else ""))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return None


def _step(worker: Worker, stream: Iterator[dict], progress: Progress, window: ReportWindow) -> tuple[Stop | bool, float]:
    """One optimizer step over `batches.accumulation` micro-batches: views, loss, backward, clip,
    the method's gradient hook, the optimizer. Returns (True, or False when the stream ran out
    before the step was complete, or the `Stop` every rank agreed on; seconds spent waiting for
    data)."""
    method, batches = worker.method, worker.batches
    worker.optimizer.zero_grad(set_to_none=True)
    waited = 0.0
    for micro in range(batches.accumulation):
        fetch = time.perf_counter()
        try:
            batch, bad_data = next(stream, None), ""
        except BadDataError as error:  # over the bad-record cap: retrying would meet it again
            batch, bad_data = None, str(error)
        waited += time.perf_counter() - fetch
        if batch is None and not bad_data:
            return False, waited
        if bad_data:  # joins the step's all-reduce with a NaN, so every rank stops at this step
            loss_and_flag = all_reduce_mean(torch.tensor([float("nan"), 1.0], device=worker.device))
        else:
            views = as_step_input(method.step_input(batch), worker.config.train.channels_last)
            # Gradients are all-reduced once per optimizer step, on its last micro-batch.
            last = micro == batches.accumulation - 1
            with (worker.model.no_sync() if worker.world > 1 and not last else contextlib.nullcontext()), worker.autocast:
                loss, stats = worker.model(views)
            loss_and_flag = all_reduce_mean(torch.stack([loss.detach().float(), loss.new_zeros((), dtype=torch.float32)]))
        global_loss = loss_and_flag[0]
        if not torch.isfinite(global_loss):  # every rank sees the same value and stops here
            if loss_and_flag[1] > 0:
                return Stop("bad_data", bad_data or "another worker stopped on bad data (its line says which)"), waited
            return Stop("non_finite_loss", f"loss is {global_loss.item()} at step {progress.step} (epoch "
                        f"{progress.epoch}); the last good checkpoint is kept: lower optim.base_lr, enable "
                        "optim.clip_grad, or check the data"), waited
        worker.scaler.scale(loss / batches.accumulation).backward()
        window.add(global_loss, stats)
    if worker.config.optim.clip_grad > 0:
        worker.scaler.unscale_(worker.optimizer)
        torch.nn.utils.clip_grad_norm_(method.parameters(), worker.config.optim.clip_grad)
    method.on_gradients(progress.step, progress.epoch)
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    return True, waited


class ReportWindow:
    """Sums over the steps since the last report, kept as tensors on the device (the NaN check is
    a step's only host sync: docs/BENCHMARKS.md, "The CUDA path"); averaged and all-reduced when
    reported."""

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


def _report(worker: Worker, window: ReportWindow, progress: Progress, lr: float, hook_metrics: dict,
            online: dict) -> dict:
    """Metrics for this window and a checkpoint (rank 0 writes it; every rank reaches report)."""
    statistics = window.means()
    metrics = {
        "epoch": progress.epoch,
        "step": progress.step,
        "total_steps": worker.plan.total_steps,
        "samples": progress.samples,
        "loss": statistics.pop("loss", float("nan")),
        "lr": lr,
        "warmup_steps": worker.plan.warmup_steps,  # the schedule's, for `viz curves`
        "peak_lr": worker.plan.peak_lr,
        "min_lr": worker.plan.min_lr,
        "images_per_s": window.images / max(window.time, 1e-9),
        "data_wait_frac": window.wait / max(window.time, 1e-9),
        "resumed_from_step": worker.resumed_from,
        **worker.batches.metrics(),
        **statistics,
        **hook_metrics,
    }
    if worker.device.type == "cuda":  # this worker's peak since the run (or its restart) began
        metrics["gpu_peak_gib"] = torch.cuda.max_memory_allocated(worker.device) / 2**30
    if statistics:
        metrics.update(worker.method.diagnose(metrics) if worker.rank == 0 else {})
    metrics.update(online)
    metrics.update(health_ratios(metrics, worker.method.health))
    if worker.rank == 0:  # dimensional collapse, for every method (DINO's diagnose also flags its own)
        metrics.update(check_rank(metrics, worker.warned))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if worker.rank == 0:
            save_checkpoint(folder, worker.method, worker.optimizer, worker.scaler, progress.to_state(), worker.config)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
    return metrics


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
