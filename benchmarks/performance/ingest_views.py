"""Ingest and view-generation throughput on this machine's CPUs.

Prints, per dataset: the decode-only limit (Pillow decoding the same bytes into canvases in a tight
loop, one process per core), the streaming ingest rate (Ray Data read + decode, iterated as torch
batches), and their ratio; then view-generation images/s per recipe at the sample's size and at
224 px. Usage:

    python -m benchmarks.performance.ingest_views [--cpus 2] [--jpegs 6000] [--mnist-repeats 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time

import ray
import torch

from benchmarks.images import photo_like_jpegs, write_shards
from methods.views import ViewMaker
from pipelines.images.decode import decode_canvas
from pipelines.images.ingest import IngestConfig, image_dataset, iter_canvas_batches
from pipelines.images.samples import sample_tables
from pipelines.outputs.viz import default_recipe


def _decode_chunk(args) -> int:
    chunk, size = args
    for data in chunk:
        decode_canvas(data, size)
    return len(chunk)


def decode_limit(images: list[bytes], size: int, cpus: int) -> float:
    chunks = [(images[i::cpus], size) for i in range(cpus)]
    with multiprocessing.get_context("spawn").Pool(cpus) as pool:
        pool.map(_decode_chunk, [(c[:8], size) for c, _ in chunks])  # warm the workers
        start = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
    return done / (time.perf_counter() - start)


def ingest_rates(folder: str, size: int) -> dict:
    """A warm pass (the first one spawns workers): images/s over the whole pass, the seconds to
    its first batch (listing and footer reads, once per pass), and images/s after that batch."""
    config = IngestConfig(canvas_size=size, decode_num_cpus=1.0, shuffle_buffer=0)
    dataset, log = image_dataset(folder, config)
    for _ in iter_canvas_batches(dataset, 256, log, config):
        pass
    start, count, first = time.perf_counter(), 0, None
    for batch in iter_canvas_batches(dataset, 256, log, config, epoch=1):
        if first is None:
            first, first_rows = time.perf_counter(), len(batch["image"])
        count += len(batch["image"])
    end = time.perf_counter()
    return {
        "pass_img_s": count / (end - start),
        "first_batch_s": first - start,
        "steady_img_s": (count - first_rows) / (end - first),
    }


def view_rate(method: str, canvas: int, view_size: int, batch: int = 64, repeats: int = 5) -> float:
    recipe = default_recipe(method, view_size)
    maker = ViewMaker(recipe)
    canvases = torch.randint(0, 256, (batch, canvas, canvas, 3), dtype=torch.uint8)
    maker(canvases)
    start = time.perf_counter()
    for _ in range(repeats):
        maker(canvases)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--jpegs", type=int, default=6000)
    parser.add_argument("--mnist-repeats", type=int, default=10, help="the 4,000 training digits, repeated")
    args = parser.parse_args()
    torch.set_num_threads(args.cpus)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=args.cpus, logging_level="ERROR", include_dashboard=False)
    results = {"cpus": args.cpus, "ingest": {}, "views_img_per_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        mnist = sample_tables("mnist")["train"].column("image").to_pylist() * args.mnist_repeats
        datasets = {
            f"{len(mnist)} mnist 28px PNG -> 32px canvas": (mnist, 32),
            f"{args.jpegs} 320x240 JPEG -> 224px canvas": (photo_like_jpegs(args.jpegs), 224),
        }
        for name, (images, size) in datasets.items():
            folder = f"{tmp}/{len(results['ingest'])}"
            write_shards(folder, images)
            limit = decode_limit(images, size, args.cpus)
            rates = ingest_rates(folder, size)
            results["ingest"][name] = {
                "images": len(images),
                "decode_limit_img_s": round(limit, 1),
                "ingest_pass_img_s": round(rates["pass_img_s"], 1),
                "pass_ratio": round(rates["pass_img_s"] / limit, 3),
                "first_batch_s": round(rates["first_batch_s"], 2),
                "ingest_steady_img_s": round(rates["steady_img_s"], 1),
                "steady_ratio": round(rates["steady_img_s"] / limit, 3),
            }
            print(name, results["ingest"][name], flush=True)
    for method in ("simclr", "dino", "mae"):
        for label, canvas, size in (("32px", 32, 32), ("224px", 256, 224)):
            rate = view_rate(method, canvas, size)
            results["views_img_per_s"][f"{method} @ {label}"] = round(rate, 1)
            print(f"views {method} @ {label}: {rate:.1f} img/s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
