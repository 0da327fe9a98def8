"""The batch policy of elastic runs. (An elastic run losing a host and growing onto a fresh one:
tests/test_real_cluster.py.)"""

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
