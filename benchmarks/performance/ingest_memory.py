"""Peak memory of a streaming ingest pass as the dataset grows past the object store.

Ray gets a small object store; datasets whose decoded canvases are 1x, 2x, 4x and 8x that store
are streamed once each (read + decode + iterate as torch batches). Memory is the proportional
set size (PSS, shared pages split fairly) summed over the driver and every process it started
(raylet, GCS, workers, object store pages), sampled every 0.1 s. Flat peaks = streaming.

    python -m benchmarks.performance.ingest_memory [--store-mb 100] [--canvas 224]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import ray

from benchmarks.images import photo_like_jpegs, write_shards
from pipelines.images.ingest import IngestConfig, image_dataset, iter_canvas_batches


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                tree.setdefault(parent, []).append(int(entry))
            except OSError:
                continue
    return tree


def session_pss_mb() -> tuple[float, int, float]:
    """(PSS of this process and all its descendants in MB, how many processes, driver PSS MB)."""
    tree, stack, total, count, driver = _children(), [os.getpid()], 0, 0, 0
    while stack:
        pid = stack.pop()
        stack.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        count += 1
                        driver = total if pid == os.getpid() else driver
                        break
        except OSError:
            continue
    return total / 1024, count, driver / 1024


def peak_during(fn) -> tuple[tuple[float, int, float], object]:
    """((peak PSS MB, processes at that peak, driver PSS MB at that peak) while fn runs, fn's result)."""
    peak, done = [(0.0, 0, 0.0)], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], session_pss_mb())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return peak[0], result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store-mb", type=int, default=100)
    parser.add_argument("--canvas", type=int, default=224)
    parser.add_argument("--multiples", default="1,2,4,8")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    canvas_bytes = args.canvas * args.canvas * 3
    distinct = photo_like_jpegs(300)
    config = IngestConfig(canvas_size=args.canvas, decode_num_cpus=1.0, shuffle_buffer=256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for multiple in [int(m) for m in args.multiples.split(",")]:
            count = multiple * args.store_mb * 1024**2 // canvas_bytes
            folder = f"{tmp}/x{multiple}"
            write_shards(folder, [distinct[i % len(distinct)] for i in range(count)], shards=max(4, multiple * 4))
            # A fresh Ray per pass, warmed by one small pass, so every size starts from the same state.
            ray.init(num_cpus=2, object_store_memory=args.store_mb * 1024**2, logging_level="ERROR",
                     include_dashboard=False)
            dataset, log = image_dataset(folder, config)
            for _ in iter_canvas_batches(dataset.limit(256), 128, log, config):
                pass

            def one_pass():
                return sum(len(b["image"]) for b in iter_canvas_batches(dataset, 128, log, config))

            baseline = session_pss_mb()[0]
            (peak, processes, driver), seen = peak_during(one_pass)
            ray.shutdown()
            row = {
                "dataset_decoded_mb": round(count * canvas_bytes / 1024**2),
                "x_object_store": multiple,
                "images": seen,
                "pss_before_mb": round(baseline),
                "pss_peak_mb": round(peak),
                "processes_at_peak": processes,
                "driver_pss_at_peak_mb": round(driver),
            }
            rows.append(row)
            print(row, flush=True)
    print(json.dumps({"object_store_mb": args.store_mb, "canvas": args.canvas, "passes": rows}))


if __name__ == "__main__":
    main()
