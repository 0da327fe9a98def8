"""A job across two hosts of a real Ray cluster on this machine (issue 30, items 3 and 4): hosts in
network namespaces (`cluster/local_hosts.py`), a head and workers started by
`cluster/aws.yaml`'s own start commands with token auth (`cluster/local_cluster.py`): a head with
no CPU for work, as the config's head type, and two worker hosts; and a fourth host, the user's
laptop, which submits `selfsup pretrain` with `ray job submit --working-dir` through the
dashboard's tunnel, as cluster/README.md's walk-through does: two workers, one per worker host
(STRICT_SPREAD), one DDP group across the two addresses, checkpoints in a folder every host sees
(this machine's file system, the stand-in for shared storage).

Needs root. Exits 1 and says what failed when the job did not succeed on both hosts; prints one
JSON line: where the workers trained, steps, img/s, the seconds from submission to the job's end;
with `--lose-worker`, also the host loss (tests/helpers/cross_host.py): the step checkpointed at
the loss and the step resumed from, the seconds from the loss and from the fresh host's join to
the next report, the images planned and trained.

    python -m benchmarks.cluster.cross_host_job --workdir /tmp/cross-host [--workers 1] [--lose-worker]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from tests.helpers.cross_host import ELASTIC, REPO, SETS, WORKER_CPUS, Laptop, job_result, lose_and_replace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/cross-host", help="data and the run's checkpoints (shared)")
    parser.add_argument("--workers", type=int, default=2, help="training workers; 2 puts one on each host")
    parser.add_argument("--lose-worker", action="store_true",
                        help="elastic 1:2 workers (tests/helpers/cross_host.py, ELASTIC): SIGKILL a worker host "
                             "once the run has checkpointed, then join a fresh host")
    args = parser.parse_args()

    from cluster.local_cluster import LocalRayCluster
    from cluster.local_hosts import LocalHosts, unavailable_reason
    from pipelines.train.tracking import read_history

    reason = unavailable_reason()
    if reason:
        print(f"cross_host_job: error: {reason}", file=sys.stderr)
        return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    data, storage = os.path.join(args.workdir, "digits"), os.path.join(args.workdir, "runs")
    os.makedirs(storage)
    event = {}
    with LocalHosts(4) as hosts:
        head, worker_a, worker_b, laptop_host = hosts.hosts
        cluster = LocalRayCluster(hosts, os.path.join(REPO, "cluster", "aws.yaml"))
        started = time.perf_counter()
        cluster.start_head(head)
        cluster.join(worker_a, cpus=WORKER_CPUS)
        cluster.join(worker_b, cpus=WORKER_CPUS)
        cluster.grant(laptop_host)
        cluster.wait_for_nodes(3)
        cluster_s = time.perf_counter() - started
        laptop = Laptop(cluster, laptop_host, cluster.tunnel())
        status, logs = laptop.wait(laptop.submit(["python", "-m", "pipelines.cli", "prepare", "sample:digits",
                                                  "--out", data]))
        if "succeeded" in status.lower():
            sets = {**SETS, "train.workers": args.workers, **(ELASTIC if args.lose_worker else {})}
            submitted = time.perf_counter()
            job = laptop.submit(laptop.pretrain(data, storage, "across", sets))
            if args.lose_worker:
                event = lose_and_replace(hosts, cluster, worker_b, os.path.join(storage, "across"))
            status, logs = laptop.wait(job)
            job_s = time.perf_counter() - submitted
        trained_on = laptop.training_addresses()
        addresses = {"head": head.address, "workers": [worker_a.address, worker_b.address],
                     "laptop": laptop_host.address}
    if "succeeded" not in status.lower():
        print(f"cross_host_job: the job did not succeed: {logs[-3000:]}", file=sys.stderr)
        return 1
    result = job_result(logs)
    metrics = result["metrics"]
    report = {"trained_on": trained_on, "hosts": addresses, "world_size": metrics["world_size"],
              "steps": metrics["step"], "samples": metrics["samples"], "images_per_s": metrics["images_per_s"],
              "cluster_start_s": round(cluster_s, 1), "job_s": round(job_s, 1), "checkpoint": result["checkpoint"]}
    if event:
        history = read_history(os.path.join(storage, "across"))
        shrunk = [row["world_size"] for row in history].index(1)
        report.update({"fresh": event["fresh"].address, "world_sizes": [row["world_size"] for row in history],
                       "checkpointed_step_at_loss": event["checkpointed_step_at_loss"],
                       "resumed_from_step": history[shrunk]["resumed_from_step"],
                       "loss_to_first_report_s": event["loss_to_first_report_s"],
                       "join_to_first_report_s": event["join_to_first_report_s"],
                       "planned_samples": metrics["total_steps"] * SETS["optim.batch_size"]})
    print(json.dumps(report))
    expected = sorted({*addresses["workers"], *([event["fresh"].address] if event else [])})
    if args.workers == 2 and sorted(set(trained_on)) != expected:
        print(f"cross_host_job: the workers trained on {trained_on}, not on {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
