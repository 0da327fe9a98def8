"""What a run that lost workers or hosts must still show: every planned image seen, one history
(each step once in `metrics.jsonl`), and every resume from the newest checkpoint there was. Used
by the chaos benchmark (benchmarks/chaos/kill_workers.py) and its tests."""

from __future__ import annotations


def recovery_failures(run: dict) -> list[str]:
    """What failed; [] when the run lost nothing and redid at most one checkpoint interval per kill.

    `run`: `{"result": pretrain's result, "history": the run's metrics.jsonl rows,
    "checkpoint_every": train.checkpoint_every_steps, "events": [{"kill", "newest_checkpoint_step",
    "resumed_from_step"}, ...]}`, one event per worker or host lost."""
    metrics, history, interval = run["result"]["metrics"], run["history"], run["checkpoint_every"]
    failed = []
    if metrics["step"] != metrics["total_steps"] or metrics["samples"] != metrics["total_steps"] * metrics["global_batch"]:
        failed.append(f"planned images: step {metrics['step']}/{metrics['total_steps']}, samples {metrics['samples']}")
    steps = [row["step"] for row in history]
    if steps != sorted(set(steps)) or steps[-1] != metrics["total_steps"]:
        failed.append(f"metrics.jsonl is not one history: steps {steps}")
    if any(row["samples"] != row["step"] * metrics["global_batch"] for row in history):
        failed.append("metrics.jsonl: images seen != step x global batch at some row")
    for event in run["events"]:
        if event["resumed_from_step"] < event["newest_checkpoint_step"]:
            failed.append(f"kill {event['kill']}: resumed from step {event['resumed_from_step']}, "
                          f"but step {event['newest_checkpoint_step']} was checkpointed (more than {interval} steps redone)")
    return failed
