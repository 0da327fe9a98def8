"""What a resize costs: kNN after the same images seen, fixed world size vs an elastic run that
loses a worker and gets it back. Prints one JSON line per run, then a summary line.

On a simulated spot cluster (head with 1 CPU for decoding + 2 nodes of 2 CPUs, one training
worker per node): SimCLR `tiny` on the bundled MNIST sample, global batch 256, at most 128 images
per worker per pass (`optim.max_worker_batch`):
- fixed:   `train.workers=2` all along (2 x 128).
- elastic: `train.workers=1:2`; a worker's node is preempted once the run has a checkpoint, and
  a node comes back once the 1-worker group (1 x 128 x 2 accumulation steps) has reported.

    python -m benchmarks.chaos.elastic_resize --epochs 3
    python -m benchmarks.chaos.elastic_resize --epochs 3 --seeds 1 --kinds fixed   # run-to-run spread
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run(kind: str, data: str, workdir: str, epochs: int, seed: int = 0) -> dict:
    from cluster.simulate import SpotCluster
    from pipelines.config import build_config
    from pipelines.evaluate.frozen import evaluate_checkpoint
    from pipelines.train.pretrain import pretrain
    from pipelines.train.tracking import read_history

    sets = {"optim.epochs": epochs, "optim.max_worker_batch": 128, "train.knn_every_epochs": 0,
            "train.checkpoint_every_steps": 3, "train.max_failures": 10, "train.cpus_per_worker": 2,
            "train.torch_threads": 1, "train.resize_interval_s": 5, "train.seed": seed,
            "train.workers": 2 if kind == "fixed" else "1:2"}
    config = build_config("simclr", "tiny", sets=sets)
    storage, name = os.path.join(workdir, "runs"), f"elastic-{kind}-{int(time.time())}"
    folder = os.path.join(storage, name)
    with SpotCluster(head_cpus=1, nodes=2, node_cpus=2) as cluster:
        started = time.perf_counter()
        training = cluster.start(lambda: pretrain(config, f"{data}/train", storage=storage, name=name))
        if kind == "elastic":
            def sizes():
                return [row["world_size"] for row in read_history(folder)]

            cluster.wait_for(lambda: 2 in sizes(), "a report of the 2-worker group", timeout=900)
            cluster.preempt_a_worker_node()
            cluster.wait_for(lambda: 1 in sizes(), "a report of the 1-worker group", timeout=900)
            cluster.add_node()
        result = training.join(timeout=3600)
        wall = time.perf_counter() - started
        knn = evaluate_checkpoint(result["checkpoint"], f"{data}/train", f"{data}/test", "knn", baselines=False)
    history = read_history(folder)
    phases = []
    for row in history:  # (world size, accumulation, first step) of each stretch
        key = (row["world_size"], row["accumulation_steps"])
        if not phases or phases[-1][:2] != key:
            phases.append((*key, row["step"]))
    return {"run": kind, "seed": seed, "epochs": epochs, "images_seen": result["metrics"]["samples"],
            "steps": result["metrics"]["step"], "phases_world_accum_from_step": phases,
            "wall_s": round(wall, 1), "final_loss": round(result["metrics"]["loss"], 4),
            "knn_top1": round(knn["top1"], 4)}


def main() -> None:
    import ray

    from pipelines.images.prepare import PrepareConfig, prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/selfsup-bench")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values: each runs both kinds")
    parser.add_argument("--kinds", default="fixed,elastic")
    args = parser.parse_args()
    data = os.path.join(args.workdir, "mnist")
    if not os.path.exists(os.path.join(data, "test")):
        ray.init(num_cpus=2, logging_level="ERROR")
        prepare("sample:mnist", data, PrepareConfig(overwrite=True))
        ray.shutdown()
    results = [run(kind, data, args.workdir, args.epochs, int(seed))
               for seed in args.seeds.split(",") for kind in args.kinds.split(",")]
    for result in results:
        print(json.dumps(result), flush=True)
    by_kind = {kind: [r["knn_top1"] for r in results if r["run"] == kind] for kind in args.kinds.split(",")}
    print(json.dumps({"knn_top1": by_kind,
                      "same_images_seen": len({r["images_seen"] for r in results}) == 1}), flush=True)


if __name__ == "__main__":
    main()
