"""What the step options buy on this machine: model-only images/s of each method's `tiny` step
(forward, backward, optimizer, on views made once) eager, with `torch.compile`
(`train.compile`), and with channels-last memory (`train.channels_last`), measured in one run
(the variants one after another, in `--variants` order):

    python -m benchmarks.performance.step_options [--threads 2] [--steps 10] [--methods simclr,mae,dino,byol]
        [--variants eager,compile,channels_last]

Prints one JSON line per method: img/s per variant, each variant's first step in seconds (the
compile's cost shows there) and, for the AdamW methods, the optimizer step alone with PyTorch's
default and fused AdamW. Issue 16, item 2.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.steps import StepBench, timed
from pipelines.config import build_config, build_method


def rate(config, variant: str, steps: int) -> tuple[float, float]:
    """(img/s over `steps` steps after the first, seconds of the first step)."""
    bench = StepBench.build(config, compile=variant == "compile", channels_last=variant == "channels_last")
    timing = timed(bench.model_step, steps)
    return timing.rate(bench.batch), timing.first_s


def adamw_step_ms(config, fused: bool, steps: int = 50) -> float:
    """Milliseconds per AdamW step over the method's parameters (gradients set once)."""
    method = build_method(config)
    optimizer = torch.optim.AdamW(method.param_groups(config.optim.weight_decay), lr=1e-4, fused=fused)
    for parameter in method.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default="simclr,mae,dino,byol")
    parser.add_argument("--variants", default="eager,compile,channels_last", help="measured in this order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.methods.split(","):
        config = build_config(name, "tiny")
        row = {"method": name, "batch": config.optim.batch_size, "canvas": config.data.canvas_size}
        for variant in args.variants.split(","):
            img_s, first_s = rate(config, variant, args.steps)
            row[f"{variant}_img_s"] = round(img_s, 1)
            row[f"{variant}_first_step_s"] = round(first_s, 1)
        for variant in ("compile", "channels_last"):
            if f"{variant}_img_s" in row and "eager_img_s" in row:
                row[f"{variant}_speedup"] = round(row[f"{variant}_img_s"] / row["eager_img_s"], 2)
        if name in ("mae", "dino"):  # the AdamW methods: the optimizer step alone, default vs fused
            row["adamw_step_ms"] = round(adamw_step_ms(config, fused=False), 2)
            row["fused_adamw_step_ms"] = round(adamw_step_ms(config, fused=True), 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
