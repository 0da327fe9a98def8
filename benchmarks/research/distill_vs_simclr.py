"""Issue 32's must-show, in one run: a teacher (a finished SimCLR run, wider and longer than the
demo's) exported with `selfsup export`, the demo's student network distilled from it, and the same
student trained by SimCLR from scratch for the same wall-clock; all three scored by
`selfsup eval knn` on the same split. Every step is the CLI a user runs.

SimCLR gets the distillation's wall-clock: it trains the demo's recipe (its LR constant after the
warm-up, so stopping it early is the same recipe run shorter) and is interrupted (SIGINT, as
Ctrl-C) once it has run as long as the distillation did; its newest checkpoint is scored. Both
checkpoint once an epoch, as a run does by default, so SimCLR loses the part of an epoch it was
in when stopped (its steps are printed beside the distillation's).

    python -m benchmarks.research.distill_vs_simclr --teacher-run runs/teacher-w24 \
        --data selfsup-demo/data/mnist-m --work distill-bench
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from pipelines.weights.checkpoint import find_checkpoint, load_state

SELFSUP = [sys.executable, "-m", "pipelines.cli"]


def timed(command: list[str], log: str, budget_s: float | None = None) -> tuple[float, dict | None]:
    """(seconds the command ran, its JSON line); interrupted like Ctrl-C after `budget_s`."""
    start = time.perf_counter()
    with open(log, "w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            out, _ = process.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate()
    seconds = time.perf_counter() - start
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return seconds, json.loads(lines[-1]) if lines else None


def knn(checkpoint: str, data: str, log: str) -> dict:
    _, result = timed([*SELFSUP, "eval", "knn", "--checkpoint", checkpoint, "--train", f"{data}/train",
                       "--test", f"{data}/test"], log)
    if result is None:
        raise SystemExit(f"eval of {checkpoint} printed no JSON line: {log}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-run", required=True, help="a finished run folder to distill from")
    parser.add_argument("--data", required=True, help="prepared MNIST-M: DATA/train and DATA/test")
    parser.add_argument("--work", required=True, help="folder for the export, the runs and the logs")
    parser.add_argument("--epochs", type=int, default=15, help="distillation epochs (the demo's 15)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="on top of distill's tiny preset")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    teacher, runs = os.path.join(args.work, "teacher"), os.path.join(args.work, "runs")
    if not os.path.isdir(teacher):
        timed([*SELFSUP, "export", "--checkpoint", args.teacher_run, "--out", teacher], f"{args.work}/export.log")
    common = ["--data", f"{args.data}/train", "--storage", runs, "--num-cpus", str(args.num_cpus)]
    sets = [item for s in [f"hparams.teacher_weights={teacher}", f"optim.epochs={args.epochs}", *args.set]
            for item in ("--set", s)]
    distill_s, distilled = timed([*SELFSUP, "pretrain", "--method", "distill", "--name", f"distill-{args.epochs}ep",
                                  *common, *sets], f"{args.work}/distill.log")
    if distilled is None:
        raise SystemExit(f"distillation printed no JSON line: {args.work}/distill.log")
    simclr_s, _ = timed([*SELFSUP, "pretrain", "--method", "simclr", "--name", "simclr-same-clock", *common,
                         "--set", "optim.epochs=200"], f"{args.work}/simclr.log", budget_s=distill_s)
    rows = {"teacher": knn(args.teacher_run, args.data, f"{args.work}/eval-teacher.log"),
            "distilled student": knn(distilled["checkpoint"], args.data, f"{args.work}/eval-distill.log"),
            "SimCLR student": knn(os.path.join(runs, "simclr-same-clock"), args.data, f"{args.work}/eval-simclr.log")}
    simclr_steps = load_state(find_checkpoint(os.path.join(runs, "simclr-same-clock")))["progress"]["step"]
    print(json.dumps({"distill_s": round(distill_s, 1), "simclr_s": round(simclr_s, 1), "simclr_steps": simclr_steps,
                      "distill_steps": distilled["metrics"]["step"],
                      **{name: row["top1"] for name, row in rows.items()},
                      "random_init": rows["distilled student"].get("random_init_top1")}))
    teacher_top1 = rows["teacher"]["top1"]
    print("| encoder | training | kNN top-1 | of the teacher's |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        spent = {"teacher": "(its own run)", "distilled student": f"{distill_s:.0f} s, {args.epochs} epochs",
                 "SimCLR student": f"{simclr_s:.0f} s (stopped at the same clock), {simclr_steps} steps"}[name]
        print(f"| {name} | {spent} | {row['top1']:.3f} | {row['top1'] / teacher_top1:.0%} |")


if __name__ == "__main__":
    main()
