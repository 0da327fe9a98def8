"""Does a label-free metric pick the trial that labels would pick? One `selfsup tune` search per
method on a prepared sample (ranked by the online kNN on its labeled test split, every trial
also reporting RankMe, alignment and uniformity on the unlabeled probe set), then the Spearman
rank correlation of each label-free metric with the trials' kNN, and whether the RankMe-best
trial is within 2 points of the kNN-best one. The searches double as the re-tuning of each
method's `tiny` preset (issue 14): their tables and best.yaml stay under `--work`.

    selfsup prepare sample:mnist-m --out data/mnist-m
    python -m benchmarks.research.label_free_study --data data/mnist-m --work runs/label-free \
        --picture docs/findings/label-free.png

A search that exists under `--work` is resumed (finished trials are kept), so the command can be
stopped and run again; `--report-only` reads the finished searches.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys

# Each search: the preset it starts from, its space, its length.
SEARCHES = {
    "simclr": {"preset": "demo", "epochs": 5,
               "space": ["temperature=loguniform(0.05, 1.0)", "batch_size=choice(32, 64, 128)",
                         "lr=loguniform(0.1, 1.0)"]},
    "mae": {"preset": "tiny", "epochs": 10,
            "space": ["mask_ratio=uniform(0.25, 0.9)", "batch_size=choice(64, 128, 256)",
                      "lr=loguniform(3e-4, 3e-3)"]},
    # DINO's multi-crop views run at ~20 img/s here: 2 epochs keep 8 trials near an hour.
    "dino": {"preset": "tiny", "epochs": 2,
             "space": ["teacher_temp=loguniform(0.02, 0.07)", "batch_size=choice(64, 128)",
                       "lr=loguniform(2e-4, 2e-3)"]},
}
# Signs that make "higher is better" for every metric: lower uniformity and alignment are better.
LABEL_FREE = {"rankme": 1, "uniformity": -1, "alignment": -1}


def search(method: str, data: str, work: str, samples: int) -> None:
    spec = SEARCHES[method]
    sets = {"optim.epochs": spec["epochs"]}
    command = [sys.executable, "-m", "pipelines.cli", "tune", "--method", method, "--preset", spec["preset"],
               "--data", f"{data}/train",
               "--val", f"{data}/test", "--samples", str(samples), "--scheduler", "fifo", "--max-concurrent", "1",
               "--storage", work, "--name", method,
               *[arg for dimension in spec["space"] for arg in ("--space", dimension)],
               *[arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]]
    print(" ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def trials(work: str, method: str) -> list[dict]:
    """The search's finished trials with their last kNN and label-free metrics: from its
    trials.csv, or, for a search stopped before it wrote one, from each trial's run history
    (the trials that reached their last epoch)."""
    path = os.path.join(work, method, "trials.csv")
    if os.path.exists(path):
        with open(path) as stream:
            rows = [r for r in csv.DictReader(stream) if r["status"] == "finished" and r.get("rankme")]
        return [{**r, **{k: float(r[k]) for k in ("knn_top1", *LABEL_FREE)}} for r in rows]
    from pipelines.train.tracking import read_history

    rows = []
    for trial in sorted(glob.glob(os.path.join(work, method, "train", "*"))):
        history = read_history(trial)
        if history and history[-1].get("step") == history[-1].get("total_steps") and "rankme" in history[-1]:
            rows.append({"trial_id": os.path.basename(trial), **{k: history[-1][k] for k in ("knn_top1", *LABEL_FREE)}})
    return rows


def study(rows: list[dict]) -> dict:
    knn = [r["knn_top1"] for r in rows]
    result = {"trials": len(rows), "knn_best": max(knn)}
    for metric, sign in LABEL_FREE.items():
        result[f"spearman_{metric}"] = spearman([sign * r[metric] for r in rows], knn)
    chosen = max(rows, key=lambda r: r["rankme"])
    result["knn_of_rankme_best"] = chosen["knn_top1"]
    result["rankme_best_within_2_points"] = max(knn) - chosen["knn_top1"] <= 0.02
    return result


def draw(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.5), squeeze=False)
    for axis, (method, rows) in zip(axes[0], results.items()):
        axis.scatter([r["rankme"] for r in rows], [r["knn_top1"] for r in rows])
        best = max(rows, key=lambda r: r["rankme"])
        axis.scatter([best["rankme"]], [best["knn_top1"]], marker="*", s=160, color="tab:red", label="RankMe-best")
        axis.set_title(f"{method}: Spearman {study(rows)['spearman_rankme']:+.2f}", fontsize=10)
        axis.set_xlabel("RankMe (probe set, no labels)")
        axis.set_ylabel("online kNN top-1")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared sample with train/ and test/ (labeled)")
    parser.add_argument("--work", default="runs/label-free")
    parser.add_argument("--methods", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--samples", type=int, default=8, help="trials per search")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--picture", help="PNG: RankMe against kNN, one panel per method")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    results = {}
    for method in args.methods:
        if not args.report_only:
            search(method, args.data, work, args.samples)
        rows = trials(work, method)
        if len(rows) >= 3:
            results[method] = rows
            print(json.dumps({"method": method, **study(rows)}), flush=True)
        else:
            print(json.dumps({"method": method, "trials": len(rows), "note": "fewer than 3 finished trials"}))
    print("| method | trials | Spearman RankMe | Spearman -uniformity | Spearman -alignment | kNN best | "
          "kNN of RankMe-best | within 2 points |\n|---|---|---|---|---|---|---|---|")
    for method, rows in results.items():
        s = study(rows)
        print(f"| {method} | {s['trials']} | {s['spearman_rankme']:+.2f} | {s['spearman_uniformity']:+.2f} | "
              f"{s['spearman_alignment']:+.2f} | {s['knn_best']:.3f} | {s['knn_of_rankme_best']:.3f} | "
              f"{'yes' if s['rankme_best_within_2_points'] else 'no'} |")
    if args.picture and results:
        draw(results, args.picture)


if __name__ == "__main__":
    main()
