"""Deadlines of the tests that run Ray processes of their own, derived from measured times.

LOADED_S: seconds each took on this project's 2-core machine with a busy loop on one of the two
cores beside it, the load these tests must survive (docs/BENCHMARKS.md, "The multi-node tests
beside a CPU hog", with the command). A deadline is MARGIN times that: room for a slower runner
or a heavier neighbour, not a guess at the work. Remeasure when a test's work changes.
"""

MARGIN = 3
LOADED_S = {
    "two_rays": 300,     # tests/test_two_rays.py, measured with two runs and a search (now one run: less work)
}


def deadline(test: str) -> float:
    return MARGIN * LOADED_S[test]
