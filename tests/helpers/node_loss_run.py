"""A spot preemption on a simulated cluster, run as its own process (its own Ray):

head (no CPUs) + 2 worker nodes of 2 CPUs; a 2-worker pretraining run with STRICT_SPREAD places
one worker per node; once a checkpoint is registered, the node of one worker is removed, and a
replacement node joins (as an autoscaler would bring one). Ray Train restores the group from the
last checkpoint on the surviving and the new node, and the run completes. Prints one JSON line.

    python -m tests.helpers.node_loss_run OUT_DIR   # from the repository root
"""

import json
import os
import sys


def main(out: str) -> None:
    from cluster.simulate import SpotCluster
    from pipelines.images.prepare import PrepareConfig, prepare
    from pipelines.train.pretrain import pretrain
    from tests.helpers.runs import tiny_config

    with SpotCluster(head_cpus=0, nodes=2, node_cpus=2) as cluster:
        data = os.path.join(out, "digits")
        prepare("sample:digits", data, PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
        config = tiny_config(**{"optim.epochs": 1, "train.checkpoint_every_steps": 4, "train.max_failures": 5,
                                "train.knn_every_epochs": 0, "train.placement_strategy": "STRICT_SPREAD",
                                "train.workers": 2})
        run = os.path.join(out, "runs", "spot")
        training = cluster.start(lambda: pretrain(config, f"{data}/train", storage=os.path.join(out, "runs"),
                                                  name="spot"))
        snapshot = os.path.join(run, "checkpoint_manager_snapshot.json")
        cluster.wait_for(lambda: os.path.exists(snapshot) and "checkpoint_" in open(snapshot).read(),
                         "a registered checkpoint")
        nodes_before = cluster.training_nodes()
        lost = cluster.preempt_a_worker_node()
        replacement = cluster.add_node()
        result = training.join(timeout=600)
        report = {
            "finished": True,
            "metrics": result["metrics"],
            "nodes_before": nodes_before,
            "lost_node": lost,
            "replacement_node": replacement,
            "worker_nodes_ever": sorted(set(cluster.training_nodes(alive_only=False))),
        }
    # After the cluster is down: a line its raylets print (worker-start warnings) cannot follow the report.
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
