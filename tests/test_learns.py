"""Every method learns (issue 35, item 5): a short run of each method through the whole pipeline
(Ray Data, Ray Train, checkpoint) on sample:digits, whose frozen encoder must beat the same
architecture at its random init by MARGIN under the protocol the method is judged by here
(tests/helpers/runs.py `LEARNS`). The margins measured over seeds, each above MARGIN, are in
docs/BENCHMARKS.md ("Every method learns on the digits sample"), which names the closest. The runs
are shared with the tests that read a trained checkpoint (conftest's `learns_run`)."""

import math

import pytest

from tests.helpers.runs import LEARNS

MARGIN = 0.05  # top-1 points over the random-init encoder; the floor, under every measured run


@pytest.mark.slow  # a few epochs of pretraining each
@pytest.mark.parametrize("method", sorted(LEARNS))
def test_each_method_beats_its_random_init_encoder_by_a_margin(method, digits, learns_run):
    from pipelines.evaluate.frozen import evaluate_checkpoint

    out, _ = digits
    protocol, _ = LEARNS[method]
    run = learns_run(method)
    metrics = run["metrics"]
    assert metrics["step"] == metrics["total_steps"] and math.isfinite(metrics["loss"])
    scores = evaluate_checkpoint(run["checkpoint"], f"{out}/train", f"{out}/test", protocol)
    assert scores["top1"] >= scores["random_init_top1"] + MARGIN, scores
