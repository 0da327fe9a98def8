"""`selfsup pretrain`: a Ray Train `TorchTrainer` over streaming Ray Data, for any method."""

from __future__ import annotations

import dataclasses
import time

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.config import RunConfig, pinned_config
from pipelines.console import Relay, log
from pipelines.images.ingest import image_dataset
from pipelines.images.labeled import LabeledSet, labeled_dataset
from pipelines.images.probe import probe_dataset, probe_table
from pipelines.images.quality import BadDataError, new_quality_log
from pipelines.images.shards import find_shards
from pipelines.train.loop import train_loop_per_worker
from pipelines.train.plan import RunPlan, plan_run
from pipelines.train.preflight import storage_path
from pipelines.train.stops import NonFiniteLossError, RunInterrupted, Stop
from pipelines.train.torch_loopback import torch_config
from pipelines.train.tracking import RunTracker, flat_params
from pipelines.weights.init_from import initial_weights


def default_run_name(config: RunConfig) -> str:
    return f"{config.method}-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_trainer(config: RunConfig, data: str, plan: RunPlan, val: str | None = None, gpus_per_worker: float = 0,
                 storage: str | None = None, name: str | None = None, callbacks: list | None = None, console=None,
                 console_prefix: str = "", init: tuple | None = None, labeled: LabeledSet | None = None,
                 build=None) -> TorchTrainer:
    """The TorchTrainer for one pretraining run of `plan` (`plan_run`); Ray must be initialised.
    Every report goes to the run folder's `metrics.jsonl` and TensorBoard (and MLflow when
    configured). `console`: the queue of a `pipelines.console.Relay` that carries the workers'
    lines to the driver's stderr, each line after `console_prefix`. `init`:
    `initial_weights(config)` when the caller already checked them. Fine-tuning passes
    `labeled` (the training records, whose labels the batches then carry) and `build` (what each
    worker builds instead of the config's method: `train.classifier.ClassifierBuild`)."""
    config = config if build else pinned_config(config)  # a teacher's file read again (fine-tuning needs none)
    init = init or initial_weights(config)  # before anything starts: weights that do not fit are refused
    if init:
        log.info(f"init: {len(init[0])} tensors from {config.train.init_from or 'the given encoder'}"
                 + (f" (classifier left out: {', '.join(init[1])})" if init[1] else ""))
    quality_log = new_quality_log()
    # Training reports one line per epoch; per-operator progress bars from every worker would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if labeled:
        datasets = {"train": labeled_dataset(labeled, config.data, quality_log)}
    else:
        datasets = {"train": image_dataset(data, config.data, quality_log, stop_early=True,
                                           jpeg_on_device=config.data.decode == "gpu")[0]}
    if val:
        val_config = dataclasses.replace(config.data, shuffle_files=False, shuffle_buffer=0, decode="cpu")
        datasets["val"] = image_dataset(val, val_config, new_quality_log(), with_labels=True)[0]
    if config.train.probe_size:
        table = probe_table(config.train.probe or data, config.train.probe_size)
        datasets["probe"] = probe_dataset(table, config.data.canvas_size, config.data.max_pixels, new_quality_log())
    name = name or default_run_name(config)
    storage = storage_path(storage)
    tracker = RunTracker(f"{storage.rstrip('/')}/{name}", tensorboard=config.tracking.tensorboard,
                         mlflow_uri=config.tracking.mlflow_uri, mlflow_experiment=config.tracking.mlflow_experiment,
                         params=flat_params(config.to_dict()))
    low, high = plan.workers
    resources = {"CPU": config.train.cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        torch_config=torch_config(),
        train_loop_config={"config": config.to_dict(), "plan": plan, "quality_log": quality_log,
                           "has_val": bool(val), "has_probe": "probe" in datasets,
                           "console": console, "console_prefix": console_prefix,
                           "init_weights": ray.put(init[0]) if init else None, "build": build},
        scaling_config=ScalingConfig(num_workers=low if low == high else (low, high), use_gpu=bool(gpus_per_worker),
                                     resources_per_worker=resources, placement_strategy=config.train.placement_strategy,
                                     elastic_resize_monitor_interval_s=config.train.resize_interval_s),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            callbacks=[tracker, *(callbacks or [])],
        ),
        datasets=datasets,
        # Every worker sees the whole validation and probe sets; only the training data is split.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def raise_if_stopped(result) -> None:
    """The error of a run that stopped itself (the worker loop returns a reason instead of raising,
    so that Ray Train does not retry what would fail again): NonFiniteLossError or BadDataError."""
    stop = result.return_value
    if not isinstance(stop, Stop):
        return
    if stop.reason == "bad_data":
        raise BadDataError(stop.message)
    raise NonFiniteLossError(f"{stop.message} ({result.checkpoint.path if result.checkpoint else 'no checkpoint yet'})")


def pretrain(config: RunConfig, data: str, plan: RunPlan | None = None, **kwargs) -> dict:
    """Run (or resume, when `name` already exists in `storage`) a pretraining run of `plan`
    (`preflight`'s, or planned here from the shards' row count). `kwargs`: `make_trainer`'s."""
    plan = plan or plan_run(config, find_shards(data).num_rows, data)
    kwargs["name"] = kwargs.get("name") or default_run_name(config)
    with Relay(waiting="waiting for Ray Train to start the training workers") as relay:
        trainer = make_trainer(config, data, plan, console=relay.queue, **kwargs)
        try:
            result = trainer.fit()
        except SystemExit:
            # Ray Train answers Ctrl-C by aborting the run gracefully, and its driver then leaves
            # ray.get with SystemExit (as it does when the cluster goes away): not our exit code.
            folder = f"{storage_path(kwargs.get('storage')).rstrip('/')}/{kwargs['name']}"
            raise RunInterrupted(f"interrupted: the checkpoints written so far are kept in {folder}; run the same "
                                 f"command with --name {kwargs['name']} to resume") from None
    raise_if_stopped(result)
    return {
        "method": config.method,
        "run": result.path,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))},
    }
