import json

import pytest
from PIL import Image

from pipelines.cli import main
from tests.helpers.cli import said_lines


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_prepare_sample_prints_counts_that_match_the_data(ray_session, tmp_path, capsys):
    assert main(["prepare", "sample:digits", "--out", str(tmp_path / "d")]) == 0
    result = last_json(capsys)
    assert result["images_written"] == 1797 and result["bad_skipped"] == 0
    assert result["splits"]["train"]["images"] + result["splits"]["test"]["images"] == 1797


def test_viz_augment_draws_originals_beside_views(digits, tmp_path, capsys):
    out, _ = digits
    picture = tmp_path / "dino.png"
    code = main(["viz", "augment", "--data", f"{out}/train", "--method", "dino", "--out", str(picture),
                 "--images", "3", "--canvas-size", "32", "--set", "local.copies=2"])
    assert code == 0
    result = last_json(capsys)
    assert result["views"] == ["global1", "global2", "local", "local"]
    width, height = Image.open(picture).size
    assert width == 96 * 5 and height > 96 * 3


def test_mae_picture_shows_the_patches_the_encoder_does_not_see(digits, tmp_path, capsys):
    import torch

    from methods.mae import MAE
    from pipelines.outputs.viz import Masking

    out, _ = digits
    picture = tmp_path / "mae.png"
    assert main(["viz", "augment", "--data", f"{out}/train", "--method", "mae", "--out", str(picture),
                 "--images", "2", "--canvas-size", "32"]) == 0
    assert Image.open(picture).size[0] == 96 * 3  # original, the view, the view masked
    views = torch.full((2, 3, 32, 32), 5.0)  # a value no grey patch has
    masked = Masking(MAE, 0.75, 4).hide(views)
    hidden = (masked != 5.0).all(dim=1).float().mean(dim=(1, 2))
    assert torch.allclose(hidden, torch.tensor([0.75, 0.75]))  # 48 of the 64 patches, each image


def test_bad_arguments_end_with_one_line_and_exit_2(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    [err] = said_lines(capsys.readouterr().err)
    assert err.startswith("selfsup prepare: error:") and str(tmp_path / "nope") in err
    assert main(["viz", "augment", "--data", str(tmp_path), "--method", "simclr", "--out", "x.png",
                 "--set", "view.scale=[0.9,0.1]"]) == 2
    assert "views.view.scale" in capsys.readouterr().err


def test_prepare_refuses_an_output_holding_shards_before_ray_starts(digits, tmp_path, capsys, monkeypatch):
    import pytest

    from pipelines import cli

    out, _ = digits
    monkeypatch.setattr(cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray was started"))
    assert cli.main(["prepare", "sample:digits", "--out", out]) == 2
    assert said_lines(capsys.readouterr().err) == [
        f"selfsup prepare: error: --out {out}: already holds Parquet files; pass --overwrite to replace them"]


def test_viz_attention_refuses_a_method_without_attention_and_names_those_with_it(tmp_path, capsys):
    import torch

    from pipelines.config import build_method
    from pipelines.weights.checkpoint import save_checkpoint
    from tests.helpers.runs import tiny_config

    config = tiny_config("simclr")
    method = build_method(config)
    save_checkpoint(str(tmp_path), method, torch.optim.SGD(method.parameters(), lr=0.1),
                    torch.amp.GradScaler(enabled=False), {"epoch": 1, "step": 1, "step_in_epoch": 0}, config)
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16)).save(image)
    assert main(["viz", "attention", "--checkpoint", str(tmp_path), "--image", str(image),
                 "--out", str(tmp_path / "out.png")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a simclr checkpoint" in error and "method that shows attention (dino)" in error


def test_the_demo_holds_its_learning_rate_at_the_peak_after_the_warm_up():
    # Annealing to 0 over the demo's few epochs cost 13 points of kNN (docs/BENCHMARKS.md). The
    # peak moves with the batch; the held LR must move with it (an absolute optim.min_lr made a
    # batch-32 run's LR rise from 1.70 to 2.4 after the warm-up).
    from pipelines.config import build_config
    from pipelines.train.plan import plan_run

    for sets in ({"optim.epochs": 10}, {"optim.epochs": 15}, {"optim.batch_size": 32, "optim.epochs": 40}):
        schedule = plan_run(build_config("simclr", "demo", sets=sets), 4000)
        after_warm_up = range(schedule.warmup_steps, schedule.total_steps)
        assert schedule.warmup_steps > 0
        assert all(abs(schedule.lr_at(step) - schedule.peak_lr) < 1e-9 for step in after_warm_up)
    rising = build_config("simclr", "tiny", sets={"optim.batch_size": 32, "optim.min_lr": 2.4})
    with pytest.raises(ValueError, match=r"optim.min_lr=2.4: above the peak LR 1.697 at batch 32, so the LR would"):
        plan_run(rising, 4000)
