"""What a run needs from this machine and its data, checked before Ray starts: the one function
`preflight` that `selfsup pretrain` and `selfsup tune` both call. Every refusal is one line
(`UsageError`, or a `DataError` naming the file); the run folder is repaired for a resume on the
way (`run_folder.repair_run_folder`), and the run's plan comes back.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import torch

from pipelines.config import RunConfig
from pipelines.console import UsageError, log
from pipelines.images.shards import checked_shards
from pipelines.train.plan import RunPlan, plan_run
from pipelines.train.run_folder import repair_run_folder, run_method, run_settings
from pipelines.train.tracking import flat_params, read_history
from pipelines.weights.checkpoint import find_checkpoint

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Settings a rerun under the same --name may change without changing what the run computes: where
# and how wide it runs (the global batch is kept at any world size), how often it checkpoints, and
# what it measures and logs on the side. Every other setting is the run's.
HOW_IT_RUNS = ("preset", "data.decode_block_mb", "data.decode_num_cpus", "data.decode", "data.prefetch_batches",
               "optim.max_worker_batch", "train.checkpoint_every_steps", "train.keep_checkpoints",
               "train.knn_every_epochs", "train.knn_k", "train.knn_temperature", "train.probe_size", "train.probe",
               "train.max_failures", "train.cpus_per_worker", "train.torch_threads", "train.placement_strategy",
               "train.workers", "train.resize_interval_s", "train.compile", "train.channels_last", "tracking.")

# A setting that ends so is the hash of a file the run depends on, pinned by `Method.pinned`
# (distillation's teacher): even --resume does not continue a run on another file.
PINNED_HASH = "_sha256"


def storage_path(storage: str | None) -> str:
    """A local folder (made absolute, as Ray needs) or any URI pyarrow handles (s3://, gs://)."""
    storage = storage or "runs"
    return storage if "://" in storage else os.path.abspath(storage)


def local_run_folder(storage: str | None, name: str | None) -> str | None:
    """The folder of run `name` under a local `storage`; None without a name or on a URI (whose
    run folders the pre-Ray checks do not read)."""
    folder = storage_path(storage)
    return os.path.join(folder, name) if name and "://" not in folder else None


def preflight(config: RunConfig, data: str, val: str | None = None, storage: str | None = None,
              name: str | None = None, gpus_per_worker: float = 0, num_cpus: int | None = None) -> RunPlan:
    """Checks a run of `config` on the shards at `data` (and `val`, and `train.probe`) before Ray
    starts, repairs its run folder for a resume, and returns its plan. For a search, `config` is
    its base config with `train.workers` set to the trials' group size."""
    check_decode_device(config, gpus_per_worker)
    check_run_name(name)
    folder = storage_path(storage)
    run = local_run_folder(storage, name)
    if "://" not in folder:
        check_writable(folder)
    if run:
        repair_run_folder(run)
        check_same_method(run, name, config)
    check_local_cpus(config, num_cpus)
    shards = checked_shards(data)  # a wrong path, schema or shard fails here
    try:
        plan = plan_run(config, shards.num_rows, data)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.optim.warmup_epochs >= config.optim.epochs:
        log.warning(f"optim.warmup_epochs={config.optim.warmup_epochs:g} >= optim.epochs="
                    f"{config.optim.epochs}: the learning rate never leaves warm-up")
    for extra in (val, config.train.probe if config.train.probe_size else None):
        if extra:
            checked_shards(extra)
    return plan


def check_decode_device(config: RunConfig, gpus_per_worker: float) -> None:
    """Refuse `data.decode=gpu` where the workers will have no GPU: a run without
    `--gpus-per-worker`, or a local run on a machine without CUDA (a cluster's driver may sit
    on a CPU head node; its workers check for themselves when they start)."""
    if config.data.decode != "gpu":
        return
    if not gpus_per_worker:
        raise UsageError("data.decode=gpu: the workers train on CPU (no --gpus-per-worker); use data.decode=cpu")
    if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
        raise UsageError("data.decode=gpu: this machine has no CUDA device; use data.decode=cpu")


def check_run_name(name: str | None) -> None:
    if name is not None and not RUN_NAME.match(name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names folders and Ray's records)")


def check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"--storage {folder}: not writable ({error.strerror})") from None


def check_same_method(run: str, name: str, config: RunConfig) -> None:
    """A run folder of another method under this name would resume into the wrong model."""
    method = run_method(run)
    if method is not None and method != config.method:
        raise UsageError(f"--name {name}: {run} is a {method} run and this is {config.method}; "
                         "resuming it would load the wrong model (choose another --name)")


def start_line(config: RunConfig, plan: RunPlan, image_size: tuple[int, int] | None) -> str:
    """What the defaults chose, in the one line `selfsup pretrain` starts with: method and preset,
    epochs and steps, the batch split (at the largest group of an elastic range), the peak LR,
    and the canvas against the images' own size where they differ."""
    low, high = plan.workers
    workers = f"{low}-{high} workers elastic, at {high}: " if low != high else ""
    line = (f"pretrain: {config.method}, preset {config.preset}: {config.optim.epochs} epochs x "
            f"{plan.steps_per_epoch} steps over {plan.train_rows:,} images; {workers}"
            f"{plan.batches(high).describe()}; peak LR {plan.peak_lr:.4g}")
    canvas = config.data.canvas_size
    if image_size and image_size != (canvas, canvas):
        line += (f"; images are {image_size[0]}x{image_size[1]} px (the first one), decoded to the preset's "
                 f"{canvas} px canvas (--set data.canvas_size=N to change it)")
    return line


def check_rerun(config: RunConfig, plan: RunPlan, storage: str | None, name: str | None,
                resume: bool = False) -> dict | None:
    """`selfsup pretrain --name NAME` where NAME holds a run (before Ray starts): the run's result
    when it finished with these settings (nothing to train; said on the console), None when it
    is to be resumed (interrupted with these settings, or `resume`: continue with the new ones),
    and a refusal naming the first setting that differs (or the planned steps, when the data
    changed) otherwise. Settings that only say how the run runs (HOW_IT_RUNS) may differ."""
    run = local_run_folder(storage, name)
    written = run_settings(run) if run else None
    if written is None:
        return None
    history = read_history(run)
    last = history[-1] if history else {}
    old, new = flat_params(written), json.loads(json.dumps(flat_params(config.to_dict())))
    changed = [(key, old[key], value) for key, value in new.items()
               if key in old and old[key] != value and not key.startswith(HOW_IT_RUNS)]
    if last.get("total_steps") not in (None, plan.total_steps) and not any(k == "optim.epochs" for k, *_ in changed):
        changed.append(("planned steps (the data changed)", last["total_steps"], plan.total_steps))
    if resume:
        swapped = [change for change in changed if change[0].endswith(PINNED_HASH)]
        if swapped:
            key, before, after = swapped[0]
            raise UsageError(f"--name {name}: {run} was trained with {key}={before[:12]}..., this command's file has "
                             f"{after[:12]}...; --resume does not continue a run on other weights (give a new --name)")
        if changed:
            log.info(f"--resume: run {name} goes on from step {last.get('step', 0)} with "
                     + ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changed))
        return None
    if changed:
        key, before, after = changed[0]
        raise UsageError(f"--name {name}: {run} holds a run with {key}={before!r}, this command has {after!r}"
                         f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; give a new --name, "
                         "or --resume to continue that run with these settings")
    if not last or last.get("step") != last.get("total_steps"):
        return None  # interrupted: the same command resumes it
    log.info(f"run {name} is complete ({last['step']} of {last['total_steps']} steps, same settings): its result, "
             "without training (a new --name trains again; --resume with more optim.epochs continues it)")
    return {"method": config.method, "run": run, "checkpoint": find_checkpoint(run),
            "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float, str))}, "complete": True}


def check_local_cpus(config: RunConfig, num_cpus: int | None) -> None:
    """For a local Ray: the CPUs the smallest worker group reserves plus one decode task's, which
    Ray Train and Ray Data would otherwise wait for forever."""
    if os.environ.get("RAY_ADDRESS"):
        return
    cpus = num_cpus or os.cpu_count() or 1
    least = config.train.worker_range()[0]
    needed = least * config.train.cpus_per_worker + config.data.decode_num_cpus
    if needed > cpus:
        raise UsageError(f"{least} workers x train.cpus_per_worker {config.train.cpus_per_worker:g} + one decode "
                         f"task's data.decode_num_cpus {config.data.decode_num_cpus:g} = {needed:g} CPUs, but this "
                         f"machine's Ray has {cpus}: use fewer --workers or lower train.cpus_per_worker (or join a "
                         "cluster with RAY_ADDRESS)")
