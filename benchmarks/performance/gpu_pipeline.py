"""End to end on the GPU: `selfsup pretrain` through Ray Data and Ray Train for each method's
`imagenet` preset, on JPEG shards of 256-320 px crops of the bundled photos, with JPEGs decoded
on CPU (Pillow in Ray Data tasks) and on the GPU (`data.decode=gpu`, nvJPEG).

First the decode path alone: 256 JPEGs decoded batched on the device against Pillow (canvas
difference, images/s vs one CPU core). Then one JSON line per method and decode mode, and a table:
- `e2e_img_s`, `data_wait`: the last epoch of the real run (Ray Data ingest, views, step);
- `model_img_s`: forward + backward + step on views made once (bf16 autocast, channels-last as
  the worker does), no data; `views_img_s`: the method's Kornia views alone;
- `peak_gib`: the Train worker's peak GPU memory;
- `mfu`: model FLOPs per image (counted by `torch.utils.flop_counter` over one forward and
  backward) x end-to-end img/s, over the GPU's dense bf16 peak (`--peak-tflops`, 989 for
  H100/H200).

    python -m benchmarks.performance.gpu_pipeline                 # the GPU machine: about 8 minutes
    python -m benchmarks.performance.gpu_pipeline --dry-run       # CPU: tiny counts, decode cpu only
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import ray
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.images import photo_crop_jpegs, write_shards
from benchmarks.steps import StepBench, sync, timed
from pipelines.config import build_config
from pipelines.images.decode import DEFAULT_MAX_PIXELS, decode_canvas, route_records
from pipelines.images.device_decode import device_canvases
from pipelines.train.pretrain import pretrain


def model_measures(config, device: torch.device, steps: int) -> dict:
    """Views alone, the step alone (on views made once), and model FLOPs per image."""
    bench = StepBench.build(config, device)
    views = timed(bench.make_views, steps, warmup=2, device=device)
    model = timed(bench.model_step, steps, warmup=2, device=device)
    small = [view[:2] for view in bench.views]
    with FlopCounterMode(display=False) as counter:
        loss, _ = bench.model(small)
        loss.backward()
    del bench
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"views_img_s": views.rate(config.optim.batch_size), "model_img_s": model.rate(config.optim.batch_size),
            "gflop_per_image": counter.get_total_flops() / 2 / 1e9}


def decode_check(images: list[bytes], size: int, device: torch.device, batch: int = 256) -> dict:
    """The device decode path against Pillow on the same JPEGs: canvases' mean difference (levels
    of 255), and images/s of one batched device decode vs Pillow on one CPU core."""
    images = (images * (batch // len(images) + 1))[:batch]
    table, bad = route_records(images, [str(i) for i in range(batch)], size, DEFAULT_MAX_PIXELS)
    rows = {key: np.array(values, dtype=object if key in ("encoded", "id") else None)
            for key, values in table.to_pydict().items()}
    device_canvases(rows, size, device, DEFAULT_MAX_PIXELS)  # warm-up: nvJPEG handles, kernels
    sync(device)
    started = time.perf_counter()
    canvases, failed = device_canvases(rows, size, device, DEFAULT_MAX_PIXELS)
    sync(device)
    device_s = time.perf_counter() - started
    started = time.perf_counter()
    pillow = np.stack([decode_canvas(data, size) for data in images])
    pillow_s = time.perf_counter() - started
    difference = np.abs(canvases.cpu().numpy().astype(np.int16) - pillow.astype(np.int16)).mean(axis=(1, 2, 3))
    return {"decode_check": str(device), "jpegs": batch, "bad": len(bad) + len(failed),
            "mean_difference": round(float(difference.mean()), 2), "worst_image": round(float(difference.max()), 2),
            "device_img_s": round(batch / device_s, 1), "pillow_img_s_one_core": round(batch / pillow_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="dino,simclr,mae")
    parser.add_argument("--decode", default="cpu,gpu")
    parser.add_argument("--images", type=int, default=6144)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    parser.add_argument("--cpus-per-worker", type=float, default=2)
    parser.add_argument("--model-steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "selfsup-gpu-pipeline"))
    parser.add_argument("--dry-run", action="store_true", help="CPU: 24 images, batch 4, decode cpu, 1 CPU a worker")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.dry_run:  # one CPU for the worker, the rest for decoding (it cannot take them all)
        args.images, args.batch, args.decode, args.model_steps, args.cpus_per_worker = 24, 4, "cpu", 1, 1
    elif not cuda:
        parser.error("no CUDA device: use --dry-run on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    data = os.path.join(args.workdir, "jpegs")
    started = time.perf_counter()
    images = photo_crop_jpegs(args.images)
    write_shards(data, images, shards=max(1, args.images // 512))
    print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                      "images": len(images), "mean_jpeg_kb": round(sum(map(len, images)) / len(images) / 1024, 1),
                      "shards_s": round(time.perf_counter() - started, 1)}), flush=True)
    print(json.dumps(decode_check(images, 256, device)), flush=True)
    ray.init(num_cpus=os.cpu_count(), logging_level="ERROR")
    rows = []
    for name in args.methods.split(","):
        sets = {"optim.epochs": args.epochs, "optim.batch_size": args.batch, "optim.warmup_epochs": 0,
                "train.knn_every_epochs": 0, "train.probe_size": 0, "train.keep_checkpoints": 1,
                "train.cpus_per_worker": args.cpus_per_worker, "train.torch_threads": int(args.cpus_per_worker)}
        measures = model_measures(build_config(name, "imagenet", sets=sets), device, args.model_steps)
        for decode in args.decode.split(","):
            config = build_config(name, "imagenet", sets={**sets, "data.decode": decode})
            run = pretrain(config, data, gpus_per_worker=1 if cuda else 0,
                           storage=os.path.join(args.workdir, "runs"), name=f"{name}-{decode}-{int(time.time())}")
            metrics = run["metrics"]
            row = {"method": name, "decode": decode, "batch": args.batch,
                   "e2e_img_s": round(metrics["images_per_s"], 1),
                   "data_wait": round(metrics["data_wait_frac"], 3),
                   "model_img_s": round(measures["model_img_s"], 1),
                   "views_img_s": round(measures["views_img_s"], 1),
                   "e2e_over_model": round(metrics["images_per_s"] / measures["model_img_s"], 3),
                   "peak_gib": round(metrics.get("gpu_peak_gib", float("nan")), 2),
                   "gflop_per_image": round(measures["gflop_per_image"], 1),
                   "mfu": round(measures["gflop_per_image"] * 1e9 * metrics["images_per_s"] / (args.peak_tflops * 1e12), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| method | decode | end to end img/s | data-wait | model only img/s | views img/s | e2e / model | "
          "peak GiB | GFLOP/img | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['decode']} | {r['e2e_img_s']:,.0f} | {r['data_wait']:.3f} | {r['model_img_s']:,.0f} "
              f"| {r['views_img_s']:,.0f} | {r['e2e_over_model']:.2f} | {r['peak_gib']} | {r['gflop_per_image']} "
              f"| {r['mfu']:.1%} |")
    print(json.dumps({"total_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
