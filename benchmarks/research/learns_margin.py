"""How far each method's "it learns" run (tests/helpers/runs.py `LEARNS`: a few epochs of its
`tiny` preset at 16 px on sample:digits, through the whole pipeline) beats its random-init
encoder, by kNN and linear probe, over several seeds: the margins `tests/test_learns.py` asserts
are chosen from these numbers (docs/BENCHMARKS.md, "Every method learns on the digits sample").

    python -m benchmarks.research.learns_margin --methods simclr,mae,dino,byol --seeds 0,1,2
    python -m benchmarks.research.learns_margin --methods distill --seeds 0,1,2

`distill` learns from SimCLR's seed-0 run exported as its teacher (tests/helpers/runs.py
`DISTILL_LEARNS`), trained first when the methods do not start with simclr.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from pipelines.cli import parse_sets, start_ray
from pipelines.config import with_sets
from pipelines.evaluate.frozen import evaluate_checkpoint
from pipelines.images.prepare import PrepareConfig, prepare
from pipelines.outputs.export import export_encoder
from pipelines.train.pretrain import pretrain
from tests.helpers.runs import LEARNS, distill_learns_config, learns_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(LEARNS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="on top of LEARNS (to explore)")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    start_ray(args.num_cpus)
    work = tempfile.mkdtemp(prefix="learns-")
    prepare("sample:digits", f"{work}/digits", PrepareConfig(shard_mb=0.02, row_group_mb=0.005))
    train, test = f"{work}/digits/train", f"{work}/digits/test"
    margins: dict[str, list[tuple[float, float]]] = {}
    teacher = None
    for method in args.methods.split(","):
        if method == "distill" and teacher is None:
            simclr = pretrain(learns_config("simclr", 0), train, storage=f"{work}/runs", name="simclr-teacher")
            teacher = export_encoder(simclr["checkpoint"], f"{work}/teacher")["out"]
        for seed in (int(s) for s in args.seeds.split(",")):
            config = distill_learns_config(teacher, seed) if method == "distill" else learns_config(method, seed)
            if args.set:
                config = with_sets(config.to_dict(), parse_sets(args.set))
            start = time.perf_counter()
            run = pretrain(config, train, storage=f"{work}/runs", name=f"{method}-{seed}")
            seconds = time.perf_counter() - start
            knn = evaluate_checkpoint(run["checkpoint"], train, test, "knn", also=("linear",))
            linear = knn.pop("linear")
            margin = (knn["top1"] - knn["random_init_top1"], linear["top1"] - linear["random_init_top1"])
            margins.setdefault(method, []).append(margin)
            print(json.dumps({"method": method, "seed": seed, "pretrain_s": round(seconds, 1),
                              "knn": [knn["top1"], knn["random_init_top1"]],
                              "linear": [round(linear["top1"], 3), round(linear["random_init_top1"], 3)],
                              "margin": [round(m, 3) for m in margin],
                              **{key: run["metrics"].get(key) for key in ("rankme", "collapsed")}}), flush=True)
    print("| method | judged by | kNN margin (min, runs) | linear margin (min, runs) |")
    print("|---|---|---|---|")
    for method, runs in margins.items():
        cells = [f"{min(r[i] for r in runs):+.3f} ({', '.join(f'{r[i]:+.3f}' for r in runs)})" for i in (0, 1)]
        print(f"| {method} | {LEARNS[method][0] if method in LEARNS else '-'} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
