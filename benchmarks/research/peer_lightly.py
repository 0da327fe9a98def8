"""selfsup beside lightly at equal budget (issue 35): for each method, our pretraining run and
lightly's own recipe on the same shards, backbone, epochs and batch, both encoders scored by our
evaluation code on the same splits: kNN, linear probe, fine-tune with N labels per class (and,
with `--all-labels`, with every label), the same fine-tune from scratch, the random-init and
raw-pixel floors; minutes of pretraining and img/s.

lightly is installed by this script into a folder of its own (`pip install --target`, without
its dependencies: the modules used need only torch, torchvision and numpy, which are ours) and
imported from there in a process of its own (`lightly_side.py`); it is never a dependency of the
project. Its recipe per method is described in `lightly_side.py`.

Our side is `selfsup pretrain --method M` with the recipe of docs/BENCHMARKS.md ("Every method by
its own protocol on MNIST-M"), or an existing run given with `--ours M=RUN_FOLDER`; lightly's
run takes that run's config (backbone, canvas, epochs, batch) so the budget is equal by
construction.

    selfsup prepare sample:mnist-m --out data/mnist-m
    python -m benchmarks.research.peer_lightly --data data/mnist-m --methods simclr,mae,dino,byol
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIGHTLY = "lightly==1.6.0"

# Our recipes, as docs/BENCHMARKS.md records them (`--set`s on top of each method's default preset).
DEMO_VIEWS = [f"views.{view}.{key}={value}" for view in ("view1", "view2") for key, value in (
    ("flip", 0.0), ("scale", "[1.0,1.0]"), ("ratio", "[1.0,1.0]"), ("jitter", "[0.8,0.8,0.8,0.2]"),
    ("grayscale", 0.5), ("blur_sigma", "[0.1,1.0]"))]
OUR_RECIPES = {
    "simclr": [],
    "mae": ["optim.epochs=40", "optim.batch_size=64"],
    "dino": ["optim.epochs=15", "optim.batch_size=64", "optim.base_lr=5e-4"],
    "byol": ["optim.epochs=15", "optim.batch_size=64", "optim.min_lr=0.25", "backbone.kwargs.layers=[1,1,1,1]",
             *DEMO_VIEWS, "views.view1.blur=1.0", "views.view2.blur=0.1"],
}


def install_lightly(folder: str) -> str:
    """`folder` with lightly in it (installed once)."""
    if not os.path.isdir(os.path.join(folder, "lightly")):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", folder, "--no-deps", LIGHTLY],
                       check=True)
    return folder


def last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def run_logged(command: list[str], log: str, env: dict | None = None) -> tuple[str, float]:
    """(stdout, wall seconds) of `command`, its output also kept in `log`; fails loudly."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with open(log, "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode:
        sys.exit(f"peer_lightly: {' '.join(command[:6])} ... failed (exit {done.returncode}); see {log}")
    return done.stdout, seconds


def our_pretraining(method: str, data: str, workdir: str, reuse: str | None, num_cpus: int,
                    epochs: int | None, seed: int | None) -> dict:
    """Our run of `method`: {checkpoint, minutes, images_per_second}."""
    from pipelines.weights.checkpoint import find_checkpoint

    if reuse:
        with open(os.path.join(reuse, "metrics.jsonl")) as f:
            last = json.loads(f.read().splitlines()[-1])
        return {"checkpoint": find_checkpoint(reuse), "minutes": None, "images_per_second": last.get("images_per_s")}
    recipe = ["train.knn_every_epochs=0", *OUR_RECIPES[method], *([f"optim.epochs={epochs}"] if epochs else []),
              *([f"train.seed={seed}"] if seed is not None else [])]
    sets = [arg for value in recipe for arg in ("--set", value)]
    output, seconds = run_logged(
        [sys.executable, "-m", "pipelines.cli", "pretrain", "--method", method, "--data", f"{data}/train",
         "--storage", os.path.join(workdir, "runs"), "--name", f"selfsup-{method}", "--num-cpus", str(num_cpus),
         *sets], os.path.join(workdir, f"selfsup-{method}.log"))
    result = last_json(output)
    return {"checkpoint": result["checkpoint"], "minutes": round(seconds / 60, 1),
            "images_per_second": result["metrics"]["images_per_s"]}


def lightly_pretraining(config, data: str, workdir: str, lightly_folder: str) -> dict:
    """lightly's run of `config`'s method at its backbone, epochs and batch: {weights, minutes,
    images_per_second, ...}."""
    name = f"lightly-{config.method}"
    config_file = os.path.join(workdir, f"{name}.json")
    with open(config_file, "w") as f:
        json.dump(config.to_dict(), f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([lightly_folder, REPO])}
    output, seconds = run_logged(
        [sys.executable, "-m", "benchmarks.research.lightly_side", "--config", config_file, "--data", f"{data}/train",
         "--out", os.path.join(workdir, name)], os.path.join(workdir, f"{name}.log"), env)
    result = last_json(output)
    if not result["lightly_file"].startswith(os.path.abspath(lightly_folder)):
        sys.exit(f"peer_lightly: lightly came from {result['lightly_file']}, not {lightly_folder}")
    return {**result, "minutes": round(seconds / 60, 1)}


def score(method, config, weights: dict | None, data: str, workdir: str, name: str, labels_per_class: int,
          all_labels: bool, scratch: bool) -> dict:
    """Our evaluation of `method`'s encoder (with `weights` loaded, if given): kNN and linear (with
    the floors when `scratch`), fine-tunes (with scratch beside them when `scratch`)."""
    from pipelines.evaluate.frozen import evaluate_method
    from pipelines.images.labeled import labeled_subset
    from pipelines.train.finetune import finetune, plan_finetune

    if weights is not None:
        method.init_encoder(weights)
    encoder = {k: v.detach().cpu().clone() for k, v in method.encoder().state_dict().items()}
    frozen = evaluate_method(method, config, f"{data}/train", f"{data}/test", "knn", baselines=scratch,
                             also=("linear",))
    row = {"knn": frozen["top1"], "linear": frozen["linear"]["top1"]}
    if scratch:
        row.update(random_init=(frozen["random_init_top1"], frozen["linear"]["random_init_top1"]),
                   raw_pixels=(frozen["raw_pixels_top1"], frozen["linear"]["raw_pixels_top1"]))
    tunes = [(f"l{labels_per_class}", labels_per_class, {})] + ([("all", None, {"optim.epochs": 10})] if all_labels
                                                               else [])
    for key, per_class, sets in tunes:
        run = plan_finetune(config, labeled_subset(f"{data}/train", per_class, None), None, sets)
        tuned = finetune(run, f"{data}/test", encoder, scratch=scratch, storage=os.path.join(workdir, "runs"),
                         name=f"{name}-ft-{key}")
        row[f"finetune_{key}"] = tuned["top1"]
        if scratch:
            row[f"scratch_{key}"] = tuned["scratch_top1"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared sample: DATA/train and DATA/test, labeled")
    parser.add_argument("--methods", default="simclr,mae,dino,byol")
    parser.add_argument("--ours", action="append", default=[], metavar="METHOD=RUN_FOLDER",
                        help="score this existing run as our side instead of pretraining again")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs of both sides instead of the "
                        "recipe's (a smoke run: --epochs 1); not with --ours")
    parser.add_argument("--seed", type=int, default=None, help="both sides' initialisation and our run's and the "
                        "fine-tunes' seed (train.seed; lightly's run builds our backbone from our run's config), "
                        "for repeated runs; not with --ours")
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--all-labels", action="store_true", help="also fine-tune on every label (10 epochs)")
    parser.add_argument("--workdir", default="runs/peer-lightly")
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    methods = args.methods.split(",")
    reuse = dict(item.split("=", 1) for item in args.ours)
    unknown = sorted(set(methods) - set(OUR_RECIPES)) + sorted(set(reuse) - set(methods))
    if unknown:
        print(f"peer_lightly: {unknown[0]}: not one of --methods {args.methods} (known: {', '.join(OUR_RECIPES)})",
              file=sys.stderr)
        sys.exit(2)
    for option, value in (("--epochs", args.epochs), ("--seed", args.seed)):
        if value is not None and reuse:
            print(f"peer_lightly: {option}: an --ours run has its own; give one or the other", file=sys.stderr)
            sys.exit(2)
    os.makedirs(args.workdir, exist_ok=True)
    lightly_folder = install_lightly(os.path.abspath(os.path.join(args.workdir, "lightly-site")))

    import ray

    from methods.weights import fit_weights, read_weights
    from pipelines.cli import start_ray
    from pipelines.config import build_method
    from pipelines.weights.checkpoint import load_checkpoint

    rows = []
    for name in methods:
        ours = our_pretraining(name, args.data, args.workdir, reuse.get(name), args.num_cpus, args.epochs,
                               args.seed)
        method, config = load_checkpoint(ours["checkpoint"])
        theirs = lightly_pretraining(config, args.data, args.workdir, lightly_folder)
        start_ray(args.num_cpus)  # for scoring only: no idle Ray beside the next method's timed pretraining
        our_row = score(method, config, None, args.data, args.workdir, f"selfsup-{name}", args.labels_per_class,
                        args.all_labels, scratch=True)
        fresh = build_method(config)
        weights, _ = fit_weights(read_weights(theirs["weights"], "lightly's weights"), fresh.backbone,
                                 theirs["weights"], f"the run's {config.backbone.name} backbone",
                                 "the peer trained another architecture")
        their_row = score(fresh, config, weights, args.data, args.workdir, f"lightly-{name}", args.labels_per_class,
                          args.all_labels, scratch=False)
        for library, row, run in (("selfsup", our_row, ours), ("lightly", their_row, theirs)):
            rows.append({"method": name, "library": library, **row, "minutes": run["minutes"],
                         "images_per_second": run["images_per_second"], "epochs": config.optim.epochs,
                         "batch_size": config.optim.batch_size})
            print(json.dumps(rows[-1]), flush=True)
        ray.shutdown()
    print_table(rows, args.labels_per_class)


def print_table(rows: list[dict], labels_per_class: int) -> None:
    columns = ["knn", "linear", f"finetune_l{labels_per_class}", f"scratch_l{labels_per_class}", "finetune_all",
               "scratch_all", "raw_pixels", "random_init", "minutes", "images_per_second"]
    print("| method | library | " + " | ".join(columns) + " |")
    print("|---|---|" + "---:|" * len(columns))

    def cell(value, digits: int) -> str:
        if value is None:
            return "—"
        if isinstance(value, (tuple, list)):
            return " / ".join(cell(v, digits) for v in value)
        return f"{value:.{digits}f}"

    for row in rows:
        print(f"| {row['method']} | {row['library']} | "
              + " | ".join(cell(row.get(c), 1 if c in ("minutes", "images_per_second") else 3) for c in columns) + " |")


if __name__ == "__main__":
    main()
