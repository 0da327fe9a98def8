"""What a tiny run costs beyond its steps: several tiny SimCLR runs (the tests' `tiny_config`, one
epoch of sample:digits, 22 steps) one after another in one local Ray sized as the test session's
(2 CPUs, a 200 MB object store), each run's seconds printed. `--warm-workers N` sets Ray's
`num_workers_soft_limit` (the idle worker processes it keeps; 0: Ray's default, one per CPU),
so the same command measures selfsup's `WARM_WORKERS` against Ray's default. Ray Train runs with
the settings a local selfsup Ray gives it (`LOCAL_TRAIN_SETTINGS`), or with its own defaults
under `--ray-train-defaults`.

    python -m benchmarks.performance.run_overhead --runs 3 --warm-workers 0
    python -m benchmarks.performance.run_overhead --runs 3 --warm-workers 8
    python -m benchmarks.performance.run_overhead --runs 4 --warm-workers 8 --ray-train-defaults
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from pipelines.train.local_ray import keep_local_ray_on_loopback, use_local_train_settings

keep_local_ray_on_loopback()

import ray  # noqa: E402

from pipelines.images.prepare import PrepareConfig, prepare  # noqa: E402
from pipelines.train.pretrain import pretrain  # noqa: E402
from tests.helpers.runs import tiny_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warm-workers", type=int, default=0, help="Ray's num_workers_soft_limit; 0: Ray's default")
    parser.add_argument("--ray-train-defaults", action="store_true",
                        help="Ray Train's own poll interval and preemption watcher, not LOCAL_TRAIN_SETTINGS")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not args.ray_train_defaults:
        use_local_train_settings()
    system = {"num_workers_soft_limit": args.warm_workers} if args.warm_workers else {}
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, logging_level="ERROR", _system_config=system)
    with tempfile.TemporaryDirectory() as work:
        prepare("sample:digits", f"{work}/digits", PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
        seconds = []
        for run in range(args.runs):
            started = time.perf_counter()
            pretrain(tiny_config(**{"optim.epochs": 1}), f"{work}/digits/train", storage=f"{work}/runs",
                     name=f"run{run}")
            seconds.append(round(time.perf_counter() - started, 1))
    print(json.dumps({"warm_workers": args.warm_workers or "ray's default",
                      "ray_train": "defaults" if args.ray_train_defaults else "selfsup's local settings",
                      "run_seconds": seconds}))


if __name__ == "__main__":
    main()
