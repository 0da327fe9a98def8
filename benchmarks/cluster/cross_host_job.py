"""A job across two hosts of a real Ray cluster on this machine (issue 30, item 3): hosts in
network namespaces (`cluster/local_hosts.py`), a head and a worker started by
`cluster/aws.yaml`'s own start commands with token auth (`cluster/local_cluster.py`), and a third
host, the user's laptop, which submits `selfsup pretrain` with `ray job submit --working-dir`
through the dashboard's tunnel, as cluster/README.md's walk-through does: two workers, one per
host (STRICT_SPREAD), one DDP group across the two addresses, checkpoints in a folder both hosts
see (this machine's file system, the stand-in for shared storage).

Needs root. Exits 1 and says what failed when the job did not succeed on both hosts; prints one
JSON line: where the workers trained, steps, img/s, the seconds from submission to the job's end.

    python -m benchmarks.cluster.cross_host_job --workdir /tmp/cross-host
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# SimCLR `tiny` at 16 px on sample:digits, the test suite's run (tests/helpers/runs.py), one epoch
SETS = {"data.canvas_size": 16, "views.view.size": 16, "optim.batch_size": 64, "optim.epochs": 1,
        "backbone.kwargs.channels": [4, 8, 16, 32], "backbone.kwargs.stem_width": 4,
        "backbone.kwargs.layers": [1, 1, 1, 1], "train.probe_size": 0, "train.knn_every_epochs": 0}


def json_list(stdout: str) -> list:
    """The JSON list a `ray list ... --format=json` printed (after any log line before it)."""
    start = 0 if stdout.startswith("[") else stdout.find("\n[") + 1
    if not start and not stdout.startswith("["):
        raise ValueError(f"no JSON list in: {stdout[-2000:]!r}")
    return json.loads(stdout[start:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/cross-host", help="data and the run's checkpoints (shared)")
    parser.add_argument("--workers", type=int, default=2, help="training workers; 2 puts one on each host")
    args = parser.parse_args()

    from cluster.local_cluster import LocalRayCluster
    from cluster.local_hosts import LocalHosts, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"cross_host_job: error: {reason}", file=sys.stderr)
        return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    data, storage = os.path.join(args.workdir, "digits"), os.path.join(args.workdir, "runs")
    os.makedirs(storage)
    with LocalHosts(3) as hosts:
        head, worker, laptop = hosts.hosts
        cluster = LocalRayCluster(hosts, os.path.join(REPO, "cluster", "aws.yaml"))
        started = time.perf_counter()
        cluster.start_head(head)
        cluster.join(worker)
        cluster.grant(laptop)
        cluster.wait_for_nodes(2)
        cluster_s = time.perf_counter() - started
        dashboard = cluster.tunnel()
        submit = ["ray", "job", "submit", f"--address={dashboard}", "--working-dir", REPO, "--no-wait", "--"]

        def run_job(entrypoint: list[str]) -> tuple[str, str, float]:
            """(status, logs, seconds from submission to its end) of a job submitted from the laptop."""
            submitted_at = time.perf_counter()
            job = re.search(r"raysubmit_[A-Za-z0-9]+", cluster.run(laptop, [*submit, *entrypoint]).stdout).group()
            cluster.run(laptop, ["ray", "job", "logs", f"--address={dashboard}", "--follow", job], timeout=1800)
            seconds = time.perf_counter() - submitted_at
            status = cluster.run(laptop, ["ray", "job", "status", f"--address={dashboard}", job]).stdout
            return status, cluster.run(laptop, ["ray", "job", "logs", f"--address={dashboard}", job]).stdout, seconds

        status, logs, _ = run_job(["python", "-m", "pipelines.cli", "prepare", "sample:digits", "--out", data])
        if "succeeded" in status.lower():
            sets = {**SETS, "train.workers": args.workers, "train.placement_strategy": "STRICT_SPREAD"}
            status, logs, job_s = run_job(["python", "-m", "pipelines.cli", "pretrain", "--method", "simclr",
                                           "--preset", "tiny", "--data", f"{data}/train", "--storage", storage,
                                           "--name", "across", *[arg for key, value in sets.items()
                                                                 for arg in ("--set", f"{key}={json.dumps(value)}")]])
        actors = json_list(cluster.run(laptop, ["ray", "list", "actors", f"--address={dashboard}", "--filter",
                                                "class_name=RayTrainWorker", "--format=json", "--detail"]).stdout)
        nodes = {node["node_id"]: node["node_ip"] for node in json_list(
            cluster.run(laptop, ["ray", "list", "nodes", f"--address={dashboard}", "--format=json"]).stdout)}
        addresses = {"head": head.address, "worker": worker.address, "laptop": laptop.address}
    if "succeeded" not in status.lower():
        print(f"cross_host_job: the job did not succeed: {logs[-3000:]}", file=sys.stderr)
        return 1
    result = json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])
    metrics = result["metrics"]
    report = {"trained_on": sorted(nodes[actor["node_id"]] for actor in actors), "hosts": addresses,
              "world_size": metrics["world_size"], "steps": metrics["step"], "images_per_s": metrics["images_per_s"],
              "cluster_start_s": round(cluster_s, 1), "job_s": round(job_s, 1), "checkpoint": result["checkpoint"]}
    print(json.dumps(report))
    expected = sorted([addresses["head"], addresses["worker"]])
    if args.workers == 2 and report["trained_on"] != expected:
        print(f"cross_host_job: the workers trained on {report['trained_on']}, not on {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
