"""Distillation (issue 32): the loss against its formula, the queue, the frozen teacher, and the
teachers refused before Ray starts."""

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F

from methods.distill import QueueDistillationLoss, TeacherQueue
from methods.weights import WeightsError
from pipelines.cli import main
from pipelines.config import build_method, pinned_config
from tests.helpers.runs import tiny_config

TEACHER_ARGS = {"channels": [8, 16, 32, 64], "stem_width": 8}


def save_teacher(folder, **args):
    """A timm model folder (what `timm.models.save_for_hf` writes) of a small resnet18 teacher."""
    from timm.models import save_for_hf

    model = timm.create_model("resnet18", num_classes=0, **{**TEACHER_ARGS, **args})
    save_for_hf(model, str(folder), model_config={"model_args": {**TEACHER_ARGS, **args, "num_classes": 0}},
                safe_serialization=True)
    return model


def with_teacher(path, **sets):
    return tiny_config("distill", **{"hparams.teacher": "", "hparams.teacher_args": {},
                                     "hparams.teacher_weights": str(path), **sets})


def test_the_loss_is_the_kl_between_softmaxes_over_the_queue():
    torch.manual_seed(0)
    student, teacher, classifier = torch.randn(5, 8), torch.randn(5, 8), F.normalize(torch.randn(12, 8), dim=1)
    loss = QueueDistillationLoss(teacher_temperature=0.05, student_temperature=0.2)(student, teacher, classifier)
    expected = 0.0
    for s, t in zip(F.normalize(student, dim=1), F.normalize(teacher, dim=1)):
        p = torch.softmax(t @ classifier.T / 0.05, dim=0)
        q = torch.softmax(s @ classifier.T / 0.2, dim=0)
        expected += float((p * (p.log() - q.log())).sum()) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    same = QueueDistillationLoss(0.1, 0.1)(teacher * 3, teacher, classifier)  # same direction, equal temperatures
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="student_temperature=0: must be > 0"):
        QueueDistillationLoss(0.1, 0)


def test_only_the_student_gets_a_gradient():
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    QueueDistillationLoss()(student, teacher, F.normalize(torch.randn(6, 8), dim=1)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def as_set(rows: torch.Tensor) -> set:
    return {tuple(round(x, 5) for x in row) for row in rows.tolist()}


def test_the_queue_is_first_in_first_out_and_keeps_the_newest_rows():
    queue = TeacherQueue(size=5, dim=2)
    assert queue.contents().shape == (0, 2)
    rows = F.normalize(torch.arange(1, 15, dtype=torch.float).view(7, 2), dim=1)
    queue.push(rows[:3])
    assert torch.allclose(queue.contents(), rows[:3])
    queue.push(rows[3:7])  # 7 rows into 5 places: the oldest two are overwritten
    assert int(queue.filled) == 5
    assert as_set(queue.contents()) == as_set(rows[2:7])
    queue.push(torch.cat([rows, rows]))  # more than it holds at once: the last 5 pushed
    assert as_set(queue.contents()) == as_set(rows[2:7])
    assert set(queue.state_dict()) == {"rows", "filled", "next"}  # a checkpoint keeps it
    resumed = TeacherQueue(size=5, dim=2)
    resumed.load_state_dict(queue.state_dict())
    assert torch.equal(resumed.contents(), queue.contents())  # and a resume reads it back


def test_the_teacher_stays_frozen_outside_the_optimizer_and_the_checkpoint():
    method = build_method(tiny_config("distill"))
    optimizer = method.make_optimizer(method.param_groups(1e-4), 1e-2, tiny_config("distill").optim)
    batch = {"image": torch.randint(0, 256, (32, 16, 16, 3), dtype=torch.uint8)}
    for step in range(3):
        loss, _ = method(method.step_input(batch))
        loss.backward()
        if step == 0:
            teacher = method._teacher[0]
            before = {k: v.clone() for k, v in teacher.state_dict().items()}
        optimizer.step()
        optimizer.zero_grad()
        method.after_step(step, 3)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN statistics too
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("_teacher") for k in method.state_dict()) and int(method.queue.filled) == 96


def test_a_timm_folder_teacher_is_read_fitted_and_pinned_by_its_hash(tmp_path):
    saved = save_teacher(tmp_path / "teacher")
    config = with_teacher(tmp_path / "teacher")
    assert config.hparams.teacher_dim == saved.num_features and len(config.hparams.teacher_sha256) == 64
    method = build_method(config)
    views = torch.randn(3, 3, 16, 16)
    assert torch.allclose(method.teacher_embeddings(views), saved.eval()(views), atol=1e-5)  # same normalisation
    again = pinned_config(config)  # pinned once more, as make_trainer does: the same values, accepted
    assert again.hparams == config.hparams
    save_teacher(tmp_path / "teacher", channels=[8, 16, 32, 64])  # same shapes, new random weights
    with pytest.raises(WeightsError, match=r"hparams.teacher_sha256='[0-9a-f]{64}': hparams.teacher_weights .* gives"):
        pinned_config(config)
    with pytest.raises(WeightsError, match="the run pinned"):  # a worker that finds another file
        build_method(config).teacher_on(torch.device("cpu"))


@pytest.mark.parametrize("sets, says", [
    ({"hparams.teacher_weights": ""}, "hparams.teacher_weights: required"),
    ({"hparams.teacher_weights": "/nowhere/teacher"},
     "hparams.teacher_weights /nowhere/teacher: no such file or folder"),
    ({"hparams.teacher": "resnet34"}, "hparams.teacher='resnet34': .*config.json says its weights are 'resnet18'"),
    ({"hparams.teacher_args": {"channels": [16, 32, 64, 128]}},
     r"does not fit timm's resnet18: \d+ shapes differ \(first: layer1"),
])
def test_a_teacher_that_does_not_fit_is_refused_naming_the_first_mismatch(tmp_path, sets, says):
    save_teacher(tmp_path / "teacher")
    with pytest.raises(WeightsError, match=says):
        with_teacher(tmp_path / "teacher", **sets)


def test_a_teacher_that_cannot_take_the_views_is_refused_with_its_own_size(tmp_path):
    from timm.models import save_for_hf

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=1)
    save_for_hf(vit, str(tmp_path / "vit"), model_config={"model_args": {"depth": 1, "num_classes": 0}},
                safe_serialization=True)
    with pytest.raises(WeightsError, match="cannot take 16 px views .*teacher_image_size=224"):
        with_teacher(tmp_path / "vit")
    assert with_teacher(tmp_path / "vit", **{"hparams.teacher_image_size": 224}).hparams.teacher_dim == 192
    resized = with_teacher(tmp_path / "vit", **{"hparams.teacher_args": {"dynamic_img_size": True}})
    assert resized.hparams.teacher_dim == 192  # position embeddings interpolated to 16 px


def test_pretrain_refuses_a_missing_teacher_in_one_line_before_ray(tmp_path, capsys):
    code = main(["pretrain", "--method", "distill", "--data", str(tmp_path), "--set",
                 f"hparams.teacher_weights={tmp_path}/missing.safetensors"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == ("selfsup pretrain: error: hparams.teacher_weights "
                                     f"{tmp_path}/missing.safetensors: no such file or folder")


def test_a_distilled_checkpoint_loads_without_its_teacher(tmp_path):
    """Evaluation and export build the student from the run's config: the teacher file need not exist."""
    save_teacher(tmp_path / "teacher")
    config = with_teacher(tmp_path / "teacher")
    (tmp_path / "teacher" / "model.safetensors").unlink()
    method = build_method(dataclasses.replace(config))
    assert method.features(torch.randn(2, 3, 16, 16)).shape == (2, 64)


def test_a_rerun_or_resume_on_another_teacher_is_refused_in_one_line(tmp_path):
    """The checkpoint's config records the teacher's hash: a rerun under the same --name that finds
    another file is refused like a changed setting, and --resume does not continue it either."""
    import json

    import yaml

    from pipelines.console import UsageError
    from pipelines.train.plan import plan_run
    from pipelines.train.preflight import check_rerun
    from pipelines.weights.checkpoint import CONFIG_FILE

    save_teacher(tmp_path / "teacher")
    first = with_teacher(tmp_path / "teacher")
    plan = plan_run(first, 1438)
    checkpoint = tmp_path / "runs" / "mine" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / CONFIG_FILE).write_text(yaml.safe_dump(first.to_dict()))
    (tmp_path / "runs" / "mine" / "metrics.jsonl").write_text(json.dumps({"step": 5, "total_steps": plan.total_steps}))
    assert check_rerun(first, plan, str(tmp_path / "runs"), "mine") is None  # interrupted, same teacher: resumes
    save_teacher(tmp_path / "teacher")  # other weights in the same place
    second = with_teacher(tmp_path / "teacher")
    for resume in (False, True):
        with pytest.raises(UsageError, match="teacher_sha256=") as refused:
            check_rerun(second, plan, str(tmp_path / "runs"), "mine", resume)
        assert "\n" not in str(refused.value)


MARGIN = 0.05  # kNN top-1 points over the random-init student; docs/BENCHMARKS.md holds the seeds' margins


@pytest.mark.slow  # SimCLR's "it learns" run as the teacher, then four epochs of distillation
def test_a_student_distilled_from_a_small_teacher_beats_its_random_init(digits, learns_run, tmp_path):
    import shutil

    from pipelines.evaluate.frozen import evaluate_checkpoint
    from pipelines.outputs.export import export_encoder
    from pipelines.train.pretrain import pretrain
    from tests.helpers.runs import distill_learns_config

    out, _ = digits
    teacher = export_encoder(learns_run("simclr")["checkpoint"], str(tmp_path / "teacher"))["out"]
    run = pretrain(distill_learns_config(teacher), f"{out}/train", storage=str(tmp_path / "runs"), name="student")
    assert run["metrics"]["step"] == run["metrics"]["total_steps"]
    shutil.rmtree(teacher)  # the student is scored without its teacher
    scores = evaluate_checkpoint(run["checkpoint"], f"{out}/train", f"{out}/test", "knn")
    assert scores["top1"] >= scores["random_init_top1"] + MARGIN, scores


def test_loading_the_teacher_leaves_the_training_rng_alone():
    method = build_method(tiny_config("distill"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    method.teacher_on(torch.device("cpu"))  # at a worker's first step: the random teacher is built seeded
    assert torch.equal(torch.rand(3), expected)


def _queue_after_one_step(rank, init_file, out_folder):
    """One distillation step on this rank's half of a fixed batch, as a Ray Train worker takes it
    (teacher embeddings, forward, backward, after_step); saves the rank's queue."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    method = build_method(tiny_config("distill"))
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))[rank * 4:(rank + 1) * 4]
    loss, _ = method([images, method.teacher_embeddings(images)])
    loss.backward()
    method.after_step(0, 1)
    torch.save(method.queue.contents(), f"{out_folder}/queue{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # spawns its own processes (two gloo workers)
def test_the_queue_is_gathered_from_every_worker_and_the_same_on_each(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_queue_after_one_step, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    queues = [torch.load(tmp_path / f"queue{rank}.pt", weights_only=True) for rank in (0, 1)]
    method = build_method(tiny_config("distill"))
    expected = F.normalize(method.teacher_embeddings(torch.randn(8, 3, 16, 16,
                                                                 generator=torch.Generator().manual_seed(1))), dim=1)
    assert torch.allclose(queues[0], expected, atol=1e-5) and torch.equal(queues[0], queues[1])
