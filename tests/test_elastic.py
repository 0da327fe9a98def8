"""The batch policy of elastic runs, and the resize test on a simulated 3-node cluster."""

import pytest

from pipelines.config import parse_workers
from pipelines.train.plan import batch_plan


@pytest.mark.parametrize("recipe, world, cap, expected", [
    (96, 3, 0, (32, 1, 96)),       # divides: the recipe's batch, no accumulation
    (96, 2, 0, (48, 1, 96)),
    (96, 2, 16, (16, 3, 96)),      # a memory cap: accumulation keeps the recipe's batch
    (4096, 2, 512, (512, 4, 4096)),
    (4096, 3, 512, (455, 3, 4095)),  # 3 never divides 4096: the largest batch below it
    (64, 3, 0, (21, 1, 63)),
])
def test_batch_plan_keeps_the_recipe_batch_when_it_can(recipe, world, cap, expected):
    plan = batch_plan(recipe, world, cap, "linear")
    assert (plan.worker_batch, plan.accumulation, plan.global_batch) == expected
    assert plan.worker_batch <= (cap or recipe)
    assert plan.lr_factor == pytest.approx(plan.global_batch / recipe)  # linear rule
    assert plan.exact == (plan.global_batch == recipe)
    assert ("not the recipe's" in plan.describe()) != plan.exact


def test_batch_plan_applies_the_methods_rule_to_the_batch_it_uses():
    assert batch_plan(64, 3, 0, "sqrt").lr_factor == pytest.approx((63 / 64) ** 0.5)
    with pytest.raises(ValueError, match="fewer images than the 4 workers"):
        batch_plan(3, 4)


@pytest.mark.parametrize("value, expected", [(2, (2, 2)), ("3", (3, 3)), ("1:3", (1, 3)), ([2, 4], (2, 4))])
def test_workers_are_a_count_or_a_range(value, expected):
    assert parse_workers(value) == expected


@pytest.mark.parametrize("value", ["0", "3:1", "a:b", "1:2:3", "", 0, True, [1]])
def test_bad_worker_counts_are_refused(value):
    with pytest.raises(ValueError, match="must be N or MIN:MAX"):
        parse_workers(value)


@pytest.mark.slow  # spawns its own processes (a worker group or a simulated cluster)
def test_an_elastic_run_shrinks_and_grows_with_the_cluster_and_keeps_its_recipe(tmp_path):
    """`train.workers=1:3` on a simulated 3-node spot cluster (tests/helpers/elastic_run.py): a worker's
    node is preempted, the group goes on from the checkpoint with 1 worker, a node comes back,
    the group grows to 2 on it; the run completes its planned images and every schedule stays on
    plan. (The suite's node-loss test: a lost node, the resume from a checkpoint, the new node.)"""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from pipelines.config import build_method
    from pipelines.train.plan import plan_run
    from tests.helpers.elastic_run import ELASTIC
    from tests.helpers.runs import simulated_cluster_environment, tiny_config
    from tests.helpers.timing import deadline

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Its own short Ray temp folder (socket paths < 108 bytes); a lost node's resources can still
    # look reserved for a while: a worker group that cannot start is given up on after 20 s.
    env = simulated_cluster_environment(RAY_TMPDIR=tempfile.mkdtemp(prefix="selfsup-ray-", dir="/tmp"),
                                        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20")
    process = subprocess.run([sys.executable, "-m", "tests.helpers.elastic_run", str(tmp_path)],
                             capture_output=True, text=True, timeout=deadline("elastic"), env=env, cwd=root)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    history, metrics = report["history"], report["metrics"]

    config = tiny_config("dino", **ELASTIC)
    schedule = plan_run(config, 1438)
    assert metrics["step"] == metrics["total_steps"] == schedule.total_steps
    assert metrics["samples"] == schedule.total_steps * 96  # the planned images, all of them
    sizes = [row["world_size"] for row in history]
    shrunk = sizes.index(1)
    assert sizes[0] == 2 and 2 in sizes[shrunk:]  # 2 -> 1 -> 2
    assert "resized 2 -> 1 workers" in process.stderr and "resized 1 -> 2 workers" in process.stderr
    # The smaller group went on from a checkpoint, not from scratch, and the regrown group used the added node.
    assert 0 < history[shrunk]["resumed_from_step"] < metrics["total_steps"]
    assert report["added_node"] in report["worker_nodes_ever"] and report["lost_node"] in report["worker_nodes_ever"]
    dino = build_method(config)
    dino.param_groups(config.optim.weight_decay)  # sets where the weight-decay schedule starts
    for row in history:
        assert row["global_batch"] == row["world_size"] * row["worker_batch"] == 96
        assert row["samples"] == row["step"] * 96 and row["accumulation_steps"] == 1
        # The last step of each report ran at position step - 1, whatever the world size.
        at, epoch = row["step"] - 1, (row["step"] - 1) // schedule.steps_per_epoch
        assert row["lr"] == pytest.approx(schedule.lr_at(at))
        assert row["teacher_momentum"] == pytest.approx(dino.momentum_at(at, schedule.total_steps))
        assert row["teacher_temp"] == pytest.approx(dino.teacher_temp_at(epoch))
        assert row["weight_decay"] == pytest.approx(dino.weight_decay_at(at, schedule.total_steps))
    assert [row["step"] for row in history] == sorted({row["step"] for row in history})


def test_resumed_workers_draw_views_of_their_own():
    """A checkpoint holds rank 0's generator: rank 0 continues it exactly, other ranks branch off
    deterministically (a resumed or resized group must not draw the same views on every worker)."""
    import torch

    from pipelines.weights.checkpoint import rng_state, set_rng_state

    torch.manual_seed(5)
    state = rng_state()
    expected = torch.rand(4)
    draws = {}
    for rank in (0, 1, 2, 1):
        set_rng_state(state, rank)
        draws.setdefault(rank, []).append(torch.rand(4))
    assert torch.equal(draws[0][0], expected)
    assert torch.equal(draws[1][0], draws[1][1])
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[1][0], draws[2][0])
