"""Experiment tracking: every report of a run to `metrics.jsonl` and TensorBoard in the run
folder, and to MLflow when configured.

Ray Train V2 has no logger callbacks (Tune's `TBXLoggerCallback` / `MLflowLoggerCallback` take
Tune trials); its extension point is a `ray.train.UserCallback`, which runs in the run's
controller, sees every report once (after the checkpoint is persisted) and outlives worker-group
restarts. `RunTracker` is one: it writes TensorBoard events with tensorboardX's protobufs (Ray's
own TensorBoard dependency) and MLflow with its client. Reports of steps that a restart repeats replace the old ones (TensorBoard's
`purge_step`, a rewritten `metrics.jsonl`, MLflow's last value per step), so a resumed run reads
as one continuous history.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import time
import uuid

import pyarrow.fs as pafs
from ray.train import UserCallback

from pipelines.images.shards import resolve_location

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_history(run: str) -> list[dict]:
    """The reports of a run folder (local or URI), oldest first; [] when it has none yet."""
    filesystem, root = resolve_location(run)
    path = posixpath.join(root, METRICS_FILE)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return []
    with filesystem.open_input_stream(path) as stream:
        return [json.loads(line) for line in stream.read().decode().splitlines() if line.strip()]


def _scalars(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class EventFile:
    """A TensorBoard event file written synchronously: a report is on disk when `write` returns.
    (tensorboardX's SummaryWriter writes from a thread and its `flush` does not wait for it, and
    the controller process can end right after the last report.) `purge_step`: TensorBoard hides
    the events of earlier files from this step on, as for a resumed run."""

    def __init__(self, folder: str, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(folder, exist_ok=True)
        # Names carry seconds only: a suffix keeps two files started in the same second apart.
        self._writer = EventsWriter(os.path.join(folder, "events"), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        if purge_step is not None:
            self._writer.write_event(Event(wall_time=time.time(), step=purge_step,
                                           session_log=SessionLog(status=SessionLog.START)))
            self._writer.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for key, value in scalars.items():
            self._writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(key, value)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunTracker(UserCallback):
    """Writes each report of one Train run. `run` is the run folder (`storage_path/name`, local
    or URI); for a URI the files are written in a local folder and uploaded after each report."""

    def __init__(self, run: str, tensorboard: bool = True, mlflow_uri: str | None = None,
                 mlflow_experiment: str = "selfsup", params: dict | None = None):
        self.run = run
        self.tensorboard = tensorboard
        self.mlflow_uri = mlflow_uri
        self.mlflow_experiment = mlflow_experiment
        self.params = params or {}
        self._started = False

    # --- Ray Train hook ------------------------------------------------------------------
    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        report = _scalars(metrics[0])  # rank 0's; the pipeline all-reduces what it reports
        if "step" not in report:
            return
        step = int(report["step"])
        if not self._started:
            self._start(step)
        elif step <= self._last_step:  # the worker group restarted from an earlier checkpoint
            self._rewind(step)
        report["time"] = time.time()
        self._history.append(report)
        self._last_step = step
        self._write(report, step)

    # --- internals -----------------------------------------------------------------------
    def _start(self, step: int) -> None:
        filesystem, root = resolve_location(self.run)
        self._remote = None if isinstance(filesystem, pafs.LocalFileSystem) else (filesystem, root)
        self._folder = tempfile.mkdtemp(prefix="selfsup-tracking-") if self._remote else root
        os.makedirs(self._folder, exist_ok=True)
        self._history = [row for row in read_history(self.run) if row.get("step", 0) < step]
        self._writer = None
        self._purge_from = step if self._history else None
        self._mlflow_run = self._mlflow_start() if self.mlflow_uri else None
        self._started = True
        self._last_step = step - 1

    def _rewind(self, step: int) -> None:
        self._history = [row for row in self._history if row["step"] < step]
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_from = step

    def _write(self, report: dict, step: int) -> None:
        # Rewritten whole at every report (a resume rewinds it) and renamed into place, so a reader
        # (viz curves, a test following the run) never sees it empty or half written.
        partial = os.path.join(self._folder, METRICS_FILE + ".partial")
        with open(partial, "w") as stream:
            stream.writelines(json.dumps(row) + "\n" for row in self._history)
        os.replace(partial, os.path.join(self._folder, METRICS_FILE))
        if self.tensorboard:
            if self._writer is None:
                self._writer = EventFile(os.path.join(self._folder, TENSORBOARD_DIR), purge_step=self._purge_from)
                self._purge_from = None
            self._writer.write(step, {k: v for k, v in report.items() if k not in ("step", "time")})
        if self._mlflow_run:
            self._mlflow_log(report, step)
        if self._remote:
            filesystem, root = self._remote
            pafs.copy_files(self._folder, root, destination_filesystem=filesystem)

    def _mlflow_start(self):
        """The MLflow run named after this run folder: created once, found again on resume."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_uri)
        experiment = client.get_experiment_by_name(self.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.mlflow_experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`selfsup.run` = '{self.run}'", max_results=1)
        if found:  # a resumed run goes on in the same MLflow run
            client.update_run(found[0].info.run_id, status="RUNNING")
            return client, found[0].info.run_id
        name = posixpath.basename(self.run.rstrip("/"))
        run = client.create_run(experiment_id, run_name=name, tags={"selfsup.run": self.run})
        params = {k: str(v)[:500] for k, v in self.params.items()}
        from mlflow.entities import Param

        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
        return client, run.info.run_id

    def _mlflow_log(self, report: dict, step: int) -> None:
        from mlflow.entities import Metric

        client, run_id = self._mlflow_run
        stamp = int(report["time"] * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in report.items() if k not in ("step", "time")])
        if report.get("total_steps") and step >= report["total_steps"]:
            client.set_terminated(run_id, "FINISHED")


def flat_params(config: dict, prefix: str = "") -> dict:
    """`{"optim": {"base_lr": 0.3}}` -> `{"optim.base_lr": 0.3}` (MLflow parameters)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value
    return out
