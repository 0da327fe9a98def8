"""How much of a distillation step is the teacher's forward (issue 32, item 3): the teacher alone
(`Distill.teacher_embeddings`, inference mode; bf16 and channels-last on a GPU) against the
worker loop's whole step without data (`benchmarks/steps.py`), for a teacher folder or a random
teacher of a named architecture.

    python -m benchmarks.performance.distill_step --teacher distill-bench/teacher
    python -m benchmarks.performance.distill_step --preset vitb14 --teacher random --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.steps import StepBench, timed
from pipelines.config import build_config, pinned_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="hparams.teacher_weights: a folder, a file, or random")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = {"hparams.teacher_weights": args.teacher, "optim.batch_size": args.batch,
            **dict(item.split("=", 1) for item in args.set)}
    config = pinned_config(build_config("distill", args.preset, sets=sets))
    device = torch.device(args.device)
    bench = StepBench.build(config, device)
    (view, _) = bench.method.step_input({"image": bench.canvases})
    teacher = timed(lambda _: bench.method.teacher_embeddings(view), args.steps, device=device)
    step = timed(bench.train_step, args.steps, device=device)
    print(json.dumps({"device": str(device), "preset": args.preset, "batch": args.batch,
                      "teacher_dim": config.hparams.teacher_dim, "teacher_ms": round(teacher.step_s * 1000, 1),
                      "step_ms": round(step.step_s * 1000, 1), "teacher_share": round(teacher.step_s / step.step_s, 3),
                      "images_per_s": round(step.rate(args.batch), 1)}))


if __name__ == "__main__":
    main()
