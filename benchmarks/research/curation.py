"""Issue 33's measurements of `selfsup curate` on a sample with injected duplicates and one class ten
times as frequent (tests/helpers/curation_sample.py), printed as tables for docs/BENCHMARKS.md.

    # duplicates found (pairs found, pair precision and recall against the injection record, recall
    # per kind) at each threshold, then class frequencies before and after the last one:
    python -m benchmarks.research.curation quality (--checkpoint RUN | --init-from WEIGHTS) --work DIR
        [--sample mnist-m] [--threshold 0.9,0.95,0.97] [--match 0.93|off] [--clusters 30,10] [--target 300]
    # peak memory of curating the sample and 10x the sample (repeated with augmentation):
    python -m benchmarks.research.curation memory --checkpoint RUN --work DIR --repeats 1,10
    # the pixel match (curate.match) of every true pair against each image's 6 nearest others by
    # pixel correlation (the hardest negatives), and the pairs passing each --match:
    python -m benchmarks.research.curation separation [--sample mnist-m]
    # the same with each crop resized by Kornia's crop_and_resize instead of curate's affine grid:
    python -m benchmarks.research.curation separation --resize kornia
    # flat k-means over a `quality` run's embeddings: purity, and how many clusters each class
    # leads; then the classes of curate's draw of --target over each tree of --levels, 3 seeds:
    python -m benchmarks.research.curation purity --work DIR [--clusters 10,100] [--levels 10/30,10/100,30,10]
    # what any top level over first-level clusters could reach on a `quality` run's embeddings (the
    # clusters grouped by their majority class, with labels), and the label-free top levels tried
    # beside curate's tree (Vo et al.'s resampling steps, k-center seeds, inverse-density draws):
    python -m benchmarks.research.curation bound --work DIR [--clusters 30,100,200] [--target 300]
    # SimCLR (demo recipe) on the curated shards vs the uncurated ones, equal steps, kNN on the
    # balanced test split (run `quality` first: it writes both):
    python -m benchmarks.research.curation compare --work DIR --labeled PREPARED_SAMPLE [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from kornia.geometry.transform import crop_and_resize

from benchmarks.performance.ingest_memory import peak_during
from pipelines.curate import match as pixel_match
from pipelines.curate.balance import assign_and_select, cluster_levels, hierarchical_shares
from pipelines.curate.duplicates import Embeddings, centroid_index, id_rank, nearest, spherical_kmeans, unit_vectors
from pipelines.curate.match import match_scores
from pipelines.images.shards import parquet_files
from tests.helpers.curation_sample import (
    KINDS,
    curation_sample,
    found_pairs,
    look_alikes,
    thumbnails_of,
    true_pairs,
)


def build(sample: str, folder: str, repeats: int = 1) -> list:
    """The curation sample in 4 shards under `folder` (kept when already there); its record."""
    record_file = os.path.join(folder, "record.json")
    if not os.path.exists(record_file):
        table, record = curation_sample(sample, repeats=repeats)
        os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
        step = -(-len(table) // 4)
        for part in range(4):
            pq.write_table(table.slice(part * step, step), os.path.join(folder, "shards", f"part-{part}.parquet"))
        with open(record_file, "w") as stream:
            json.dump(record, stream)
    with open(record_file) as stream:
        return [tuple(row) for row in json.load(stream)]


def encoder(args) -> list[str]:
    """curate's options naming the encoder: `--checkpoint RUN`, or `--init-from WEIGHTS --method simclr`."""
    if args.checkpoint:
        return ["--checkpoint", args.checkpoint]
    return ["--init-from", args.init_from, "--method", "simclr"]


def curate_cli(data: str, out: str, encoder_options: list[str], *options: str) -> dict:
    """`selfsup curate` in a process of its own; its JSON line."""
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "curate", "--data", data, *encoder_options,
                           "--out", out, *options], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def class_counts(location: str) -> np.ndarray:
    return np.bincount(pq.read_table(location, columns=["label"]).column("label").to_numpy(), minlength=10)


def quality(args) -> None:
    record = build(args.sample, args.work)
    shards, curated = os.path.join(args.work, "shards"), os.path.join(args.work, "curated")
    truth = true_pairs(record)
    for threshold in args.threshold.split(","):  # the last one's curated shards are kept; embedded once
        options = ["--threshold", threshold, "--match", args.match, "--clusters", args.clusters, "--num-cpus", "2"]
        result = curate_cli(shards, curated, encoder(args), *options, *(["--target", str(args.target)]
                                                                         if args.target else []))
        found = found_pairs(pq.read_table(os.path.join(curated, "curation", "duplicates.parquet")))
        recall = {kind: len(pairs & found) / len(pairs) for kind in KINDS
                  for pairs in [{tuple(sorted((copy, source))) for copy, source, k in record if k == kind}]}
        print(f"| {threshold} | {args.match} | {len(found)} | {len(truth & found) / max(1, len(found)):.3f} | "
              f"{len(truth & found) / len(truth):.3f} | " + " | ".join(f"{recall[k]:.2f}" for k in KINDS) + " |",
              flush=True)
    before, after = class_counts(os.path.join(args.work, "shards")), class_counts(result["out"])
    for name, counts in (("before", before), ("after", after)):
        print(f"| classes {name} | {' '.join(map(str, counts))} | max/min {counts.max() / max(1, counts.min()):.2f} |")
    keys = ("rows", "removed_exact", "removed_near", "left_after_duplicates", "selected", "top_clusters_before",
            "top_clusters_after", "seconds")
    print(json.dumps({key: result[key] for key in keys}))


def memory(args) -> None:
    for repeats in (int(r) for r in args.repeats.split(",")):
        folder = os.path.join(args.work, f"x{repeats}")
        build(args.sample, folder, repeats)
        rows = pq.read_metadata(os.path.join(folder, "shards", "part-0.parquet")).num_rows * 4
        options = ["--clusters", args.clusters, "--partition-rows", str(args.partition_rows), "--num-cpus", "2",
                   "--overwrite"]
        out = os.path.join(folder, f"curated-{os.getpid()}")

        def run():
            return curate_cli(os.path.join(folder, "shards"), out, encoder(args), *options)

        (peak, processes, _), result = peak_during(run)
        print(f"| x{repeats} | ~{rows:,} images | {result['left_after_duplicates']:,} left | peak PSS {peak:,.0f} MB "
              f"over {processes} processes (this script, the curate process and its Ray) | {result['seconds']:.0f} s |",
              flush=True)


def kornia_crops_compared(source: torch.Tensor, target: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """`match.crops_compared` by Kornia's `crop_and_resize`: the crop's span (its pixels' edges)
    as the box Kornia takes (its first and last output pixels' centres, in input pixel centres)."""
    pairs, count, side = source.shape[0], crops.shape[1], source.shape[-1]
    x, y, w, h = crops.unbind(-1)
    left, top = x + 0.5 * w / side - 0.5, y + 0.5 * h / side - 0.5
    right, bottom = x + (side - 0.5) * w / side - 0.5, y + (side - 0.5) * h / side - 0.5
    corners = [(left, top), (right, top), (right, bottom), (left, bottom)]
    boxes = torch.stack([torch.stack(corner, dim=-1) for corner in corners], dim=-2).view(-1, 4, 2)
    resized = crop_and_resize(source.repeat_interleave(count, dim=0), boxes, (side, side), mode="bilinear",
                              padding_mode="border", align_corners=True)
    return pixel_match.correlation(resized.view(pairs, count, side * side), target.view(pairs, 1, side * side))


def separation(args) -> None:
    if args.resize == "kornia":
        pixel_match.crops_compared = kornia_crops_compared
    table, record = curation_sample(args.sample)
    thumbs = thumbnails_of(table.column("image").to_pylist())
    positive, negative = look_alikes(thumbs, sorted(true_pairs(record)), table.column("id").to_pylist())
    torch.set_num_threads(1)  # as in a partition's task
    started = time.perf_counter()
    scores = {name: match_scores(thumbs[[a for a, _ in pairs]], thumbs[[b for _, b in pairs]])
              for name, pairs in (("true", positive), ("hard negative", negative))}
    per_pair = (time.perf_counter() - started) / (len(positive) + len(negative))
    print(f"{args.sample}: {len(positive)} true pairs, lowest match {scores['true'].min():.3f}; {len(negative)} hard "
          f"negatives, highest {scores['hard negative'].max():.3f}; {per_pair * 1000:.1f} ms a pair on one thread")
    for match in (0.9, 0.93, 0.95, 0.97, 0.98):
        print(f"| {match} | {(scores['true'] >= match).mean():.3f} | {(scores['hard negative'] >= match).sum()} |")


def run_embeddings(work: str) -> tuple[pa.Table, Embeddings, frozenset]:
    """A `quality` run's embeddings (the table and, centred, the files) and the ids it removed as
    duplicates."""
    filesystem, files = parquet_files(os.path.join(work, "curated", "curation", "embeddings"))
    # in id order: the files' order is the order Ray Data's tasks finished in
    table = pa.concat_tables([pq.read_table(path, filesystem=filesystem) for path in files]).sort_by("id")
    embeddings = Embeddings(filesystem, files, table.num_rows, table.schema.field("embedding").type.list_size)
    groups = pq.read_table(os.path.join(work, "curated", "curation", "duplicates.parquet"))
    reasons = zip(groups.column("id").to_pylist(), groups.column("reason").to_pylist())
    return table, embeddings.with_center(4096), frozenset(item for item, reason in reasons if reason != "kept")


def purity(args) -> None:
    table, embeddings, removed = run_embeddings(args.work)
    vectors, labels = unit_vectors(table, embeddings.center), table.column("label").to_numpy()
    for count in (int(c) for c in args.clusters.split(",")):
        cluster = nearest(vectors, centroid_index(spherical_kmeans(vectors, count, 0)))[:, 0]
        per_cluster = [np.bincount(labels[cluster == c], minlength=10) for c in np.unique(cluster)]
        leads = np.bincount([counts.argmax() for counts in per_cluster], minlength=10)
        print(f"| {count} | {sum(c.max() for c in per_cluster) / len(labels):.3f} | {' '.join(map(str, leads))} |")
    label_of = dict(zip(table.column("id").to_pylist(), labels.tolist()))
    for tree in args.levels.split("/"):
        ratios = []
        for seed in range(3):
            levels = cluster_levels(embeddings, tuple(int(c) for c in tree.split(",")), seed, removed, 4096)
            chosen = assign_and_select(embeddings, levels, args.target, seed, removed, args.work, 4096)[0]
            counts = np.bincount([label_of[item] for item in chosen], minlength=10)
            ratios.append(f"{counts.max() / max(1, counts.min()):.1f}")
        print(f"| {tree} | {' '.join(ratios)} |")


def drawn_ratio(first_level: np.ndarray, top_of: np.ndarray, labels: np.ndarray, ids: list[str], target: int,
                seed: int) -> float:
    """max/min of the classes curate's draw takes: `target` even over the top clusters (`top_of`:
    each first-level cluster's), then over their first-level clusters, lowest `id_rank`s."""
    shares = hierarchical_shares(np.bincount(first_level, minlength=len(top_of)), [top_of], target)
    chosen = [row for cluster, share in enumerate(shares) for row in sorted(
        np.flatnonzero(first_level == cluster), key=lambda row: id_rank(ids[row], seed))[:share]]
    counts = np.bincount(labels[chosen], minlength=10)
    return counts.max() / max(1, counts.min())


def resampled_kmeans(points: np.ndarray, k: int, seed: int, steps: int = 10) -> np.ndarray:
    """Vo et al.'s resampling-clustering steps: k-means, then each centroid moved `steps` times to
    the mean of the half of its cluster nearest it (the same number from every cluster)."""
    centroids = spherical_kmeans(points, k, seed)
    for _ in range(steps):
        cluster = nearest(points, centroid_index(centroids))[:, 0]
        similarity, keep = (points * centroids[cluster]).sum(axis=1), max(1, len(points) // k // 2)
        for c in np.unique(cluster):
            members = np.flatnonzero(cluster == c)
            mean = points[members[np.argsort(-similarity[members])[:keep]]].mean(axis=0)
            centroids[c] = mean / np.linalg.norm(mean)
    return centroids


def k_center(points: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Greedy k-center (each next point the farthest from those taken): seeds spread over the
    support whatever its density."""
    taken = [int(np.random.default_rng(seed).integers(len(points)))]
    distance = 1 - points @ points[taken[0]]
    while len(taken) < count:
        taken.append(int(distance.argmax()))
        distance = np.minimum(distance, 1 - points @ points[taken[-1]])
    return points[taken]


def bound(args) -> None:
    table, embeddings, removed = run_embeddings(args.work)
    every_id = table.column("id").to_pylist()
    keep = np.array([item not in removed for item in every_id])
    vectors, labels = unit_vectors(table, embeddings.center)[keep], table.column("label").to_numpy()[keep]
    ids = [item for item, kept in zip(every_id, keep) if kept]
    print(f"{len(ids)} images left after duplicates; classes {' '.join(map(str, np.bincount(labels)))}")
    rows = {}
    for count in (int(c) for c in args.clusters.split(",")):
        for seed in range(3):
            first_level = nearest(vectors, centroid_index(spherical_kmeans(vectors, count, seed)))[:, 0]
            majority = np.array([np.bincount(labels[first_level == c], minlength=10).argmax()
                                 if (first_level == c).any() else 0 for c in range(count)])
            rows.setdefault(f"{count} clusters grouped by their majority class (labels)", []).append(
                drawn_ratio(first_level, majority, labels, ids, args.target, seed))
    for seed in range(3):  # label-free: first-level centroids, then a top level of 10 over them
        for name, first, resampled in (
                ("tree 30,10 (curate's)", spherical_kmeans(vectors, 30, seed), False),
                ("tree 30,10, Vo et al.'s resampling at each level", resampled_kmeans(vectors, 30, seed), True),
                ("100 k-center seeds, k-means 10 over them", k_center(vectors, 100, seed), False)):
            top = (resampled_kmeans if resampled else spherical_kmeans)(first, 10, seed + 1)
            top_of = nearest(first, centroid_index(top))[:, 0]
            first_level = nearest(vectors, centroid_index(first))[:, 0]
            rows.setdefault(name, []).append(drawn_ratio(first_level, top_of, labels, ids, args.target, seed))
        similarity = centroid_index(vectors).search(vectors, 21)[0][:, 20]  # the 20th neighbour (1st: itself)
        weight = np.maximum(0, 2 - 2 * similarity) ** 8  # the distance^16: sparse regions drawn more
        # a weighted draw without replacement (Efraimidis-Spirakis: the largest u^(1/w)), in logs
        keys = np.log(np.random.default_rng(seed).random(len(ids))) / np.maximum(weight, 1e-300)
        counts = np.bincount(labels[np.argsort(-keys)[:args.target]], minlength=10)
        rows.setdefault("drawn by inverse density (20th neighbour's distance^16)", []).append(
            counts.max() / max(1, counts.min()))
    for name, ratios in rows.items():
        print(f"| {name} | {' '.join(f'{r:.1f}' for r in ratios)} |")


def compare(args) -> None:
    from benchmarks.research.distill_vs_simclr import knn  # `selfsup eval knn`, its JSON line

    rows = {}
    for name, data in (("uncurated", os.path.join(args.work, "shards")),
                       ("curated", os.path.join(args.work, "curated", "shards"))):
        images = int(class_counts(data).sum())
        epochs = max(1, round(args.steps * 64 / images))
        run = os.path.join(args.work, "runs", name)
        if not os.path.exists(run):
            subprocess.run([sys.executable, "-m", "pipelines.cli", "pretrain", "--method", "simclr", "--data", data,
                            "--storage", os.path.join(args.work, "runs"), "--name", name, "--set",
                            f"optim.epochs={epochs}", "--set", f"train.seed={args.seed}", "--num-cpus", "2",
                            # no evaluation each epoch: on 300 images that is most of the run's time
                            "--set", "train.knn_every_epochs=0", "--set", "train.probe_size=0"],
                           check=True, capture_output=True)
        with open(os.path.join(run, "metrics.jsonl")) as stream:
            steps = json.loads(stream.read().strip().splitlines()[-1])["step"]
        top1 = knn(run, args.labeled, os.path.join(args.work, f"eval-{name}.log"))["top1"]
        rows[name] = (images, epochs, steps, top1)
        print(f"| {name} | {images} images | {epochs} epochs | {steps} steps | kNN {rows[name][3]:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("quality", "memory", "compare", "separation", "purity", "bound"):
        command = commands.add_parser(name)
        command.add_argument("--work", required=name != "separation")
        command.add_argument("--sample", default="mnist-m")
        command.add_argument("--clusters", default={"purity": "10,100", "bound": "30,100,200"}.get(name, "30,10"))
        if name in ("quality", "memory"):
            named = command.add_mutually_exclusive_group(required=True)
            named.add_argument("--checkpoint", help="a pretraining run (its newest checkpoint)")
            named.add_argument("--init-from", help="a SimCLR ResNet's weights (`selfsup export`, or a classifier "
                                                   "`selfsup finetune --out` wrote)")
    commands.choices["quality"].add_argument("--threshold", default="0.9", help="one, or several: 0.9,0.95,0.97")
    commands.choices["quality"].add_argument("--match", default="0.93", help="curate's --match (or 'off')")
    commands.choices["quality"].add_argument("--target", type=int, default=300)
    commands.choices["purity"].add_argument("--levels", default="10/30,10/100,10/100,30,10/200,50,10")
    for name in ("purity", "bound"):
        commands.choices[name].add_argument("--target", type=int, default=300)
    commands.choices["separation"].add_argument("--resize", choices=("grid", "kornia"), default="grid",
                                                help="how a crop is resized: curate's affine grid, or Kornia's")
    commands.choices["memory"].add_argument("--repeats", default="1,10")
    commands.choices["memory"].add_argument("--partition-rows", type=int, default=2000)
    commands.choices["compare"].add_argument(
        "--labeled", required=True, help="`selfsup prepare sample:NAME` output: kNN bank train/, scored on test/")
    commands.choices["compare"].add_argument("--steps", type=int, default=600)
    commands.choices["compare"].add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"quality": quality, "memory": memory, "compare": compare, "separation": separation,
     "purity": purity, "bound": bound}[args.command](args)


if __name__ == "__main__":
    main()
