"""What a run needs from this machine and its data, checked before Ray starts: the one function
`preflight` that `selfsup pretrain` and `selfsup tune` both call. Every refusal is one line
(`UsageError`, or a `DataError` naming the file); the run folder is repaired for a resume on the
way (`run_folder.repair_run_folder`), and the run's plan comes back.
"""

from __future__ import annotations

import os
import re
import tempfile

import torch

from pipelines.config import RunConfig
from pipelines.console import UsageError, log
from pipelines.images.shards import checked_shards
from pipelines.train.plan import RunPlan, plan_run
from pipelines.train.run_folder import repair_run_folder, run_method

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def storage_path(storage: str | None) -> str:
    """A local folder (made absolute, as Ray needs) or any URI pyarrow handles (s3://, gs://)."""
    storage = storage or "runs"
    return storage if "://" in storage else os.path.abspath(storage)


def preflight(config: RunConfig, data: str, val: str | None = None, storage: str | None = None,
              name: str | None = None, gpus_per_worker: float = 0, num_cpus: int | None = None) -> RunPlan:
    """Checks a run of `config` on the shards at `data` (and `val`, and `train.probe`) before Ray
    starts, repairs its run folder for a resume, and returns its plan. For a search, `config` is
    its base config with `train.workers` set to the trials' group size."""
    check_decode_device(config, gpus_per_worker)
    check_run_name(name)
    folder = storage_path(storage)
    run = os.path.join(folder, name) if name and "://" not in folder else None
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
