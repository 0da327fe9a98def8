"""Views per second per recipe on this machine, the copies of a view kind cropped one by one and
their photometric ops run in one batched call (`ViewMaker(batch_copies=True)`) against the whole
augmentation once per copy (`batch_copies=False`, the old path),
measured in the same run at the sample's size and at 224 px:

    python -m benchmarks.performance.view_rates [--threads 2] [--batch 64] [--repeats 3] [--rounds 5]

Prints one JSON line per (method, size) and a summary line. Images per second count source
images (each makes all of its recipe's views).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from methods import METHODS
from methods.views import ViewMaker

SIZES = {"32px": (32, 32), "224px": (256, 224)}  # (canvas, global view size)


def images_per_s(makers: dict[str, ViewMaker], canvases: torch.Tensor, repeats: int, rounds: int) -> dict[str, float]:
    """Median img/s of each maker over `rounds` rounds of `repeats` calls, the makers taking turns
    within each round, in alternating order (so a slow moment of the machine hits them alike)."""
    seconds: dict[str, list[float]] = {name: [] for name in makers}
    for maker in makers.values():
        maker(canvases)  # warm-up
    for round_ in range(rounds):
        order = list(makers.items())
        for name, maker in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(repeats):
                maker(canvases)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(canvases) * repeats / statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="32px,224px")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for method in sorted(METHODS):
        for label in args.sizes.split(","):
            canvas, size = SIZES[label]
            recipe = METHODS[method].default_recipe(size)
            canvases = torch.randint(0, 256, (args.batch, canvas, canvas, 3), dtype=torch.uint8)
            torch.manual_seed(0)
            rates = images_per_s({"per_copy": ViewMaker(recipe, batch_copies=False),
                                  "batched": ViewMaker(recipe, batch_copies=True)}, canvases, args.repeats, args.rounds)
            per_copy, batched = rates["per_copy"], rates["batched"]
            row = {"method": method, "size": label, "views": len(recipe.names), "per_copy_img_s": round(per_copy, 1),
                   "batched_img_s": round(batched, 1), "speedup": round(batched / per_copy, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"threads": args.threads, "batch": args.batch,
                      "speedup": {f"{r['method']} {r['size']}": r["speedup"] for r in rows}}), flush=True)


if __name__ == "__main__":
    main()
