"""Probe a method's recipe on a bundled sample in minutes: the same method, views, optimizer and
schedule as `selfsup pretrain`, trained in one process on the sample held in memory (no Ray, no
decode), then kNN / linear top-1 of the encoder on the sample's test split. For exploring views
and hyperparameters before a real run or a `selfsup tune` search (and for the grids of
`benchmarks/research/findings.py`); the figures it prints are the in-memory ones, not a pipeline's.

    python -m benchmarks.research.recipe_probe --method simclr --epochs 5 --sample mnist-m \
        --set optim.batch_size=64 --set views.view.mix=0.5 --threads 1

`--learns` starts from the method's "it learns" run of the tests (tests/helpers/runs.py; give
`--sample digits`, the sample those runs train on) instead of the `tiny` preset, and `--floors`
scores the random-init encoder first, as `eval` does: the screens of docs/BENCHMARKS.md ("Every
method learns on the digits sample").
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Callable

import numpy as np
import torch

from pipelines.cli import parse_sets
from pipelines.config import build_config, build_method, pinned_config
from pipelines.evaluate.knn import knn_top1
from pipelines.evaluate.label_free import embedding_spread, probe_metrics
from pipelines.evaluate.linear import linear_probe_top1
from pipelines.images.decode import decode_canvas
from pipelines.images.samples import sample_tables
from pipelines.train.plan import plan_run


@functools.lru_cache(maxsize=2)
def load(sample: str, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{split: (canvases (N, size, size, 3) uint8, labels (N,))}` of a bundled sample."""
    tables = sample_tables(sample)
    return {split: (torch.from_numpy(np.stack([decode_canvas(b, size) for b in t.column("image").to_pylist()])),
                    torch.from_numpy(np.array(t.column("label").to_numpy()))) for split, t in tables.items()}


def scores(method, train, train_labels, test, test_labels, linear: bool = True) -> dict[str, float | None]:
    """kNN (and linear) top-1 of `method`'s encoder: the training split the bank, the test split the queries."""
    bank, queries = features(method, train), features(method, test)
    return {"knn": round(knn_top1(bank, train_labels, queries, test_labels), 3),
            "linear": round(linear_probe_top1(bank, train_labels, queries, test_labels), 3) if linear else None}


@torch.no_grad()
def features(method, canvases: torch.Tensor) -> torch.Tensor:
    method.eval()
    out = torch.cat([method.features(method.eval_images(canvases[i:i + 500])).float()
                     for i in range(0, len(canvases), 500)])
    method.train()
    return out


@torch.no_grad()
def recalibrate_batch_norm(method, canvases: torch.Tensor) -> None:
    """BatchNorm running statistics recomputed on the clean (evaluation-transformed) images
    instead of the augmented views they were tracked on (as `torch.optim.swa_utils.update_bn`)."""
    layers = [m for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch below
    method.train()
    for i in range(0, len(canvases), 256):
        method.features(method.eval_images(canvases[i:i + 256]))


def probe(method_name: str, sets: dict, sample: str = "mnist-m", knn_every: int = 0, linear: bool = True,
          rows_per_epoch: int = 1, on_row: Callable[[dict], None] | None = None, recalibrate_bn: bool = False,
          probe_size: int = 2048, floors: bool = False) -> dict:
    """Train `method_name`'s `tiny` preset with `sets` applied on `sample` in memory.

    Returns `{"history": [rows: means over 1/rows_per_epoch of an epoch of the loss, every scalar
    statistic the method reports and embedding_std, with the method's `diagnose` flags; kNN at
    the end of every `knn_every`-th epoch], "knn", "linear", "train_seconds", "label_free",
    "label_free_random_init"}`: the label-free metrics (pipelines/evaluate/label_free.py) of the trained
    and the untrained encoder on the first `probe_size` training images (0 = none); `on_row`
    sees each history row as it is made; with `floors`, also "knn_random_init" and
    "linear_random_init" (the same encoder before training).
    """
    config = pinned_config(build_config(method_name, "tiny", sets=sets))
    (train, train_labels), (test, test_labels) = (load(sample, config.data.canvas_size)[s] for s in ("train", "test"))
    method = build_method(config)
    probe_batches = [{"image": train[i:i + 512]} for i in range(0, min(len(train), probe_size), 512)]
    random_init = probe_metrics(method, probe_batches, "cpu") if probe_size else {}
    floor = scores(method, train, train_labels, test, test_labels, linear) if floors else {}
    schedule = plan_run(config, len(train))
    optimizer = method.make_optimizer(method.param_groups(config.optim.weight_decay), schedule.peak_lr, config.optim)
    batch, step, started, history = config.optim.batch_size, 0, time.perf_counter(), []
    order_generator = torch.Generator().manual_seed(config.train.seed)
    torch.manual_seed(config.train.seed)
    for epoch in range(config.optim.epochs):
        order, sums, steps = torch.randperm(len(train), generator=order_generator), {}, 0
        row_ends = {round(schedule.steps_per_epoch * (r + 1) / rows_per_epoch) for r in range(rows_per_epoch)}
        for index in range(schedule.steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            method.before_step(step, schedule.total_steps, epoch, optimizer)
            loss, stats = method(method.step_input({"image": train[order[index * batch:(index + 1) * batch]]}))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), config.optim.clip_grad)
            method.on_gradients(step, epoch)
            optimizer.step()
            method.after_step(step, schedule.total_steps)
            values = {"loss": loss.detach(), "embedding_std": embedding_spread(stats["embeddings"])}
            values.update({k: v for k, v in stats.items() if k != "embeddings" and torch.is_tensor(v) and v.numel() == 1})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            step, steps = step + 1, steps + 1
            if index + 1 not in row_ends:
                continue
            row = {"epoch": round(epoch + (index + 1) / schedule.steps_per_epoch, 3), "step": step,
                   **{k: round(v / steps, 4) for k, v in sums.items()}, "seconds": round(time.perf_counter() - started)}
            row.update(method.diagnose(row))
            if knn_every and index + 1 == schedule.steps_per_epoch and (epoch + 1) % knn_every == 0:
                row["knn"] = round(knn_top1(features(method, train), train_labels, features(method, test), test_labels), 4)
            history.append(row)
            sums, steps = {}, 0
            if on_row:
                on_row(row)
    seconds = time.perf_counter() - started
    result = {"history": history, "train_seconds": round(seconds),
              **scores(method, train, train_labels, test, test_labels, linear),
              **{f"{key}_random_init": value for key, value in floor.items()}}
    if probe_size:
        result["label_free"] = {k: round(v, 4) for k, v in probe_metrics(method, probe_batches, "cpu").items()}
        result["label_free_random_init"] = {k: round(v, 4) for k, v in random_init.items()}
    if recalibrate_bn:
        recalibrate_batch_norm(method, train)
        bank, queries = features(method, train), features(method, test)
        result["knn_recalibrated_bn"] = round(knn_top1(bank, train_labels, queries, test_labels), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--sample", default="mnist-m")
    parser.add_argument("--epochs", type=int, default=None, help="5, or with --learns the learns run's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--knn-every", type=int, default=0, help="also print kNN every N epochs")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="also kNN after recomputing BatchNorm statistics on the clean training images")
    parser.add_argument("--learns", action="store_true", help="start from the tests' \"it learns\" run of the method")
    parser.add_argument("--floors", action="store_true", help="also score the encoder at its random init")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = {}
    if args.learns:  # the tests' config with the learns run's --sets (tests/helpers/runs.py)
        from tests.helpers.runs import learns_sets

        base = learns_sets(args.method)  # distillation's: give its teacher with --set hparams.teacher_weights=
    epochs = args.epochs or base.get("optim.epochs", 5)
    sets = {**base, "optim.epochs": epochs, **parse_sets(args.set)}
    result = probe(args.method, sets, args.sample, args.knn_every, on_row=lambda row: print(json.dumps(row), flush=True),
                   recalibrate_bn=args.recalibrate_bn, floors=args.floors)
    print(json.dumps({"method": args.method, "sample": args.sample, "sets": sets,
                      **{k: v for k, v in result.items() if k != "history"}}))


if __name__ == "__main__":
    main()
