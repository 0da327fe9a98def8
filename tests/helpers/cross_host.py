"""`selfsup pretrain` as a job across the hosts of a real Ray cluster on this machine (issue 30,
items 3 and 4): submitted from the laptop with `ray job submit --working-dir`, through the
dashboard's tunnel, as cluster/README.md's walk-through does; and the worker host lost while the
job trains (every process SIGKILLed) and a fresh host joined in its place. Used by
tests/test_real_cluster.py and benchmarks/cluster/cross_host_job.py.

The checkpoints go to a folder every host sees (this machine's file system, the stand-in for
shared storage), so the test reads the run's history while the job trains.
"""

from __future__ import annotations

import json
import os
import re
import time

from cluster.local_cluster import LocalRayCluster
from cluster.local_hosts import Host, LocalHosts
from tests.helpers.runs import COMMON, TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A worker host's vCPUs: one training worker (2 CPUs, the room a node's one GPU would make: Ray
# Train's elastic policy counts workers per node by resources) and one for decoding. The head has
# none (the config's head type: CPU 0).
WORKER_CPUS = 3
# The suite's tiny DINO on sample:digits (tests/helpers/runs.py; DINO for its teacher, centre and
# schedules, which every resize must carry over), batch 64: 22 steps an epoch.
METHOD = "dino"
SETS = {**COMMON, **TINY[METHOD], "optim.epochs": 1, "train.probe_size": 0, "train.knn_every_epochs": 0,
        "train.cpus_per_worker": 2, "train.placement_strategy": "STRICT_SPREAD",
        # One thread each: the two workers share this machine's 2 cores. With the default (the
        # host's 3 CPUs) workers died of SIGSEGV in oneDNN's convolution backward, not reproduced
        # outside Ray (docs/BENCHMARKS.md, "A real cluster on one machine ... items 3-6").
        "train.torch_threads": 1}
# Elastic between one host and two: a checkpoint every 4 steps (what a lost host can cost), the
# controller looking for a joined host every 5 s, and room for the restarts a loss causes. 6 epochs
# (132 steps): on an idle machine one worker ran 2 epochs' steps (44) before the fresh host's join
# and the group's restart were through, and a 2-epoch run ended without growing back; the regrown
# group's first report came at step 28-44 in the suite (the test reports it; docs/BENCHMARKS.md,
# "Each run's Ray processes").
ELASTIC = {"optim.epochs": 6, "train.workers": "1:2", "train.checkpoint_every_steps": 4,
           "train.resize_interval_s": 5, "train.max_failures": 5}
JOB_TIMEOUT_S = 1800


def json_list(stdout: str) -> list:
    """The JSON list a `ray list ... --format=json` printed (after any log line before it)."""
    start = 0 if stdout.startswith("[") else stdout.find("\n[") + 1
    if not start and not stdout.startswith("["):
        raise ValueError(f"no JSON list in: {stdout[-2000:]!r}")
    return json.loads(stdout[start:])


class Laptop:
    """The user's machine: the Jobs API and the state API through the tunnel, with the token."""

    def __init__(self, cluster: LocalRayCluster, host: Host, dashboard: str):
        self.cluster, self.host, self.dashboard = cluster, host, dashboard

    def ray(self, group: str, command: str, *argv: str, timeout: float = 120) -> str:
        """`ray GROUP COMMAND --address=DASHBOARD ARGV` on the laptop (`ray job submit`, `ray list
        nodes`, ...); its stdout."""
        return self.cluster.run(self.host, ["ray", group, command, f"--address={self.dashboard}", *argv],
                                timeout=timeout).stdout

    def submit(self, entrypoint: list[str]) -> str:
        """`ray job submit --working-dir REPO --no-wait -- ENTRYPOINT`; the job's id."""
        said = self.ray("job", "submit", "--working-dir", REPO, "--no-wait", "--", *entrypoint)
        return re.search(r"raysubmit_[A-Za-z0-9]+", said).group()

    def wait(self, job: str) -> tuple[str, str]:
        """(status line, logs) of `job` once it ends."""
        self.ray("job", "logs", "--follow", job, timeout=JOB_TIMEOUT_S)
        return self.ray("job", "status", job), self.ray("job", "logs", job)

    @staticmethod
    def pretrain(data: str, storage: str, name: str, sets: dict) -> list[str]:
        """The entrypoint of a `selfsup pretrain` job of METHOD's `tiny` preset with `sets`."""
        return ["python", "-m", "pipelines.cli", "pretrain", "--method", METHOD, "--preset", "tiny", "--data",
                f"{data}/train", "--storage", storage, "--name", name,
                *[arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]]

    def training_addresses(self) -> list[str]:
        """The address of every training worker the cluster has run (alive or dead), one per worker."""
        actors = json_list(self.ray("list", "actors", "--filter", "class_name=RayTrainWorker", "--format=json",
                                    "--detail", "--limit=1000"))
        nodes = {node["node_id"]: node["node_ip"] for node in json_list(self.ray("list", "nodes", "--format=json"))}
        return sorted(nodes[actor["node_id"]] for actor in actors)


def job_result(logs: str) -> dict:
    """The run's JSON line, the last line of the job's logs that is one."""
    return json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])


def _history(run: str) -> list[dict]:
    from pipelines.train.tracking import read_history

    try:
        return read_history(run)
    except json.JSONDecodeError:  # a line being written: read again on the next poll
        return []


def _wait(condition, what: str, timeout: float = 600) -> float:
    """Polls `condition()` each second; the time it first held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(1)
    return time.monotonic()


def lose_and_replace(hosts: LocalHosts, cluster: LocalRayCluster, worker: Host, run: str) -> dict:
    """While the run at `run` trains on two worker hosts: SIGKILLs every process of `worker` once the
    two-host group has checkpointed, waits for the one-host group's first report, then starts a
    fresh host and joins it with the config's worker commands, and waits for the regrown group's
    first report. Returns what happened: the newest step checkpointed before the loss, the
    seconds from the loss to the smaller group's first report and from the join to the regrown
    group's, the step of that report, and the fresh host."""
    def sizes() -> list[int]:
        return [row["world_size"] for row in _history(run)]

    _wait(lambda: 2 in sizes(), "report of the two-host group")
    newest_before = max(row["step"] for row in _history(run))
    killed_at = time.monotonic()
    hosts.kill(worker)
    shrunk_at = _wait(lambda: 1 in sizes(), "report of the one-host group after the loss")
    fresh = hosts.add()
    joined_at = time.monotonic()
    cluster.join(fresh, cpus=WORKER_CPUS)

    regrown_steps = []  # the step of the regrown group's first report, once there is one

    def regrown() -> bool:  # the history read once: a resume rewrites it
        seen = _history(run)
        shrunk = next((i for i, row in enumerate(seen) if row["world_size"] == 1), len(seen))
        regrown_steps.extend(row["step"] for row in seen[shrunk:] if row["world_size"] == 2)
        return bool(regrown_steps)

    regrown_at = _wait(regrown, "report of the regrown group")
    return {"checkpointed_step_at_loss": newest_before, "loss_to_first_report_s": round(shrunk_at - killed_at, 1),
            "join_to_first_report_s": round(regrown_at - joined_at, 1), "regrown_at_step": regrown_steps[0],
            "fresh": fresh}
