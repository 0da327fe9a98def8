"""Fine-tuning (`selfsup finetune`): the few-label subset, the classifier and its recipe, the
refusals before Ray, and a whole run with its export."""

from __future__ import annotations

import json
import os
import subprocess
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli import main
from pipelines.config import build_method
from pipelines.images.labeled import check_test_classes, labeled_subset
from pipelines.images.shards import SHARD_SCHEMA, DataError
from pipelines.train.classifier import ClassifierBuild
from pipelines.train.finetune import plan_finetune
from pipelines.train.plan import plan_run
from pipelines.weights.checkpoint import save_checkpoint
from tests.helpers.cli import said_lines, selfsup_command
from tests.helpers.corpus import encode, rgb_image
from tests.helpers.runs import tiny_config


def write_labeled(folder, counts: dict[int | None, int], shards: int = 1, reverse: bool = False) -> str:
    """Shards holding `counts[label]` 8 px images of each label (None: unlabeled), ids
    `c<label>-<n>`, in `shards` files, rows in reverse order when asked."""
    rows = [(f"c{label}-{n}", label) for label, count in counts.items() for n in range(count)]
    rows = rows[::-1] if reverse else rows
    os.makedirs(folder, exist_ok=True)
    for part in range(shards):
        mine = rows[part::shards]
        table = pa.table({"image": [encode(rgb_image(i, (8, 8))) for i in range(len(mine))],
                          "label": [label for _, label in mine], "id": [record for record, _ in mine]},
                         schema=SHARD_SCHEMA)
        pq.write_table(table, os.path.join(folder, f"part-{part}.parquet"))
    return str(folder)


def test_the_few_labels_are_the_first_by_crc32_in_any_shard_order(tmp_path):
    one = write_labeled(tmp_path / "one", {0: 9, 1: 7, 2: 5})
    other = write_labeled(tmp_path / "other", {0: 9, 1: 7, 2: 5}, shards=3, reverse=True)
    subset = labeled_subset(one, labels_per_class=3)
    assert subset.ids == labeled_subset(other, labels_per_class=3).ids
    assert subset.per_class == {0: 3, 1: 3, 2: 3} and subset.rows == 9 and subset.num_classes == 3
    # independently: per class, the three ids with the smallest CRC-32
    expected = {record for label, count in {0: 9, 1: 7, 2: 5}.items()
                for record in sorted((f"c{label}-{n}" for n in range(count)), key=lambda r: zlib.crc32(r.encode()))[:3]}
    assert set(subset.ids) == expected
    # a larger subset holds the smaller one: adding labels never swaps the first ones out
    assert set(subset.ids) < set(labeled_subset(one, labels_per_class=4).ids)
    fraction = labeled_subset(one, label_fraction=0.3)
    assert fraction.per_class == {0: 3, 1: 2, 2: 2}  # round(0.3 n), at least 1
    everything = labeled_subset(write_labeled(tmp_path / "some-unlabeled", {0: 4, None: 3, 1: 2}))
    assert everything.ids is None and everything.rows == 6 and everything.per_class == {0: 4, 1: 2}


def test_a_labeled_set_it_cannot_use_is_refused_in_one_line(tmp_path):
    data = write_labeled(tmp_path / "train", {0: 5, 1: 2})
    with pytest.raises(DataError, match="--labels-per-class 3: class 1 has only 2 labeled images"):
        labeled_subset(data, labels_per_class=3)
    with pytest.raises(DataError, match="no record has a label"):
        labeled_subset(write_labeled(tmp_path / "unlabeled", {None: 4}))
    subset = labeled_subset(data)
    with pytest.raises(DataError, match="class 1 is in the training labels but has no test image"):
        check_test_classes(write_labeled(tmp_path / "test-missing", {0: 3}), subset)
    with pytest.raises(DataError, match="class 2 has test images but none in --data"):
        check_test_classes(write_labeled(tmp_path / "test-extra", {0: 1, 1: 1, 2: 1}), subset)
    assert check_test_classes(write_labeled(tmp_path / "test", {0: 2, 1: 1}), subset) == 3


def vit_config():
    return tiny_config("mae", **{"optim.epochs": 1, "optim.warmup_epochs": 0.5})


def test_the_classifier_starts_from_the_encoder_and_decays_the_lr_by_layer(tmp_path):
    config = vit_config()
    subset = labeled_subset(write_labeled(tmp_path / "train", {0: 4, 1: 4}))
    run = plan_finetune(config, subset, sets={"finetune.layer_decay": 0.5})
    classifier = run.build(config)
    method = build_method(config)
    torch.nn.init.normal_(method.backbone.cls_token)  # differs from any random init
    classifier.init_encoder(method.encoder().state_dict())
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(classifier.model.forward_features(images), method.backbone.forward_features(images))
    scales = {group["lr_scale"] for group in classifier.param_groups(0.05)}
    depth = len(classifier.model.blocks)
    # embeddings, each block, the head: 0.5^(depth+1) ... 0.5, 1
    assert sorted(scales) == pytest.approx(sorted(0.5 ** k for k in range(depth + 2)))
    with pytest.raises(ValueError, match="do not fit the classifier"):
        classifier.init_encoder({"cls_token": method.backbone.cls_token})


def test_a_few_steps_of_the_classifier_learn_a_fixed_batch():
    config = vit_config()
    classifier = ClassifierBuild({"layer_decay": 0.75, "label_smoothing": 0.0, "views": {}}, 3)(config)
    batch = {"image": torch.randint(0, 256, (12, 16, 16, 3), dtype=torch.uint8),
             "label": torch.arange(12) % 3}
    optimizer = classifier.make_optimizer(classifier.param_groups(0.0), 3e-3, config.optim)
    torch.manual_seed(0)
    inputs = [classifier.eval_images(batch["image"]), batch["label"]]
    first = classifier(inputs)[0].item()
    for _ in range(30):
        optimizer.zero_grad()
        loss, stats = classifier(inputs)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first and stats["train_top1"].item() == 1.0


def test_a_run_planned_from_a_preset_fits_what_the_user_did_not_set(tmp_path, caplog):
    config = vit_config()
    subset = labeled_subset(write_labeled(tmp_path / "train", {0: 5, 1: 5}))
    run = plan_finetune(config, subset, sets={"optim.epochs": 3})
    assert run.preset == "vit-small-images" and run.config.optim.batch_size == 10  # the preset's 32 > 10 images
    assert run.config.optim.warmup_epochs == pytest.approx(5 * 3 / 50)
    assert run.config.backbone == config.backbone and run.config.train.probe_size == 0
    simclr = plan_finetune(tiny_config("simclr"), subset, sets={"optim.epochs": 3, "optim.batch_size": 8})
    assert simclr.preset == "resnet-small-images"  # linear scaling, not SimCLR's sqrt rule: 0.36 x 8 / 256
    assert plan_run(simclr.config, subset.rows).peak_lr == pytest.approx(0.36 * 8 / 256)
    with pytest.raises(ValueError, match="optim.warmup_epochs=4: must be in"):  # both set by the user: refused
        plan_finetune(config, subset, sets={"optim.epochs": 3, "optim.warmup_epochs": 4})
    with pytest.raises(ValueError, match="--set backbone.kwargs.depth: the encoder's architecture"):
        plan_finetune(config, subset, sets={"backbone.kwargs.depth": 2})
    with pytest.raises(ValueError, match="finetune.layer_decay=1.5"):
        plan_finetune(config, subset, sets={"finetune.layer_decay": 1.5})
    with pytest.raises(ValueError, match="--preset cnn: unknown fine-tuning preset"):
        plan_finetune(config, subset, preset="cnn")


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint of the tiny ViT, written without Ray."""
    config = vit_config()
    method = build_method(config)
    optimizer = method.make_optimizer(method.param_groups(0.0), 1e-3, config.optim)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_checkpoint(str(folder), method, optimizer, torch.amp.GradScaler("cpu", enabled=False), {}, config)
    return str(folder)


@pytest.mark.parametrize("train, test, extra, message", [
    ({None: 6}, {0: 1}, [], "no record has a label"),
    ({0: 6, 1: 2}, {0: 1, 1: 1}, ["--labels-per-class", "3"], "class 1 has only 2 labeled images"),
    ({0: 6, 1: 6}, {0: 1}, [], "class 1 is in the training labels but has no test image"),
    ({0: 6, 1: 6}, {0: 1, 1: 1}, ["--set", "hparams.mask_ratio=0.5"], "--set hparams.mask_ratio: the encoder's"),
    ({0: 6, 1: 6}, {0: 1, 1: 1}, ["--labels-per-class", "0"], "--labels-per-class 0: must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2_before_ray(tmp_path, checkpoint, capsys, monkeypatch, train, test, extra,
                                                     message):
    from pipelines import cli

    monkeypatch.setattr(cli, "start_ray", lambda *_: pytest.fail("Ray was started"))
    args = ["finetune", "--checkpoint", checkpoint, "--data", write_labeled(tmp_path / "train", train),
            "--test", write_labeled(tmp_path / "test", test), *extra]
    assert main(args) == 2
    lines = said_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.slow
def test_finetune_ends_with_its_json_line_and_a_classifier_timm_loads(digits, one_epoch_run, tmp_path):
    """A whole run on its own local Ray: the pretrained and the scratch run, each scored, and the
    exported classifier giving the same class scores through timm."""
    out, _ = digits
    _, pretrained = one_epoch_run
    export = tmp_path / "classifier"
    command = selfsup_command("finetune", "--checkpoint", pretrained["checkpoint"], "--data", f"{out}/train",
                              "--test", f"{out}/test", "--labels-per-class", "5", "--out", str(export),
                              "--storage", str(tmp_path / "runs"), "--num-cpus", "2",
                              sets={"optim.epochs": 4, "data.decode_num_cpus": 0.25})
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["labels_per_class"] == 5 and result["train_images"] == 50 and result["classes"] == 10
    assert 0.0 <= result["top1"] <= 1.0 and 0.0 <= result["scratch_top1"] <= 1.0
    assert set(result["checkpoints"]) == {"top1", "scratch_top1"}  # the pretrained run and the scratch one
    from pipelines.outputs.export import load_exported

    config = json.loads((export / "config.json").read_text())
    assert config["num_classes"] == 10 and config["selfsup"]["top1"] == result["top1"]
    assert result["export"]["max_score_difference"] <= 1e-4  # timm's model gave the classifier's scores
    model = load_exported(str(export))  # the small-stem ResNet: the recipe `load` prints, no selfsup model code
    assert "model.conv1 = torch.nn.Conv2d" in result["export"]["load"]
    with torch.no_grad():
        scores = model(torch.randn(3, 3, 32, 32))
    assert scores.shape == (3, 10) and torch.isfinite(scores).all()


def test_a_finetune_checkpoint_given_as_a_pretraining_one_is_refused_in_one_line(tmp_path):
    from pipelines.weights.checkpoint import CheckpointRefused, load_checkpoint

    config = vit_config()
    classifier = ClassifierBuild({"layer_decay": 0.75, "label_smoothing": 0.1, "views": {}}, 3)(config)
    optimizer = classifier.make_optimizer(classifier.param_groups(0.0), 1e-3, config.optim)
    save_checkpoint(str(tmp_path), classifier, optimizer, torch.amp.GradScaler("cpu", enabled=False), {}, config)
    with pytest.raises(CheckpointRefused, match="its weights are not a mae pretraining run's"):
        load_checkpoint(str(tmp_path))
