"""A spot preemption on a simulated cluster, run as its own process (its own Ray):

head (no CPUs) + 2 worker nodes of 2 CPUs; a 2-worker pretraining run with STRICT_SPREAD places
one worker per node; once a checkpoint is registered, the node of one worker is removed, and a
replacement node joins (as an autoscaler would bring one). Ray Train restores the group from the
last checkpoint on the surviving and the new node, and the run completes. Prints one JSON line.

    python tests/node_loss_run.py OUT_DIR
"""

import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipelines.config import build_config
    from pipelines.prepare import PrepareConfig, prepare
    from pipelines.pretrain import pretrain

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with socket.socket() as probe:  # a free port: another Ray (the test session's) may hold 8265
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": dashboard_port})
    first, second = cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)
    # Every actor of this job finds this cluster, not the test session's Ray beside it, when Ray
    # itself calls the state API (e.g. to clean up placement groups).
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}})
    cluster.wait_for_nodes()
    try:
        data = os.path.join(out, "digits")
        prepare("sample:digits", data, PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
        config = build_config("simclr", "tiny", sets={
            "data.canvas_size": 16, "data.decode_num_cpus": 0.25, "views.view.size": 16, "optim.batch_size": 64,
            "backbone.kwargs.channels": [8, 16, 32, 64], "backbone.kwargs.stem_width": 8, "optim.epochs": 1,
            "train.checkpoint_every_steps": 4, "train.max_failures": 5, "train.knn_every_epochs": 0,
            "train.placement_strategy": "STRICT_SPREAD"})
        result, run = {}, os.path.join(out, "runs", "spot")
        thread = threading.Thread(target=lambda: result.update(
            pretrain(config, f"{data}/train", workers=2, storage=os.path.join(out, "runs"), name="spot")))
        thread.start()
        snapshot = os.path.join(run, "checkpoint_manager_snapshot.json")
        deadline = time.time() + 300
        while not (os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read()):
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("no checkpoint was registered")
            time.sleep(0.2)
        workers = list_actors(address=cluster.gcs_address,
                              filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        nodes_before = sorted(w.node_id for w in workers)
        lost = next(n for n in (first, second) if n.node_id == nodes_before[0])
        cluster.remove_node(lost, allow_graceful=False)
        replacement = cluster.add_node(num_cpus=2)
        thread.join(timeout=600)
        workers = list_actors(address=cluster.gcs_address, filters=[("class_name", "=", "RayTrainWorker")])
        print(json.dumps({
            "finished": "metrics" in result,
            "metrics": result.get("metrics", {}),
            "nodes_before": nodes_before,
            "lost_node": lost.node_id,
            "replacement_node": replacement.node_id,
            "worker_nodes_ever": sorted({w.node_id for w in workers}),
        }), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
