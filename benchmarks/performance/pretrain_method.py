"""A method's training throughput, end to end vs model only, its loss per epoch, and kNN / linear
probe after E epochs vs the floors, on the bundled MNIST sample (`tiny` preset).

End to end = a real `selfsup pretrain` run (Ray Data ingest, views on the device, one Ray Train
worker with `train.cpus_per_worker` CPUs); its images/s of the last epoch. Model only = the same
method's forward + backward + optimizer step on views made once, with the same number of torch
threads and the same `train.channels_last` / `train.compile` wrapping, no data pipeline. Then
top-1 on the sample's test split for the trained encoder, the random-init encoder (the floor) and
raw pixels. `--picture` also draws MAE reconstructions.

    python -m benchmarks.performance.pretrain_method --method simclr --epochs 3
    python -m benchmarks.performance.pretrain_method --method mae --epochs 20 --linear --picture docs/images/mae_reconstruction.png
    python -m benchmarks.performance.pretrain_method --method dino --epochs 10 --linear --picture docs/images/dino_attention.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

import ray
import torch

from benchmarks.steps import StepBench, timed
from pipelines.cli import parse_sets
from pipelines.config import build_config
from pipelines.evaluate.frozen import evaluate_checkpoint
from pipelines.images.prepare import PrepareConfig, prepare
from pipelines.train.pretrain import pretrain
from pipelines.train.tracking import read_history
from pipelines.train.worker import step_threads

NODE_CPUS = 2  # the Ray this script starts: the one worker's node


def model_only_rate(config, steps: int = 15) -> float:
    torch.set_num_threads(step_threads(config.train.torch_threads, config.train.cpus_per_worker, NODE_CPUS, 1))
    bench = StepBench.build(config)
    return timed(bench.model_step, steps).rate(bench.batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--linear", action="store_true", help="also the linear probe")
    parser.add_argument("--picture", help="MAE: reconstructions; DINO: attention maps of one test image")
    parser.add_argument("--workdir", default="/tmp/selfsup-bench")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as `selfsup pretrain --set` (repeatable)")
    args = parser.parse_args()
    config = build_config(args.method, "tiny", sets={"optim.epochs": args.epochs, "train.knn_every_epochs": 0,
                                                     "train.keep_checkpoints": args.epochs, **parse_sets(args.set)})
    model_only = model_only_rate(config)
    print(f"model only: {model_only:.1f} img/s", flush=True)
    ray.init(num_cpus=NODE_CPUS, logging_level="ERROR")
    data = os.path.join(args.workdir, "mnist")
    prepare("sample:mnist", data, PrepareConfig(overwrite=True))
    started = time.perf_counter()
    run = pretrain(config, f"{data}/train", storage=os.path.join(args.workdir, "runs"), name=f"bench-{int(started)}")
    wall = time.perf_counter() - started
    metrics = run["metrics"]
    knn = evaluate_checkpoint(run["checkpoint"], f"{data}/train", f"{data}/test", "knn")
    losses = [round(report["loss"], 4) for report in read_history(run["run"])]
    result = {
        "method": args.method,
        "epochs": args.epochs,
        "sets": args.set,
        "batch_size": config.optim.batch_size,
        "model_only_img_s": round(model_only, 1),
        "end_to_end_img_s_last_epoch": round(metrics["images_per_s"], 1),
        "ratio": round(metrics["images_per_s"] / model_only, 3),
        "data_wait_frac_last_epoch": round(metrics["data_wait_frac"], 3),
        "pretrain_wall_s": round(wall, 1),
        "knn_top1": round(knn["top1"], 4),
        "random_init_knn_top1": round(knn["random_init_top1"], 4),
        "raw_pixels_knn_top1": round(knn["raw_pixels_top1"], 4),
        "loss_per_epoch": losses,
        "embedding_std": round(metrics["embedding_std"], 3),
    }
    for key in ("teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "center_norm", "collapsed"):
        if key in metrics:
            result[key] = round(metrics[key], 3)
    if args.linear:
        linear = evaluate_checkpoint(run["checkpoint"], f"{data}/train", f"{data}/test", "linear")
        result.update({f"linear_{k}": round(v, 4) for k, v in linear.items() if k.endswith("top1")})
    if args.picture:
        from pipelines.outputs.viz import attention_picture, first_canvases, mae_picture
        from pipelines.weights.checkpoint import load_checkpoint

        method, _ = load_checkpoint(run["checkpoint"])
        canvases = first_canvases(f"{data}/test", 6, config.data.canvas_size)
        os.makedirs(os.path.dirname(os.path.abspath(args.picture)), exist_ok=True)
        if args.method == "dino":
            attention_picture(method, canvases[0], config.data.canvas_size).save(args.picture)
        else:
            mae_picture(method, canvases, [0.5, 0.75, 0.9]).save(args.picture)
        result["picture"] = args.picture
    print(json.dumps(result))


if __name__ == "__main__":
    main()
