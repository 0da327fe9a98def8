"""What the step options buy on this machine: model-only images/s of each method's `tiny` step
(forward, backward, optimizer, on views made once) eager, with `torch.compile`
(`train.compile`), and with channels-last memory (`train.channels_last`), measured in one run
(the variants one after another, in `--variants` order):

    python benchmarks/step_options.py [--threads 2] [--steps 10] [--methods simclr,mae,dino,byol]
        [--variants eager,compile,channels_last]

Prints one JSON line per method: img/s per variant, each variant's first step in seconds (the
compile's cost shows there) and, for the AdamW methods, the optimizer step alone with PyTorch's
default and fused AdamW. Issue 16, item 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.config import build_method
from pipelines.config import build_config  # noqa: E402
from pipelines.train.plan import plan  # noqa: E402
from pipelines.train.worker import as_step_input, wrap_model  # noqa: E402


def rate(config, variant: str, steps: int) -> tuple[float, float]:
    """(img/s over `steps` steps after the first, seconds of the first step)."""
    torch.manual_seed(0)
    method = build_method(config)
    channels_last = variant == "channels_last"
    model = wrap_model(method, 1, torch.device("cpu"), compile=variant == "compile", channels_last=channels_last)
    optimizer = method.make_optimizer(method.param_groups(config.optim.weight_decay), plan(config, 4000).peak_lr,
                                      config.optim)
    size = config.data.canvas_size
    canvases = torch.randint(0, 256, (config.optim.batch_size, size, size, 3), dtype=torch.uint8)
    views = as_step_input(method.views(canvases), channels_last)
    first = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        loss, _ = model(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            first = time.perf_counter() - start
            timed = time.perf_counter()
    return config.optim.batch_size * steps / (time.perf_counter() - timed), first


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
