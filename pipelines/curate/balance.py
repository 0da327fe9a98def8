"""Concept balancing (Vo et al., "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach", 2024): hierarchical k-means over the embeddings, then a target number
of images sampled evenly over the top-level clusters, each cluster's share split evenly over its
children, down to the first level's clusters, where images are drawn at random (seeded).

Level 1 clusters the images (k-means trained on a sample, `id_sample`, of at most
POINTS_PER_CENTROID images per centroid), level 2 clusters level 1's centroids, and so on: a
concept that fills many fine clusters still gets one top-level share. Every pass over the
images streams their embeddings; memory holds the sample, the centroids and the target's ids.
"""

from __future__ import annotations

import heapq

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.curate.duplicates import (
    POINTS_PER_CENTROID,
    Embeddings,
    centroid_index,
    id_rank,
    id_sample,
    nearest,
    spherical_kmeans,
)
from pipelines.images.shards import resolve_location
from pipelines.outputs.embed import EMBEDDING

CLUSTERS_FILE = "clusters.parquet"


def cluster_levels(embeddings: Embeddings, counts: tuple[int, ...], seed: int, removed: frozenset,
                   batch_rows: int) -> list[np.ndarray]:
    """The centroids of each level, first (finest) to top: level 1 over a sample of the images not
    in `removed`, each next level over the centroids of the one before."""
    points = id_sample(embeddings, counts[0] * POINTS_PER_CENTROID, batch_rows, skip=removed)
    levels = []
    for level, count in enumerate(counts):
        points = spherical_kmeans(points, min(count, len(points)), seed + level)
        levels.append(points)
    return levels


def parents(levels: list[np.ndarray]) -> list[np.ndarray]:
    """For each level but the top, each of its centroids' cluster at the level above."""
    return [nearest(below, centroid_index(above))[:, 0] for below, above in zip(levels, levels[1:])]


def even_shares(sizes: list[int], target: int) -> list[int]:
    """`target` split as evenly as the sizes allow: no share over its size, the rest filled evenly
    (water-filling); when the target is at most the total, the shares sum to it. The share left
    over by an even split goes to the largest groups first (then the lowest index)."""
    shares, left = [0] * len(sizes), min(target, sum(sizes))
    open_groups = sorted(range(len(sizes)), key=lambda g: (sizes[g], -g))
    while open_groups and sizes[open_groups[0]] <= left // len(open_groups):  # the smallest fits whole
        smallest = open_groups.pop(0)
        shares[smallest], left = sizes[smallest], left - sizes[smallest]
    if open_groups:
        even, extra = divmod(left, len(open_groups))
        for rank, group in enumerate(open_groups):  # the last `extra` (largest) get one more
            shares[group] = even + (rank >= len(open_groups) - extra)
    return shares


def hierarchical_shares(sizes: np.ndarray, up: list[np.ndarray], target: int) -> np.ndarray:
    """Each first-level cluster's share of `target`: even over the top level's clusters, each
    cluster's share even over its children, down to level 1 (`sizes`: images per first-level
    cluster; `up`: `parents(levels)`)."""
    # members[level][c]: the clusters of the level below that make cluster c
    sizes_by_level, children = [np.asarray(sizes)], []
    for mapping in up:
        count = int(mapping.max()) + 1 if len(mapping) else 0
        children.append([np.flatnonzero(mapping == c) for c in range(count)])
        sizes_by_level.append(np.array([sizes_by_level[-1][kids].sum() for kids in children[-1]], dtype=np.int64))
    top = sizes_by_level[-1]
    shares = np.array(even_shares(top.tolist(), target), dtype=np.int64)
    for level in range(len(up) - 1, -1, -1):
        below = np.zeros(len(sizes_by_level[level]), dtype=np.int64)
        for cluster, kids in enumerate(children[level]):
            below[kids] = even_shares(sizes_by_level[level][kids].tolist(), int(shares[cluster]))
        shares = below
    return shares


def assign_and_select(embeddings: Embeddings, levels: list[np.ndarray], target: int | None, seed: int,
                      removed: frozenset, work: str, batch_rows: int) -> tuple[set[str], np.ndarray, np.ndarray]:
    """Writes `work`/CLUSTERS_FILE: every image not in `removed`, its cluster at each level (`cluster`
    = the top level's) and whether it is `selected` (the `target` images of `hierarchical_shares`,
    each first-level cluster's lowest `id_rank`s; all of them without a target). Three streaming
    passes: assign to first-level clusters, draw, write. Returns (the selected ids, images per
    first-level cluster before and after the selection)."""
    filesystem, root = resolve_location(work)
    assigned, sizes = f"{root.rstrip('/')}/assigned.parquet", np.zeros(len(levels[0]), dtype=np.int64)
    first_level = centroid_index(levels[0])
    with pq.ParquetWriter(assigned, ASSIGNED_SCHEMA, filesystem=filesystem) as writer:
        for batch in embeddings.batches(["id", EMBEDDING], batch_rows):
            keep = [i for i, item in enumerate(batch.column("id").to_pylist()) if item not in removed]
            if keep:
                batch = batch.take(pa.array(keep))
                clusters = nearest(embeddings.unit(batch), first_level)[:, 0]
                sizes += np.bincount(clusters, minlength=len(sizes))
                writer.write_table(pa.table({"id": batch.column("id"), "cluster_level1": clusters}, ASSIGNED_SCHEMA))
    up = parents(levels)
    shares = sizes if target is None else hierarchical_shares(sizes, up, target)
    heaps: list[list[tuple[int, str]]] = [[] for _ in sizes]  # per cluster, a max-heap of (-rank, id)
    for batch in pq.ParquetFile(assigned, filesystem=filesystem).iter_batches(batch_size=batch_rows):
        for item, cluster in zip(batch.column("id").to_pylist(), batch.column("cluster_level1").to_pylist()):
            rank, heap = id_rank(item, seed), heaps[cluster]
            if len(heap) < shares[cluster]:
                heapq.heappush(heap, (-rank, item))
            elif heap and rank < -heap[0][0]:
                heapq.heapreplace(heap, (-rank, item))
    selected = {item for heap in heaps for _, item in heap}
    with pq.ParquetWriter(f"{root.rstrip('/')}/{CLUSTERS_FILE}", clusters_schema(len(levels)),
                          filesystem=filesystem) as writer:
        for batch in pq.ParquetFile(assigned, filesystem=filesystem).iter_batches(batch_size=batch_rows):
            path = [batch.column("cluster_level1").to_numpy()]
            for mapping in up:
                path.append(mapping[path[-1]])
            columns = {"id": batch.column("id"), "cluster": path[-1]}
            columns.update({f"cluster_level{level + 1}": clusters for level, clusters in enumerate(path)})
            chosen = [item in selected for item in batch.column("id").to_pylist()]
            writer.write_table(pa.table({**columns, "selected": chosen}, clusters_schema(len(levels))))
    filesystem.delete_file(assigned)
    return selected, sizes, np.array([len(heap) for heap in heaps], dtype=np.int64)


ASSIGNED_SCHEMA = pa.schema([("id", pa.string()), ("cluster_level1", pa.int64())])


def clusters_schema(levels: int) -> pa.Schema:
    """CLUSTERS_FILE's columns: `id`, `cluster` (top level), `cluster_level1`..`cluster_level{levels}`,
    `selected`."""
    return pa.schema([("id", pa.string()), ("cluster", pa.int64())]
                     + [(f"cluster_level{level + 1}", pa.int64()) for level in range(levels)]
                     + [("selected", pa.bool_())])
