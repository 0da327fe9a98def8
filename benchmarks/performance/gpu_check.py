"""The CUDA path of every method at ImageNet scale, without Ray: Kornia views made on the GPU,
bf16 autocast forward/backward/step, the method's hooks, and throughput.

For each method's `imagenet` preset (SimCLR ResNet-50, MAE ViT-B/16, DINO ViT-S/16 with
2 x 224 + 8 x 96 crops) it prints one JSON line: views img/s (Kornia on the GPU), train img/s
(views + forward + backward + step + hooks), peak GPU memory, whether the bf16 loss at init is
within 2 % of the fp32 loss, and the cost of reading the loss back to the host every step (as the
NaN check does) against reading it once per 20 steps.

    python -m benchmarks.performance.gpu_check --batch 128 --steps 10
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.steps import StepBench, timed
from pipelines.config import build_config


def check(name: str, batch: int, steps: int, device: torch.device) -> dict:
    bench = StepBench.build(build_config(name, "imagenet", sets={"optim.batch_size": batch}), device)
    views_s = timed(bench.make_views, steps, warmup=2, device=device).step_s
    method, views = bench.method, bench.views
    torch.manual_seed(1)
    with torch.no_grad():
        fp32_loss = method(views)[0].item()
        torch.manual_seed(1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16_loss = method(views)[0].float().item()
    if hasattr(method, "criterion") and hasattr(method.criterion, "center"):
        method.criterion.center.zero_()  # the two checks above moved DINO's center
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    every_step, every_20 = (timed(reading_loss_every(bench, n), steps, warmup=2, device=device).step_s for n in (1, 20))
    return {
        "method": name,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch": batch,
        "views": [tuple(v.shape[-2:]) for v in views][:3],
        "views_img_s": round(batch / views_s, 1),
        "train_img_s": round(batch / every_20, 1),
        "train_img_s_host_read_every_step": round(batch / every_step, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "fp32_loss_at_init": round(fp32_loss, 4),
        "bf16_loss_at_init": round(bf16_loss, 4),
        "bf16_within_2pct": abs(bf16_loss - fp32_loss) <= 0.02 * abs(fp32_loss),
    }


def reading_loss_every(bench: StepBench, steps: int):
    """The whole step (views, hooks, bf16 forward, backward, clipping, optimizer), its losses read
    back to the host and checked every `steps` steps, as the NaN check does every step."""
    losses = []

    def step(i: int) -> None:
        losses.append(bench.train_step(i))
        if (i + 1) % steps == 0:
            assert torch.isfinite(torch.stack(losses)).all().item()
            losses.clear()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default="simclr,mae,dino")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda}), flush=True)
    for name in args.methods.split(","):
        print(json.dumps(check(name, args.batch, args.steps, torch.device(args.device))), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
