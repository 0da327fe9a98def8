"""The floors a bundled sample sets for self-supervision: kNN and linear-probe top-1 of raw pixels
and of each method's random-init `tiny` encoder, on the sample's fixed train/test split.

The images go through the same decode as training and evaluation (`decode_canvas` to the preset's
canvas, `Method.eval_images`), and the same protocols as `selfsup eval` (weighted kNN k 20, T 0.07;
linear probe: BatchNorm without affine + linear, 100 epochs of AdamW). No Ray: the sample is small.

    python -m benchmarks.research.sample_baselines --sample mnist-m
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from methods import METHODS
from pipelines.config import build_config, build_method, pinned_config
from pipelines.evaluate.knn import knn_top1
from pipelines.evaluate.linear import linear_probe_top1
from pipelines.images.decode import decode_canvas
from pipelines.images.samples import sample_tables


def canvases(table, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([decode_canvas(b, size) for b in table.column("image").to_pylist()]))


def scores(train: torch.Tensor, train_labels, test: torch.Tensor, test_labels) -> dict:
    return {"knn": round(knn_top1(train, train_labels, test, test_labels), 3),
            "linear": round(linear_probe_top1(train, train_labels, test, test_labels), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sample", default="mnist-m")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tables = sample_tables(args.sample)
    labels = {split: torch.from_numpy(tables[split].column("label").to_numpy()) for split in tables}
    results = {}
    for method in sorted(METHODS):
        # a method whose settings name a file (distillation's teacher) takes its smoke teacher
        teacher = {key: value for key, value in METHODS[method].smoke_sets.items() if key.startswith("hparams.teacher")}
        config = pinned_config(build_config(method, "tiny", sets=teacher))
        images = {split: canvases(tables[split], config.data.canvas_size) for split in tables}
        if "raw pixels" not in results:
            pixels = {split: images[split].reshape(len(images[split]), -1).float() / 255 for split in images}
            results["raw pixels"] = scores(pixels["train"], labels["train"], pixels["test"], labels["test"])
        encoder = build_method(config).eval()
        with torch.no_grad():
            features = {split: torch.cat([encoder.features(encoder.eval_images(images[split][i:i + 500]))
                                          for i in range(0, len(images[split]), 500)]) for split in images}
        results[f"{method} random-init"] = scores(features["train"], labels["train"], features["test"], labels["test"])
        print(json.dumps({args.sample: {"encoder": f"{method} random-init", **results[f"{method} random-init"]}}),
              flush=True)
    print(json.dumps({"sample": args.sample, "train": len(labels["train"]), "test": len(labels["test"]), **results}))


if __name__ == "__main__":
    main()
