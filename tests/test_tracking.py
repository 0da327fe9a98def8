"""Run tracking without Ray: the callback's history, TensorBoard and MLflow across restarts."""

import pytest

from pipelines.train.tracking import RunTracker, read_history
from tests.helpers.runs import tensorboard_scalars


def report(tracker, step, loss, total=40):
    tracker.after_report(None, [{"step": step, "total_steps": total, "loss": loss, "lr": 0.1 * step,
                                 "collapsed": False, "note": "text is not a metric"}], None)


def test_restarts_and_resumes_read_as_one_history(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    run = str(tmp_path / "run")
    first = RunTracker(run, mlflow_uri=mlflow_uri, mlflow_experiment="tracking-test", params={"optim.lr": 0.3})
    for step, loss in [(10, 4.0), (20, 3.0), (30, 2.5)]:
        report(first, step, loss)
    report(first, 20, 2.9)  # the worker group restarted from the step-10 checkpoint: 20 again
    # The driver died; a rerun resumes from the step-20 checkpoint in a new controller.
    second = RunTracker(run, mlflow_uri=mlflow_uri, mlflow_experiment="tracking-test", params={"optim.lr": 0.3})
    report(second, 30, 2.4)
    report(second, 40, 2.0)

    history = read_history(run)
    assert [(row["step"], row["loss"]) for row in history] == [(10, 4.0), (20, 2.9), (30, 2.4), (40, 2.0)]
    assert all("note" not in row and "time" in row for row in history)
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["loss"] == pytest.approx({10: 4.0, 20: 2.9, 30: 2.4, 40: 2.0})
    assert scalars["lr"][40] == pytest.approx(4.0)

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params == {"optim.lr": "0.3"}
    # MLflow keeps every logged value; the last one per step is the run's.
    last = {}
    for metric in client.get_metric_history(runs[0].info.run_id, "loss"):
        last[metric.step] = metric.value
    assert last == pytest.approx({10: 4.0, 20: 2.9, 30: 2.4, 40: 2.0})


def test_a_bad_tracking_config_is_refused_before_ray_starts():
    from tests.helpers.runs import tiny_config

    with pytest.raises(ValueError, match="tracking.mlflow_uri=''"):
        tiny_config(**{"tracking.mlflow_uri": ""})
    with pytest.raises(ValueError, match="tracking.tensorboard='yes': must be true or false"):
        tiny_config(**{"tracking.tensorboard": "yes"})
