"""Ray Train pretraining: kill-and-resume, restart-resume, fail-fast config, online metrics."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from pipelines.pretrain import pretrain
from pipelines.train_loop import lr_at, plan
from pipelines.tracking import read_history
from runs import STEPS_PER_EPOCH, tensorboard_scalars, tiny_config

def test_worker_killed_mid_run_resumes_from_checkpoint_and_finishes_on_plan(digits, tmp_path):
    """Resuming is the pipeline's, so one method shows it; DINO's teacher and center resume in
    tests/test_elastic.py, where each resize restarts the group from a checkpoint."""
    from ray.util.state import list_actors

    out, _ = digits
    config = tiny_config(**{"optim.epochs": 1, "train.checkpoint_every_steps": 4, "train.max_failures": 1})
    result, run = {}, tmp_path / "runs" / "killed"
    thread = threading.Thread(target=lambda: result.update(
        pretrain(config, f"{out}/train", val=f"{out}/test", storage=str(tmp_path / "runs"), name="killed")))
    thread.start()
    deadline = time.time() + 300
    # A checkpoint counts once the controller has registered it in its snapshot.
    snapshot = run / "checkpoint_manager_snapshot.json"
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        assert time.time() < deadline and thread.is_alive(), "no checkpoint was registered"
        time.sleep(0.2)
    import ray

    workers = list_actors(address=ray.get_runtime_context().gcs_address,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    metrics = result["metrics"]
    total = STEPS_PER_EPOCH
    assert metrics["step"] == metrics["total_steps"] == total
    assert 4 <= metrics["resumed_from_step"] < total  # it did resume, from a checkpoint
    schedule = plan(config, 1438)  # what an uninterrupted run plans
    assert metrics["lr"] == pytest.approx(lr_at(total - 1, schedule))  # same schedule position
    assert 0 <= metrics["knn_top1"] <= 1 and metrics["embedding_std"] > 0 and 0 <= metrics["data_wait_frac"] <= 1
    # The restart repeated steps after the checkpoint; the run's history holds each step once.
    steps = [row["step"] for row in read_history(str(run))]
    assert steps == sorted(set(steps)) and steps[-1] == total


def test_rerun_with_the_same_name_resumes_instead_of_starting_over(digits, one_epoch_run, mlflow_uri):
    out, _ = digits
    storage, first = one_epoch_run
    assert first["metrics"]["step"] == STEPS_PER_EPOCH and first["metrics"]["resumed_from_step"] == 0
    second = pretrain(tiny_config(**{"optim.epochs": 2, "tracking.mlflow_uri": mlflow_uri}), f"{out}/train",
                      storage=storage, name="again")
    assert second["metrics"]["resumed_from_step"] == STEPS_PER_EPOCH
    assert second["metrics"]["step"] == 2 * STEPS_PER_EPOCH

    # Tracking reads as one run across the resume: the history file, TensorBoard and MLflow.
    history = read_history(second["run"])
    assert [row["step"] for row in history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert history[-1]["loss"] == pytest.approx(second["metrics"]["loss"])
    scalars = tensorboard_scalars(os.path.join(second["run"], "tensorboard"))
    assert sorted(scalars["loss"]) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert scalars["lr"][2 * STEPS_PER_EPOCH] == pytest.approx(second["metrics"]["lr"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("selfsup").experiment_id],
                              filter_string=f"tags.`selfsup.run` = '{second['run']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["optim.batch_size"] == "64" and runs[0].data.params["method"] == "simclr"
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [m.step for m in losses] == [row["step"] for row in history]
    assert [m.value for m in losses] == pytest.approx([row["loss"] for row in history])
