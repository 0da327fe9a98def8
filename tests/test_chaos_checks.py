"""The recovery checks (cluster/recovery.py, used by the chaos benchmark) catch what they are
there to catch."""

from cluster.recovery import recovery_failures as checks


def run(history_steps, resumed_from=8, samples=None, step=12):
    history = [{"step": s, "samples": s * 64} for s in history_steps]
    metrics = {"step": step, "total_steps": 12, "global_batch": 64, "samples": 12 * 64 if samples is None else samples}
    return {"result": {"metrics": metrics}, "history": history, "checkpoint_every": 4,
            "events": [{"kill": 1, "newest_checkpoint_step": 8, "resumed_from_step": resumed_from}]}


def test_a_clean_run_passes():
    assert checks(run([4, 8, 12])) == []


def test_each_loss_is_named():
    assert "planned images" in checks(run([4, 8, 12], samples=11 * 64))[0]
    assert "planned images" in checks(run([4, 8], step=8))[0]
    assert "not one history" in checks(run([4, 8, 8, 12]))[0]  # a restart's reports appended, not rewound
    assert "more than 4 steps redone" in checks(run([4, 8, 12], resumed_from=4))[0]  # resumed from an older one
