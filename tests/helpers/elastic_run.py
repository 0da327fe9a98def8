"""An elastic run on a simulated autoscaling spot cluster, as its own process (its own Ray):

a 3-node cluster: head (1 CPU: decoding, too small for a worker) + 2 nodes of 2 CPUs, each the
room of one worker (`train.cpus_per_worker=2`, as one GPU per node would be). DINO with
`train.workers=1:3` starts with the 2 workers the cluster holds; once it has a checkpoint, one
worker's node is removed (a spot preemption, no notice) and the group goes on from the checkpoint
with 1; once that smaller group has reported, a node is added (the autoscaler bringing one back)
and the group grows to 2 again, on the added node. (Every worker group start costs ~30 s of this
2-core machine, so the test stays at 2 workers; the same run is the suite's node-loss test.)
Prints one JSON line: the run's result, the history of its
reports, the lost and the added node and every node a training worker ran on.

    python -m tests.helpers.elastic_run OUT_DIR   # from the repository root
"""

import json
import os
import sys

ELASTIC = {"optim.batch_size": 96,  # divides by 1, 2 and 3: the recipe's batch at every size
           "optim.epochs": 2, "train.checkpoint_every_steps": 2, "train.max_failures": 5,
           "train.knn_every_epochs": 0, "train.workers": "1:3", "train.resize_interval_s": 5,
           "train.cpus_per_worker": 2, "train.torch_threads": 1}


def main(out: str) -> None:
    from cluster.simulate import SpotCluster
    from pipelines.images.prepare import PrepareConfig, prepare
    from pipelines.train.pretrain import pretrain
    from pipelines.train.tracking import read_history
    from tests.helpers.runs import tiny_config

    with SpotCluster(head_cpus=1, nodes=2, node_cpus=2) as cluster:
        data = os.path.join(out, "digits")
        prepare("sample:digits", data, PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
        storage, name = os.path.join(out, "runs"), "elastic"
        training = cluster.start(lambda: pretrain(tiny_config("dino", **ELASTIC), f"{data}/train", storage=storage,
                                                  name=name))

        def world_sizes():
            return [row.get("world_size") for row in read_history(os.path.join(storage, name))]

        cluster.wait_for(lambda: 2 in world_sizes(), "a report of the 2-worker group")
        lost = cluster.preempt_a_worker_node()
        cluster.wait_for(lambda: 1 in world_sizes(), "a report of the 1-worker group")
        added = cluster.add_node()

        def regrown():  # read once: the history file may be rewritten between two reads
            sizes = world_sizes()
            return 1 in sizes and 2 in sizes[sizes.index(1):]

        cluster.wait_for(regrown, "a report of the regrown group", timeout=400)
        result = training.join(timeout=600)
        report = {"metrics": result["metrics"], "history": read_history(os.path.join(storage, name)), "lost_node": lost,
                  "added_node": added, "worker_nodes_ever": sorted(set(cluster.training_nodes(alive_only=False)))}
    # After the cluster is down: a line its raylets print (worker-start warnings) cannot follow the report.
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
