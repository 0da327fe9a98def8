"""Ray Train pretraining: kill-and-resume, restart-resume, fail-fast config, online metrics."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from pipelines.config import build_config
from pipelines.pretrain import pretrain
from pipelines.train_loop import lr_at, plan

COMMON = {"data.canvas_size": 16, "data.decode_num_cpus": 0.25, "views.view.size": 16, "optim.batch_size": 64,
          "train.knn_every_epochs": 1}
TINY = {
    "simclr": {"backbone.kwargs.channels": [8, 16, 32, 64], "backbone.kwargs.stem_width": 8},
    "mae": {"backbone.img_size": 16, "backbone.kwargs.embed_dim": 32, "backbone.kwargs.depth": 2,
            "backbone.kwargs.num_heads": 2},
}
STEPS_PER_EPOCH = 1438 // 64  # sample:digits train split, global batch 64


def tiny_config(method="simclr", **sets):
    return build_config(method, "tiny", sets={**COMMON, **TINY[method], **sets})


@pytest.mark.parametrize("method", ["simclr", "mae"])
def test_worker_killed_mid_run_resumes_from_checkpoint_and_finishes_on_plan(digits, tmp_path, method):
    from ray.util.state import list_actors

    out, _ = digits
    config = tiny_config(method, **{"optim.epochs": 2, "train.checkpoint_every_steps": 4, "train.max_failures": 1})
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
    total = 2 * STEPS_PER_EPOCH
    assert metrics["step"] == metrics["total_steps"] == total
    assert 4 <= metrics["resumed_from_step"] < total  # it did resume, from a checkpoint
    schedule = plan(config, 1438)  # what an uninterrupted run plans
    assert metrics["lr"] == pytest.approx(lr_at(total - 1, schedule))  # same schedule position
    assert 0 <= metrics["knn_top1"] <= 1 and metrics["embedding_std"] > 0 and 0 <= metrics["data_wait_frac"] <= 1


@pytest.fixture(scope="module")
def one_epoch_run(digits, tmp_path_factory):
    out, _ = digits
    storage = str(tmp_path_factory.mktemp("runs"))
    first = pretrain(tiny_config(**{"optim.epochs": 1}), f"{out}/train", storage=storage, name="again")
    return storage, first


def test_rerun_with_the_same_name_resumes_instead_of_starting_over(digits, one_epoch_run):
    out, _ = digits
    storage, first = one_epoch_run
    assert first["metrics"]["step"] == STEPS_PER_EPOCH and first["metrics"]["resumed_from_step"] == 0
    second = pretrain(tiny_config(**{"optim.epochs": 2}), f"{out}/train", storage=storage, name="again")
    assert second["metrics"]["resumed_from_step"] == STEPS_PER_EPOCH
    assert second["metrics"]["step"] == 2 * STEPS_PER_EPOCH


def test_eval_cli_prints_encoder_floor_and_raw_pixels(digits, one_epoch_run, capsys):
    import json

    from pipelines.cli import main
    from pipelines.evaluate import load_checkpoint

    out, _ = digits
    checkpoint = one_epoch_run[1]["checkpoint"]
    method, config = load_checkpoint(checkpoint)  # weights_only load
    assert config.optim.epochs == 1 and config.method == "simclr"
    for protocol in ("knn", "linear"):
        assert main(["eval", protocol, "--checkpoint", checkpoint, "--train", f"{out}/train",
                     "--test", f"{out}/test"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["protocol"] == protocol
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
    ],
)
def test_bad_config_fails_fast_with_one_line_before_ray_starts(digits, override, message):
    out, _ = digits
    started = time.time()
    process = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "pretrain", "--method", "simclr", "--data", f"{out}/train",
         "--set", override],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert lines == [f"selfsup pretrain: error: {message}"] or (len(lines) == 1 and message in lines[0])
    assert process.stdout == ""
    assert time.time() - started < 60


@pytest.fixture(scope="module")
def mae_run(digits, tmp_path_factory):
    out, _ = digits
    storage = str(tmp_path_factory.mktemp("mae_runs"))
    return pretrain(tiny_config("mae", **{"optim.epochs": 2}), f"{out}/train", val=f"{out}/test",
                    storage=storage, name="mae")


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
    from pipelines.train_loop import NonFiniteLossError, load_state

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
