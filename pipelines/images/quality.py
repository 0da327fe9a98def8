"""Counting and reporting bad records across Ray Data tasks.

Decode tasks run on many workers; one small actor gathers what they skipped so the run can
report it, log each bad `id` once, and stop when the bad fraction passes the cap.
"""

from __future__ import annotations

import logging
from collections import Counter

import ray

from pipelines.images.shards import DataError

logger = logging.getLogger("selfsup.data")

MAX_EXAMPLES = 100


class BadDataError(DataError):
    """Too large a fraction of the input could not be decoded."""


@ray.remote(num_cpus=0)
class QualityLog:
    """Running totals of records seen and skipped, with the first bad ids and their reasons."""

    def __init__(self):
        self.seen = 0
        self.bad = 0
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def record(self, seen: int, bad: list[tuple[str, str]]) -> dict:
        """Adds one decode task's counts; returns the running totals (`summary`)."""
        self.seen += seen
        self.bad += len(bad)
        for record_id, reason in bad:
            self.reasons[reason.split(" (")[0].split(":")[0]] += 1
            if record_id not in self.examples and len(self.examples) < MAX_EXAMPLES:
                self.examples[record_id] = reason
                logger.warning("skipped bad image id=%s: %s", record_id, reason)
        return self.summary()

    def summary(self) -> dict:
        return {
            "seen": self.seen,
            "bad": self.bad,
            "bad_by_reason": dict(self.reasons),
            "bad_examples": [{"id": i, "reason": r} for i, r in self.examples.items()],
        }


def check_bad_fraction(summary: dict, max_bad_fraction: float, where: str, min_seen: int = 0) -> None:
    """Raise BadDataError when more than `max_bad_fraction` of the records seen were bad."""
    seen, bad = summary["seen"], summary["bad"]
    if seen >= max(min_seen, 1) and bad > max_bad_fraction * seen:
        first = summary["bad_examples"][0] if summary["bad_examples"] else {"id": "?", "reason": "?"}
        raise BadDataError(
            f"{where}: {bad} of {seen} images could not be decoded ({bad / seen:.1%} > cap "
            f"{max_bad_fraction:.1%}; first: id={first['id']}: {first['reason']}); "
            "fix the data or raise max_bad_fraction"
        )


def new_quality_log():
    """A QualityLog on the driver's node: decode tasks on every node report to it, so it must not
    sit on a spot node that can disappear mid-run (the driver's node going means the run goes)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return QualityLog.options(scheduling_strategy=here).remote()
