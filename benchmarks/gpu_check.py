"""The CUDA path of every method at ImageNet scale, without Ray: Kornia views made on the GPU,
bf16 autocast forward/backward/step, the method's hooks, and throughput.

For each method's `imagenet` preset (SimCLR ResNet-50, MAE ViT-B/16, DINO ViT-S/16 with
2 x 224 + 8 x 96 crops) it prints one JSON line: views img/s (Kornia on the GPU), train img/s
(views + forward + backward + step + hooks), peak GPU memory, whether the bf16 loss at init is
within 2 % of the fp32 loss, and the cost of reading the loss back to the host every step (as the
NaN check does) against reading it once per 20 steps.

    python benchmarks/gpu_check.py --batch 128 --steps 10
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from methods import get_method
from methods.backbone import BackboneConfig
from methods.base import hparams_from_dict


def build(name: str, device: torch.device):
    cls = get_method(name)
    preset = cls.presets["imagenet"]
    recipe = cls.default_recipe().with_overrides(preset.get("views", {}))
    hparams = hparams_from_dict(cls.Hyperparameters, preset.get("hparams", {}))
    torch.manual_seed(0)
    method = cls(BackboneConfig(**preset["backbone"]), hparams, recipe).to(device)
    optim = argparse.Namespace(momentum=0.9, betas=(0.9, 0.95))
    optimizer = method.make_optimizer(method.param_groups(preset["optim"]["weight_decay"]), 1e-4, optim)
    return method, optimizer, preset["data"]["canvas_size"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_steps(method, optimizer, canvases, steps: int, read_every: int) -> float:
    """Seconds per step for views + bf16 forward + backward + step + hooks."""
    losses = []
    for step in range(steps + 2):
        if step == 2:
            sync()
            started = time.perf_counter()
        views = method.views(canvases)
        method.before_step(step, 1000, 1, optimizer)
        with torch.autocast(canvases.device.type, dtype=torch.bfloat16):
            loss, _ = method(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 3.0)
        method.on_gradients(step, 1)
        optimizer.step()
        method.after_step(step, 1000)
        losses.append(loss.detach())
        if (step + 1) % read_every == 0:
            assert torch.isfinite(torch.stack(losses)).all().item()
            losses.clear()
    sync()
    return (time.perf_counter() - started) / steps


def check(name: str, batch: int, steps: int, device: torch.device) -> dict:
    method, optimizer, canvas = build(name, device)
    canvases = torch.randint(0, 256, (batch, canvas, canvas, 3), dtype=torch.uint8, device=device)
    for _ in range(2):
        method.views(canvases)
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        views = method.views(canvases)
    sync()
    views_s = (time.perf_counter() - started) / steps
    views = method.views(canvases)
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
    every_step = train_steps(method, optimizer, canvases, steps, read_every=1)
    every_20 = train_steps(method, optimizer, canvases, steps, read_every=20)
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
