"""Does a label-free metric pick the trial that labels would pick? One `selfsup tune` search per
method on a prepared sample (ranked by the online kNN on its labeled test split, every trial
also reporting RankMe, LiDAR, alpha-ReQ, alignment and uniformity on the unlabeled probe set),
then each metric's Spearman and Kendall rank correlation with the trials' kNN, the kNN of the
trial each metric would pick, and how often two trials' metric order agrees with their kNN order
by how far apart their metric values are (which sets when `selfsup tune` warns that its trials
are too close to separate).

    selfsup prepare sample:mnist-m --out data/mnist-m
    python -m benchmarks.research.label_free_study --data data/mnist-m --methods simclr \
        --work runs/label-free --picture docs/findings/label_free.png
    selfsup prepare sample:digits --out data/digits
    python -m benchmarks.research.label_free_study --data data/digits --methods byol dino mae \
        --work runs/label-free-digits

SimCLR's search runs on MNIST-M with the demo's recipe; BYOL, DINO and MAE on the digits sample
with their "it learns" runs (tests/helpers/runs.py, LEARNS), where their trials differ. A search
that exists under `--work` is resumed (finished trials are kept), so the command can be stopped
and run again; `--report-only` reads the finished searches, and with `--pool` the trials of kept
`trials.csv` files as one set:

    python -m benchmarks.research.label_free_study --data data/digits --methods byol --report-only \
        --pool docs/findings/label_free_digits_byol.csv docs/findings/label_free_digits_byol_heldout.csv
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys

from pipelines.evaluate.label_free import ALPHA_BAND_CENTRE
from tests.helpers.runs import learns_sets

# Each search: the preset it starts from, its --sets, its space.
SEARCHES = {
    "simclr": {"preset": "demo", "sets": {"optim.epochs": 5, "train.knn_every_epochs": 0},
               "space": ["temperature=loguniform(0.05, 1.0)", "batch_size=choice(32, 64, 128)",
                         "lr=loguniform(0.1, 1.0)"]},
    "byol": {"preset": "tiny", "sets": learns_sets("byol"),
             "space": ["lr=loguniform(0.1, 3.0)", "hparams.target_momentum=uniform(0.9, 0.999)"]},
    "mae": {"preset": "tiny", "sets": learns_sets("mae"),
            "space": ["mask_ratio=uniform(0.25, 0.9)", "lr=loguniform(1e-3, 2e-2)"]},
    "dino": {"preset": "tiny", "sets": learns_sets("dino"),
             "space": ["teacher_temp=loguniform(0.02, 0.07)", "lr=loguniform(2e-4, 2e-3)",
                       "hparams.koleo_weight=uniform(0.0, 1.0)"]},
}
# Each label-free score, signed so that higher should mean better: the ranks grow with quality,
# alignment and uniformity fall with it, alpha-ReQ's good encoders sit near alpha = 1 (the
# paper's band: -alpha_req_gap), and plain alpha is read both ways in the table by its sign.
SCORES = {
    "rankme": lambda r: r["rankme"],
    "lidar": lambda r: r["lidar"],
    "alpha_req": lambda r: r["alpha_req"],
    "-alpha_req_gap": lambda r: -abs(r["alpha_req"] - ALPHA_BAND_CENTRE),
    "-alignment": lambda r: -r["alignment"],
    "-uniformity": lambda r: -r["uniformity"],
}
REPORTED = ("knn_top1", "rankme", "lidar", "alpha_req", "alignment", "uniformity")
# Gaps between two trials' metric values, as fractions of the metric's range over the trials, at
# which their order is read against the kNN's (`selfsup tune`'s TOO_CLOSE is such a fraction).
GAP_EDGES = (0.0, 0.05, 0.1, 0.2, 0.5, 1.01)


def search(method: str, data: str, work: str, samples: int) -> None:
    spec = SEARCHES[method]
    command = [sys.executable, "-m", "pipelines.cli", "tune", "--method", method, "--preset", spec["preset"],
               "--data", f"{data}/train", "--val", f"{data}/test", "--samples", str(samples), "--scheduler", "fifo",
               "--max-concurrent", "1", "--storage", work, "--name", method,
               *[arg for dimension in spec["space"] for arg in ("--space", dimension)],
               *[arg for key, value in spec["sets"].items() for arg in ("--set", f"{key}={json.dumps(value)}")]]
    print(" ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def trials(work: str, method: str) -> list[dict]:
    """The search's finished trials with their last kNN and label-free metrics: from its
    trials.csv, or, for a search stopped before it wrote one, from each trial's run history
    (the trials that reached their last epoch)."""
    path = os.path.join(work, method, "trials.csv")
    if os.path.exists(path):
        return csv_trials(path)
    from pipelines.train.tracking import read_history

    rows = []
    for trial in sorted(glob.glob(os.path.join(work, method, "train", "*"))):
        history = read_history(trial)
        if history and history[-1].get("step") == history[-1].get("total_steps") and "lidar" in history[-1]:
            rows.append({"trial_id": os.path.basename(trial), **{k: history[-1][k] for k in REPORTED}})
    return rows


def csv_trials(path: str) -> list[dict]:
    """The finished trials of a search's trials.csv (or a copy kept in docs/findings/)."""
    with open(path) as stream:
        rows = [r for r in csv.DictReader(stream) if r["status"] == "finished" and r.get("lidar")]
    return [{**r, **{k: float(r[k]) for k in REPORTED}} for r in rows]


def concordance_by_gap(values: list[float], knn: list[float]) -> list[tuple[float, float, int, float]]:
    """For each band of GAP_EDGES: (low, high, pairs, share of the pairs of trials whose metric
    order is their kNN order), the gap being |a - b| over the range of `values`."""
    bands, spread = [], max(max(values) - min(values), 1e-12)
    for low, high in zip(GAP_EDGES, GAP_EDGES[1:]):
        agree = total = 0
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                gap = abs(values[i] - values[j]) / spread
                if low <= gap < high and knn[i] != knn[j]:
                    total += 1
                    agree += (values[i] - values[j]) * (knn[i] - knn[j]) > 0
        bands.append((low, high, total, agree / total if total else float("nan")))
    return bands


def study(rows: list[dict]) -> dict:
    from scipy.stats import kendalltau, spearmanr

    knn = [r["knn_top1"] for r in rows]
    result = {"trials": len(rows), "knn_best": max(knn), "knn_worst": min(knn), "metrics": {}}
    for name, score in SCORES.items():
        values = [score(r) for r in rows]
        chosen = max(range(len(rows)), key=lambda i: values[i])
        result["metrics"][name] = {
            "spearman": float(spearmanr(values, knn).statistic),
            "kendall": float(kendalltau(values, knn).statistic),
            "knn_of_best": knn[chosen],
            "within_2_points": max(knn) - knn[chosen] <= 0.02,
            "concordance_by_gap": concordance_by_gap(values, knn),
        }
    return result


def draw(results: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("rankme", "lidar", "alpha_req", "alignment")
    figure, axes = plt.subplots(len(results), len(shown), figsize=(3.6 * len(shown), 3.2 * len(results)),
                                squeeze=False)
    for row_axes, (method, rows) in zip(axes, results.items()):
        summary = study(rows)["metrics"]
        for axis, metric in zip(row_axes, shown):
            axis.scatter([r[metric] for r in rows], [r["knn_top1"] for r in rows], s=18)
            signed = metric if metric in summary else f"-{metric}"
            axis.set_title(f"{method}: {metric}, Spearman {summary[signed]['spearman']:+.2f}", fontsize=9)
            axis.set_xlabel(f"{metric} (probe set, no labels)", fontsize=8)
            axis.set_ylabel("online kNN top-1", fontsize=8)
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a prepared sample with train/ and test/ (labeled)")
    parser.add_argument("--work", default="runs/label-free")
    parser.add_argument("--methods", nargs="+", default=["simclr"], choices=list(SEARCHES))
    parser.add_argument("--samples", type=int, default=12, help="trials per search")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--picture", help="PNG: each label-free metric against kNN, one row per method")
    parser.add_argument("--pool", nargs="+", metavar="CSV",
                        help="with --report-only and one method: the study of these trials.csv files as one set")
    args = parser.parse_args()
    if args.pool and not (args.report_only and len(args.methods) == 1):
        parser.error("--pool reads kept trials only: give --report-only and one --methods")
    work = os.path.abspath(args.work)
    results = {}
    for method in args.methods:
        if not args.report_only:
            search(method, args.data, work, args.samples)
        rows = [row for path in args.pool for row in csv_trials(path)] if args.pool else trials(work, method)
        if len(rows) >= 3:
            results[method] = rows
            print(json.dumps({"method": method, **study(rows)}), flush=True)
        else:
            print(json.dumps({"method": method, "trials": len(rows), "note": "fewer than 3 finished trials"}))
    print("| method | trials | kNN span | metric | Spearman | Kendall | kNN of its best | within 2 points |\n"
          "|---|---:|---|---|---:|---:|---:|---|")
    for method, rows in results.items():
        summary = study(rows)
        for name, m in summary["metrics"].items():
            print(f"| {method} | {summary['trials']} | {summary['knn_worst']:.3f}-{summary['knn_best']:.3f} | {name} | "
                  f"{m['spearman']:+.2f} | {m['kendall']:+.2f} | {m['knn_of_best']:.3f} | "
                  f"{'yes' if m['within_2_points'] else 'no'} |")
    print("\n| method | metric | " + " | ".join(f"gap {lo:g}-{min(hi, 1):g} of the range"
                                            for lo, hi in zip(GAP_EDGES, GAP_EDGES[1:]))
          + " |\n|---|---|" + "---|" * (len(GAP_EDGES) - 1))
    for method, rows in results.items():
        for name, m in study(rows)["metrics"].items():
            cells = [f"{share:.2f} of {pairs}" if pairs else "-" for _, _, pairs, share in m["concordance_by_gap"]]
            print(f"| {method} | {name} | " + " | ".join(cells) + " |")
    if args.picture and results:
        draw(results, args.picture)


if __name__ == "__main__":
    main()
