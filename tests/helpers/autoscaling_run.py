"""An elastic run under Ray's own autoscaler (issue 30, item 5), with its `fake_multinode`
provider, the way Ray tests autoscaling on one machine: every node the autoscaler launches is a
`ray start` on this host. The head has 1 CPU (decoding) and the cluster starts with no worker
node; `train.workers=1:2` with 2 CPUs a worker, the room one GPU a node would make. Ray Train's
elastic policy asks the autoscaler for its largest group, the autoscaler launches the nodes, the
run grows onto them; once the run is over and the nodes idle, the autoscaler removes them.

Run it in a host of its own (cluster/local_hosts.py, as tests/test_real_cluster.py does): it
starts a head with `ray start`, and ends with the host (whose pid 1 takes every node with it).
Prints one JSON line: the seconds from the run's start (its demand) to the first launched node,
to the first report (workers training) and to a report of the full group; the run's world
sizes; and the seconds from its end until the autoscaler had removed every idle node.

    python -m tests.helpers.autoscaling_run OUT_DIR   # from the repository root, in a host
"""

import json
import os
import subprocess
import sys
import time

# The node type the autoscaler launches: 2 CPUs, one worker's room (tests/helpers/cross_host.py's
# worker host without its decoding CPU, which the head gives here).
WORKER_TYPE = {"resources": {"CPU": 2, "object_store_memory": 200 * 1024**2}, "node_config": {},
               "min_workers": 0, "max_workers": 2}
IDLE_TIMEOUT_MINUTES = 0.1  # the autoscaler removes a node idle this long (6 s)
CONFIG = {
    "cluster_name": "selfsup-autoscaling", "max_workers": 2, "head_node_type": "ray.head.default",
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {"ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
                             "worker": WORKER_TYPE},
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}
# 11 steps of 128: the launch is measured, not the training.
AUTOSCALED = {"optim.batch_size": 128, "optim.epochs": 1, "train.workers": "1:2", "train.cpus_per_worker": 2,
              "train.torch_threads": 1, "train.checkpoint_every_steps": 4, "train.resize_interval_s": 5,
              "train.max_failures": 5, "train.knn_every_epochs": 0, "train.probe_size": 0}


def worker_nodes() -> int:
    """The live nodes other than the head (where this driver runs)."""
    import ray

    head = ray.get_runtime_context().get_node_id()
    return sum(node["Alive"] and node["NodeID"] != head for node in ray.nodes())


def wait_until_no_worker_nodes(timeout: float = 300) -> float:
    """The time the autoscaler had removed every worker node (or `timeout` passed)."""
    deadline = time.time() + timeout
    while worker_nodes() and time.time() < deadline:
        time.sleep(0.5)
    return time.time()


def main(out: str) -> None:
    import ray

    from cluster.simulate import RunThread
    from pipelines.images.prepare import PrepareConfig, prepare
    from pipelines.train.pretrain import pretrain
    from pipelines.train.tracking import read_history
    from tests.helpers.runs import tiny_config

    config_file = os.path.join(out, "autoscaling.json")
    with open(config_file, "w") as stream:
        json.dump(CONFIG, stream)
    environment = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    subprocess.run(["ray", "start", "--head", f"--autoscaling-config={config_file}", "--num-cpus=1",
                    f"--object-store-memory={200 * 1024**2}"], env=environment, check=True,
                   stdout=subprocess.DEVNULL)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="auto", logging_level="WARNING")
    data, storage, name = os.path.join(out, "digits"), os.path.join(out, "runs"), "autoscaled"
    prepare("sample:digits", data, PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
    wait_until_no_worker_nodes()  # the autoscaler may have launched one for prepare's tasks

    demanded = time.time()
    run = RunThread(lambda: pretrain(tiny_config("simclr", **AUTOSCALED), f"{data}/train", storage=storage,
                                     name=name))
    run.start()
    first_node, most = None, 0
    while run.is_alive():
        alive = worker_nodes()
        if alive and first_node is None:
            first_node = time.time()
        most = max(most, alive)
        time.sleep(0.5)
    result = run.join()
    ended = time.time()
    removed = wait_until_no_worker_nodes()
    history = read_history(os.path.join(storage, name))
    full = next((row["time"] for row in history if row["world_size"] == 2), None)
    report = {"metrics": result["metrics"], "history": history, "most_worker_nodes": most,
              "demand_to_node_s": round(first_node - demanded, 1),
              "demand_to_first_report_s": round(history[0]["time"] - demanded, 1),
              "demand_to_full_group_report_s": round(full - demanded, 1) if full else None,
              "end_to_idle_removed_s": round(removed - ended, 1), "worker_nodes_left": worker_nodes()}
    ray.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
