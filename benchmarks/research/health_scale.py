"""What a method's healthy runs show: the embedding spread (`embedding_std`) and the probe's
RankMe fraction at each run's last report, per method, over the runs of the label-free searches
(benchmarks/research/label_free_study.py's `--work` folders), with the median a method's
`HealthScale` declares and where each run sits against it. Also reads single runs (e.g. the
collapsed and the merely weak runs of docs/BENCHMARKS.md, "Label-free metrics") to check the
collapse threshold against them.

    python -m benchmarks.research.health_scale simclr=runs/label-free-third/simclr \
        simclr=runs/label-free-fourth/simclr byol=runs/label-free-digits/byol dino=runs/label-free-digits/dino \
        mae=runs/label-free-digits/mae
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

from methods import METHODS
from pipelines.evaluate.label_free import COLLAPSE_OF_HEALTHY


def last_values(path: str) -> dict[str, float]:
    """The last reported `embedding_std` and `rankme_fraction` of one run's metrics.jsonl, and its last kNN."""
    values = {}
    with open(path) as lines:
        for line in lines:
            row = json.loads(line)
            values.update({k: row[k] for k in ("embedding_std", "rankme_fraction", "knn_top1") if k in row})
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="METHOD=FOLDER",
                        help="a method and a folder holding its runs' metrics.jsonl (searched recursively)")
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[str, dict]]] = {}
    for item in args.runs:
        method, _, folder = item.partition("=")
        paths = sorted(glob.glob(os.path.join(folder, "**", "metrics.jsonl"), recursive=True))
        if method not in METHODS or not paths:
            parser.error(f"{item}: expected METHOD=FOLDER, a method of {sorted(METHODS)} and a folder with "
                         "metrics.jsonl")
        runs.setdefault(method, []).extend((os.path.relpath(os.path.dirname(p), folder), last_values(p)) for p in paths)
    print("| method | runs | embedding_std: median (range) | rankme_fraction: median (range) | declared | "
          f"runs under {COLLAPSE_OF_HEALTHY} of the declared rank |")
    print("|---|---:|---|---|---|---:|")
    for method, rows in runs.items():
        spread = [values["embedding_std"] for _, values in rows]
        rank = [values["rankme_fraction"] for _, values in rows if "rankme_fraction" in values]
        declared = METHODS[method].health
        flagged = sum(value < COLLAPSE_OF_HEALTHY * declared.rankme_fraction for value in rank)
        print(f"| {method} | {len(rows)} | {statistics.median(spread):.3f} ({min(spread):.3f}–{max(spread):.3f}) | "
              f"{statistics.median(rank):.4f} ({min(rank):.4f}–{max(rank):.4f}) | "
              f"{declared.embedding_std:g}, {declared.rankme_fraction:g} | {flagged} |")
    for method, rows in runs.items():
        declared = METHODS[method].health
        for name, values in rows:
            rank, knn = values.get("rankme_fraction", float("nan")), values.get("knn_top1", float("nan"))
            print(f"{method} {name}: spread {values['embedding_std'] / declared.embedding_std:.2f} of healthy, "
                  f"rank {rank / declared.rankme_fraction:.2f} of healthy, kNN {knn:.3f}")


if __name__ == "__main__":
    main()
