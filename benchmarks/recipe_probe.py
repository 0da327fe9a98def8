"""Probe a method's recipe on a bundled sample in minutes: the same method, views, optimizer and
schedule as `selfsup pretrain`, trained in one process on the sample held in memory (no Ray, no
decode), then kNN / linear top-1 of the encoder on the sample's test split. For exploring views
and hyperparameters before a real run or a `selfsup tune` search; the figures it prints are the
in-memory ones, not a pipeline's.

    python benchmarks/recipe_probe.py --method simclr --epochs 5 --sample mnist-m \
        --set optim.batch_size=64 --set views.view.mix=0.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pipelines.cli import parse_sets
from pipelines.config import build_config
from pipelines.decode import decode_canvas
from pipelines.evaluate import knn_top1, linear_probe_top1
from pipelines.samples import sample_tables
from pipelines.train_loop import build_method, lr_at, plan


def load(sample: str, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    tables = sample_tables(sample)
    return {split: (torch.from_numpy(np.stack([decode_canvas(b, size) for b in t.column("image").to_pylist()])),
                    torch.from_numpy(np.array(t.column("label").to_numpy()))) for split, t in tables.items()}


@torch.no_grad()
def features(method, canvases: torch.Tensor) -> torch.Tensor:
    method.eval()
    out = torch.cat([method.features(method.eval_images(canvases[i:i + 500])).float()
                     for i in range(0, len(canvases), 500)])
    method.train()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--sample", default="mnist-m")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--knn-every", type=int, default=0, help="also print kNN every N epochs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = {"optim.epochs": args.epochs, **parse_sets(args.set)}
    config = build_config(args.method, "tiny", sets=sets)
    data = load(args.sample, config.data.canvas_size)
    (train, train_labels), (test, test_labels) = data["train"], data["test"]
    method = build_method(config)
    schedule = plan(config, len(train))
    optimizer = method.make_optimizer(method.param_groups(config.optim.weight_decay), schedule["peak_lr"], config.optim)
    batch, step, started = config.optim.batch_size, 0, time.perf_counter()
    order_generator = torch.Generator().manual_seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    for epoch in range(config.optim.epochs):
        order, losses = torch.randperm(len(train), generator=order_generator), []
        for index in range(schedule["steps_per_epoch"]):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, schedule)
            method.before_step(step, schedule["total_steps"], epoch, optimizer)
            loss, _ = method(method.views(train[order[index * batch:(index + 1) * batch]]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), config.optim.clip_grad)
            method.on_gradients(step, epoch)
            optimizer.step()
            method.after_step(step, schedule["total_steps"])
            losses.append(loss.item())
            step += 1
        line = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                "seconds": round(time.perf_counter() - started)}
        if args.knn_every and (epoch + 1) % args.knn_every == 0:
            line["knn"] = knn_top1(features(method, train), train_labels, features(method, test), test_labels)
        print(json.dumps(line), flush=True)
    seconds = time.perf_counter() - started
    bank, queries = features(method, train), features(method, test)
    print(json.dumps({"method": args.method, "sample": args.sample, "sets": sets, "train_seconds": round(seconds),
                      "knn": round(knn_top1(bank, train_labels, queries, test_labels), 3),
                      "linear": round(linear_probe_top1(bank, train_labels, queries, test_labels), 3)}))


if __name__ == "__main__":
    main()
