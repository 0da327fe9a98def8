"""The yardstick for our SimCLR `tiny` rate: a plain PyTorch loop on the same 2 cores, with no Ray.

Same model, loss and optimizer as `selfsup pretrain --method simclr --preset tiny` (the method's
own module and LARS), same data (the bundled MNIST sample's 4,000 training digits), same views
recipe, but made the way lightly's `SimCLRTransform` makes them: per image, with torchvision
transforms (RandomResizedCrop 32 scale 0.2-1, flip, colour jitter 0.8 x (0.4, 0.4, 0.4, 0.1),
grayscale 0.2, no blur), in `DataLoader` worker processes. It prints img/s over the last epoch for
each (torch threads, loader workers) setting asked for; compare with `pretrain_method.py`.

    python -m benchmarks.performance.plain_loop --epochs 3 --threads 1 2 --workers 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision.transforms import v2

from pipelines.config import build_config, build_method
from pipelines.images.prepare import PrepareConfig, prepare
from pipelines.images.shards import find_shards
from pipelines.train.plan import plan_run


class TwoViews(torch.utils.data.Dataset):
    """Encoded images in memory -> two augmented views each, per image (lightly's way)."""

    def __init__(self, encoded: list[bytes], canvas: int, spec, mean, std):
        self.encoded = encoded
        self.canvas = canvas
        self.transform = v2.Compose([
            v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
            v2.RandomHorizontalFlip(spec.flip),
            v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p),
            v2.RandomGrayscale(p=spec.grayscale),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int):
        image = Image.open(io.BytesIO(self.encoded[index])).convert("RGB").resize((self.canvas, self.canvas))
        return self.transform(image), self.transform(image)


def rate(config, encoded: list[bytes], threads: int, workers: int, epochs: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    method = build_method(config)
    if config.train.channels_last:
        method.to(memory_format=torch.channels_last)
    schedule = plan_run(config, len(encoded))
    optimizer = method.make_optimizer(method.param_groups(config.optim.weight_decay), schedule.peak_lr, config.optim)
    recipe = config.recipe()
    spec = recipe.views["view"]
    assert not spec.blur and not spec.solarize and not spec.mix, "the tiny recipe this loop copies has none"
    data = TwoViews(encoded, config.data.canvas_size, spec, recipe.mean, recipe.std)
    loader = torch.utils.data.DataLoader(data, batch_size=config.optim.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    for epoch in range(epochs):
        started, images = time.perf_counter(), 0
        for first, second in loader:
            views = [v.contiguous(memory_format=torch.channels_last) for v in (first, second)]
            loss, _ = method(views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(first)
        elapsed = time.perf_counter() - started
    return images / elapsed  # the last epoch's


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workdir", default="/tmp/selfsup-bench")
    args = parser.parse_args()
    config = build_config("simclr", "tiny")
    data = os.path.join(args.workdir, "mnist")
    if not os.path.isdir(f"{data}/train"):
        import ray

        ray.init(num_cpus=2, logging_level="ERROR")
        prepare("sample:mnist", data, PrepareConfig(overwrite=True))
        ray.shutdown()
    encoded = [row for path in find_shards(f"{data}/train").files
               for row in pq.read_table(path, columns=["image"]).column("image").to_pylist()]
    for threads in args.threads:
        for workers in args.workers:
            images_per_s = rate(config, encoded, threads, workers, args.epochs)
            print(json.dumps({"loop": "plain PyTorch", "torch_threads": threads, "loader_workers": workers,
                              "images": len(encoded), "img_s_last_epoch": round(images_per_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
