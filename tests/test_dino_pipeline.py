"""DINO through the whole pipeline: collapse monitoring (its "it learns" run vs a centering-off
ablation) and the attention picture from a trained checkpoint."""

import json

import pytest

from pipelines.train.pretrain import pretrain
from tests.helpers.runs import LEARNS, STEPS_PER_EPOCH, tiny_config

COLLAPSE_METRICS = ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "center_norm",
                    "embedding_std", "collapsed", "koleo")
LEARNS_SETS = LEARNS["dino"][1]


@pytest.fixture(scope="module")
def default_run(learns_run):
    """DINO's "it learns" run (tests/helpers/runs.py `LEARNS`), shared with tests/test_learns.py."""
    return learns_run("dino")


def test_default_run_reports_collapse_metrics_and_does_not_collapse(default_run):
    metrics = default_run["metrics"]
    assert all(key in metrics for key in COLLAPSE_METRICS), metrics
    assert metrics["collapsed"] == 0.0  # neither DINO's own signatures nor the rank check (RankMe)
    assert metrics["step"] == metrics["total_steps"] == LEARNS_SETS["optim.epochs"] * STEPS_PER_EPOCH
    assert 1 < metrics["rankme"] <= LEARNS_SETS["backbone.kwargs.embed_dim"]
    assert "alignment" in metrics and "uniformity" in metrics


def test_centering_off_ablation_trips_the_collapse_flag(digits, tmp_path):
    # The paper's head (no BatchNorm, which by itself resists this collapse) without centering:
    # sharpening alone drives every image to the same output dimension.
    out, _ = digits
    config = tiny_config("dino", **{"optim.epochs": 2, "hparams.centering": False, "hparams.head_batch_norm": False})
    metrics = pretrain(config, f"{out}/train", storage=str(tmp_path), name="no-centering")["metrics"]
    assert metrics["collapsed"] == 1.0
    assert metrics["teacher_batch_entropy"] < 0.1 * 5.545  # ln 256


def test_attention_picture_from_the_trained_checkpoint(default_run, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from pipelines.cli import main

    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    picture = tmp_path / "attention.png"
    checkpoint = default_run["checkpoint"]
    assert main(["viz", "attention", "--checkpoint", checkpoint, "--image", str(image), "--out", str(picture)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    heads = LEARNS_SETS["backbone.kwargs.num_heads"]
    assert result["heads"] == heads and result["size"] == 16
    width, height = Image.open(picture).size
    assert width == 160 * (1 + heads + 1) and height > 160  # image, one map per head, their mean
    assert main(["viz", "attention", "--checkpoint", checkpoint, "--image", str(image), "--out", str(picture),
                 "--size", "18"]) == 2  # not a multiple of the patch size
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["viz", "attention", "--checkpoint", checkpoint, "--image", str(tmp_path / "broken.png"),
                 "--out", str(picture)]) == 2
