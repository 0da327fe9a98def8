"""Ray Train pretraining: kill-and-resume, restart-resume, fail-fast config, online metrics."""

import os
import signal
import time

import pytest
import torch

from pipelines.train.pretrain import pretrain
from pipelines.train.tracking import read_history
from tests.helpers.cli import said_lines, selfsup_command
from tests.helpers.runs import LEARNS, STEPS_PER_EPOCH, tensorboard_scalars, tiny_config


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


def test_eval_cli_prints_encoder_floor_and_raw_pixels(digits, one_epoch_run, capsys):
    import json

    from pipelines.cli import main
    from pipelines.evaluate.frozen import evaluate_checkpoint
    from pipelines.weights.checkpoint import load_checkpoint

    out, _ = digits
    checkpoint = one_epoch_run[1]["checkpoint"]
    method, config = load_checkpoint(checkpoint)  # weights_only load
    assert config.optim.epochs == 1 and config.method == "simclr"
    assert main(["eval", "knn", "--checkpoint", checkpoint, "--train", f"{out}/train", "--test", f"{out}/test"]) == 0
    knn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The demo's form: both protocols on one extraction of the features; its kNN is the CLI's.
    linear = evaluate_checkpoint(checkpoint, f"{out}/train", f"{out}/test", "linear", also=("knn",))
    assert knn["protocol"] == "knn" and linear["protocol"] == "linear"
    assert linear.pop("knn") == {key: knn[key] for key in ("top1", "random_init_top1", "raw_pixels_top1")}
    for result in (knn, linear):
        for key in ("top1", "random_init_top1", "raw_pixels_top1"):
            assert 0.1 < result[key] <= 1.0, (key, result)  # 10 classes: well above chance
    assert main(["eval", "knn", "--checkpoint", str(out), "--train", f"{out}/train", "--test", f"{out}/test"]) == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.batch_size=0", "optim.batch_size=0: must be an integer >= 2"),
        ("optim.lrr=1", "optim.lrr: unknown key"),
        ("hparams.temperature=0", "hparams.temperature=0: must be in (0, 10]"),
        ("views.view.size=2", "views.view.size=2: must be an integer >= 4"),
        ("backbone.kwargs.num_heads=5", "model: cannot build simclr with this config"),
        ("train.workers=3:1", "train.workers='3:1': must be N or MIN:MAX with 1 <= MIN <= MAX"),
        ("optim.batch_size=4096", "optim.batch_size=4096: larger than the 1438 training images in"),
        ("optim.batch_size=4096", "use --set optim.batch_size=1438 or smaller"),
    ],
)
def test_bad_config_fails_fast_with_one_line_before_ray_starts(digits, override, message, capsys, monkeypatch):
    from pipelines import cli

    out, _ = digits
    monkeypatch.setattr(cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray was started for a bad config"))
    assert cli.main(["pretrain", "--method", "simclr", "--data", f"{out}/train", "--set", override]) == 2
    captured = capsys.readouterr()
    lines = said_lines(captured.err)
    assert lines == [f"selfsup pretrain: error: {message}"] or (len(lines) == 1 and message in lines[0])
    assert captured.out == ""


def test_mae_reports_carry_the_label_free_metrics(mae_run):
    metrics = mae_run["metrics"]
    width = LEARNS["mae"][1]["backbone.kwargs.embed_dim"]
    assert metrics["probe_images"] == 256 and 1 < metrics["rankme"] <= width
    assert metrics["rankme_fraction"] == pytest.approx(metrics["rankme"] / width)
    assert 0 <= metrics["alignment"] <= 4 and metrics["uniformity"] <= 0


def test_mae_reconstruction_picture(digits, mae_run, tmp_path, capsys):
    import json

    from PIL import Image

    from pipelines.cli import main

    out, _ = digits
    picture = tmp_path / "mae.png"
    assert main(["viz", "mae", "--checkpoint", mae_run["checkpoint"], "--data", f"{out}/test",
                 "--mask-ratios", "0.5,0.75,0.9", "--images", "3", "--out", str(picture)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mask_ratios"] == [0.5, 0.75, 0.9]
    width, height = Image.open(picture).size
    assert width == 96 * 7 and height > 96 * 3  # original + (masked, reconstruction) x 3
    assert main(["viz", "mae", "--checkpoint", mae_run["checkpoint"], "--data", f"{out}/test",
                 "--mask-ratios", "0.5,1.0", "--out", str(picture)]) == 2


def test_non_finite_loss_stops_without_retrying_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    from pipelines.train.stops import NonFiniteLossError
    from pipelines.weights.checkpoint import load_state

    out, _ = digits
    # Warmup makes step 0's LR 0 (a finite checkpoint after step 1), then the LR explodes the weights.
    config = tiny_config("mae", **{"optim.epochs": 2, "optim.base_lr": 1e30, "optim.warmup_epochs": 1,
                                   "train.checkpoint_every_steps": 1, "train.max_failures": 2,
                                   "train.knn_every_epochs": 0})
    started = time.time()
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+ \(epoch 0\)") as error:
        pretrain(config, f"{out}/train", storage=str(tmp_path / "runs"), name="nan")
    # A worker error would have been retried max_failures times and surfaced as a TrainingFailedError.
    checkpoint = str(error.value).rsplit("(", 1)[1].rstrip(")")
    state = load_state(checkpoint)
    assert 1 <= state["progress"]["step"] < 2 * STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())
    assert time.time() - started < 180


def test_a_warmup_as_long_as_the_run_is_said_before_ray_starts(digits, capsys, monkeypatch):
    from pipelines import cli

    class RayWouldStart(Exception):
        pass

    def refuse(*args, **kwargs):
        raise RayWouldStart

    out, _ = digits
    monkeypatch.setattr(cli, "start_ray", refuse)
    with pytest.raises(RayWouldStart):
        cli.main(["pretrain", "--method", "simclr", "--preset", "tiny", "--data", f"{out}/train", "--set", "optim.epochs=2",
                  "--set", "optim.warmup_epochs=2"])
    assert "optim.warmup_epochs=2 >= optim.epochs=2: the learning rate never leaves warm-up" in capsys.readouterr().err


def test_all_bad_data_fails_once_with_one_attempts_count(ray_session, tmp_path):
    """Every image undecodable: the run stops on its first pass (not retried as a lost worker
    would be, so the count is one attempt's) and says so in one error."""
    from pipelines.images.quality import BadDataError
    from tests.helpers.corpus import write_shards

    write_shards(tmp_path / "bad", [b"not an image"] * 200, rows_per_shard=50)
    config = tiny_config(**{"optim.epochs": 2, "optim.batch_size": 16, "train.max_failures": 2,
                            "train.probe_size": 0})
    started = time.perf_counter()
    with pytest.raises(BadDataError, match=r"train: 200 of 200 images could not be decoded"):
        pretrain(config, str(tmp_path / "bad"), storage=str(tmp_path / "runs"), name="bad")
    assert time.perf_counter() - started < 60


def test_a_pass_where_nothing_decodes_stops_in_its_first_decode_tasks(ray_session, tmp_path):
    """All bad, and far more of it than the early-stop minimum: the decode tasks end the pass once
    they have seen enough (no batch ever reaches the worker to check), so the error counts a
    part of the data, not the whole pass."""
    import re

    from pipelines.images.decode_tasks import MIN_SEEN_FOR_EARLY_STOP
    from pipelines.images.quality import BadDataError
    from tests.helpers.corpus import write_shards

    total = 8 * MIN_SEEN_FOR_EARLY_STOP
    write_shards(tmp_path / "bad", [b"not an image"] * total, rows_per_shard=250)
    # 16 px canvases, 0.2 MB per decode task: 273 rows a task.
    config = tiny_config(**{"optim.epochs": 1, "optim.batch_size": 16, "train.probe_size": 0,
                            "data.decode_block_mb": 0.2})
    with pytest.raises(BadDataError, match=r"train: \d+ of \d+ images could not be decoded") as raised:
        pretrain(config, str(tmp_path / "bad"), storage=str(tmp_path / "runs"), name="bad")
    bad, seen = map(int, re.search(r"(\d+) of (\d+) images", str(raised.value)).groups())
    assert bad == seen and MIN_SEEN_FOR_EARLY_STOP <= seen < total / 2


def test_ctrl_c_says_what_was_kept_and_how_to_resume(digits, tmp_path):
    import subprocess

    import ray

    from tests.helpers.runs import COMMON, TINY

    out, _ = digits
    sets = {**COMMON, **TINY["simclr"], "optim.epochs": 3}
    command = selfsup_command("pretrain", "--method", "simclr", "--preset", "tiny", "--data", f"{out}/train", "--storage", str(tmp_path),
                              "--name", "interrupted", sets=sets)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "interrupted").exists():  # Ray Train has started the run
        assert time.time() < deadline and driver.poll() is None, driver.communicate()[1][-2000:]
        time.sleep(0.2)
    time.sleep(2)
    driver.send_signal(signal.SIGINT)
    stdout, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last == (f"selfsup pretrain: interrupted: the checkpoints written so far are kept in "
                    f"{tmp_path}/interrupted; run the same command with --name interrupted to resume")
    assert stdout == ""  # no JSON line: the run did not finish


def test_step_threads_share_the_node_among_its_training_workers():
    from pipelines.train.worker import step_threads

    assert step_threads(0, 1, node_cpus=2, workers_on_node=1) == 2  # the 2-core laptop: both cores
    assert step_threads(0, 1, node_cpus=2, workers_on_node=2) == 1
    assert step_threads(0, 4, node_cpus=6, workers_on_node=2) == 4  # never below the reservation
    assert step_threads(3, 1, node_cpus=64, workers_on_node=1) == 3  # set: taken as is
