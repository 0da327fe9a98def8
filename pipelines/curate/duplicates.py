"""Exact and near-duplicates among a set's embeddings, searched in partitions that bound memory.

Exact duplicates share a `content_hash` (equal encoded bytes); near-duplicates are images whose
embeddings have a cosine similarity of at least a threshold, found by faiss's exact inner-product
range search over L2-normalised vectors, and, with a match threshold, whose thumbnails then match
pixel by pixel (`curate.match`: a crop, recolouring or re-encoding of the other). No process
holds every embedding: a coarse k-means, trained on a sample of bounded size (`id_sample`),
splits the rows into partitions of about `partition_rows`; every row goes to the partitions of
its `probes` nearest centroids, so a pair is missed only when neither image has the other's
partition among its nearest (the same multi-probe idea as an IVF index); each partition is
searched by a Ray task of its own, on any node. The pairs found are joined into groups
(union-find) on the driver, whose memory grows with the duplicates, not with the rows. A group
keeps its smallest id, so a rerun keeps the same images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.console import Progress
from pipelines.curate.match import match_scores
from pipelines.images.decode_tasks import CONTENT_HASH
from pipelines.images.shards import resolve_location
from pipelines.outputs.embed import EMBEDDING, THUMBNAIL

SAMPLE_SALT = "k-means sample"  # `id_sample`'s `id_rank`: the same rows for every --seed, not the draw's
# k-means samples per centroid: faiss's own default cap (it subsamples above it).
POINTS_PER_CENTROID = 256
DUPLICATES_FILE = "duplicates.parquet"
PAIRS_SCHEMA = pa.schema([("a", pa.string()), ("b", pa.string()), ("a_hash", pa.string()), ("b_hash", pa.string()),
                          ("similarity", pa.float32()), ("match", pa.float32())])
DUPLICATES_SCHEMA = pa.schema([("group", pa.int64()), ("id", pa.string()), (CONTENT_HASH, pa.string()),
                               ("reason", pa.string())])
REASONS = ("kept", "exact", "near")  # a group's kept image, and why each other one was removed
MATCH_CHUNK = 32  # candidates checked at once: smaller skips more joined pairs, larger batches better


@dataclass(frozen=True)
class Embeddings:
    """The Parquet files of a `selfsup embed` output (local paths or a pyarrow filesystem's)."""

    filesystem: object
    files: list[str]
    rows: int
    dim: int
    center: tuple[float, ...] | None = None  # subtracted before normalising (`with_center`)

    def with_center(self, batch_rows: int, size: int = 100_000) -> Embeddings:
        """These embeddings, centred on the mean of a sample of about `size` rows (`id_sample`): features
        after a ReLU are all positive, and their raw cosine says little (unrelated images of the
        MNIST-M sample sit at 0.97, docs/BENCHMARKS.md, "Curation")."""
        sample = id_sample(self, size, batch_rows, unit=False)
        return replace(self, center=tuple(float(v) for v in sample.mean(axis=0)))

    def unit(self, batch: pa.RecordBatch) -> np.ndarray:
        """`unit_vectors` of the batch, centred first when these embeddings have a center."""
        return unit_vectors(batch, self.center)

    def batches(self, columns: list[str], batch_rows: int):
        """Record batches of `columns` over every file in order: one batch in memory at a time."""
        for path in self.files:
            with self.filesystem.open_input_file(path) as stream:
                yield from pq.ParquetFile(stream).iter_batches(batch_size=batch_rows, columns=columns)


def unit_vectors(batch: pa.RecordBatch, center=None, unit: bool = True) -> np.ndarray:
    """(n, d) float32 rows of the batch's `embedding` column, minus `center` when given, each of
    L2 norm 1 (cosine = dot) unless `unit` is False."""
    column = batch.column(EMBEDDING)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    vectors = np.array(vectors, dtype=np.float32, order="C")  # a copy: faiss normalises in place
    if center is not None:
        vectors -= np.asarray(center, dtype=np.float32)
    if unit:
        faiss.normalize_L2(vectors)
    return vectors


def id_rank(item: str, salt: int | str) -> int:
    """A random rank of an id in [0, 2**64) for `salt` (a seed, or a use's name), the same in every
    process and rerun."""
    return int.from_bytes(hashlib.blake2b(f"{salt}:{item}".encode(), digest_size=8).digest(), "big")


def id_sample(embeddings: Embeddings, size: int, batch_rows: int, skip: frozenset = frozenset(),
              unit: bool = True) -> np.ndarray:
    """About `size` vectors (`Embeddings.unit`'s, or raw when not `unit`), rows in `skip` left out,
    in id order: the rows whose `id_rank` falls in the lowest `size / rows` of its range. Which
    rows, and their order, depend on the ids alone, not on the files' order (`selfsup embed`
    writes rows as Ray Data's tasks finish), so a seed gives the same k-means on every rerun;
    memory holds `size` rows, not the set."""
    below = (1 << 64) * min(1.0, size / max(embeddings.rows, 1))
    taken: list[tuple[str, np.ndarray]] = []
    for batch in embeddings.batches(["id", EMBEDDING], batch_rows):
        ids = batch.column("id").to_pylist()
        picks = [i for i, item in enumerate(ids) if item not in skip and id_rank(item, SAMPLE_SALT) < below]
        if picks:
            picked = batch.take(pa.array(picks))
            vectors = embeddings.unit(picked) if unit else unit_vectors(picked, unit=False)
            taken.extend(zip((ids[i] for i in picks), vectors))
    taken.sort(key=lambda row: row[0])
    return np.stack([vector for _, vector in taken]) if taken else np.zeros((0, embeddings.dim), np.float32)


def spherical_kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 20) -> np.ndarray:
    """(k, d) unit-norm centroids of faiss's k-means on `points`, started from `plus_plus_seeds`
    (faiss starts from random points, which puts several seeds in a concept ten times as frequent
    and ends with it split and small concepts merged: tests/test_curate.py). Above
    POINTS_PER_CENTROID points per centroid, faiss trains on a subsample."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    kmeans = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=POINTS_PER_CENTROID)
    kmeans.train(points, init_centroids=plus_plus_seeds(points, k, np.random.default_rng(seed)))
    return kmeans.centroids


def plus_plus_seeds(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): each next seed a point drawn with
    probability proportional to its squared distance to the nearest seed so far."""
    chosen = [int(rng.integers(len(points)))]
    closest = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(closest.sum())
        chosen.append(int(rng.choice(len(points), p=closest / total)) if total > 0 else int(rng.integers(len(points))))
        closest = np.minimum(closest, ((points - points[chosen[-1]]) ** 2).sum(axis=1))
    return np.ascontiguousarray(points[chosen])


def centroid_index(centroids: np.ndarray) -> faiss.IndexFlatIP:
    """An exact inner-product index of unit-norm centroids, built once for a pass (`nearest`)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest(vectors: np.ndarray, index: faiss.IndexFlatIP, how_many: int = 1) -> np.ndarray:
    """(n, how_many) indices of each vector's nearest centroids in `index` by cosine, nearest first."""
    return index.search(vectors, min(how_many, index.ntotal))[1]


def write_partitions(embeddings: Embeddings, folder: str, partition_rows: int, probes: int, seed: int,
                     batch_rows: int, with_thumbnails: bool = False) -> list[str]:
    """Each row (`id`, `content_hash`, `embedding`, and `thumbnail` when asked) written to the
    Parquet file of each of its `probes` nearest coarse centroids under `folder` (a local path or
    URI); returns the files.
    (Equal bytes give equal embeddings, so an exact duplicate shares its original's partitions.)"""
    count = max(1, -(-embeddings.rows // partition_rows))
    if count > 1:
        index = centroid_index(spherical_kmeans(id_sample(embeddings, count * POINTS_PER_CENTROID, batch_rows),
                                                count, seed))
    filesystem, root = resolve_location(folder)
    filesystem.create_dir(root, recursive=True)
    writers: dict[int, pq.ParquetWriter] = {}
    for batch in embeddings.batches(["id", CONTENT_HASH, EMBEDDING] + [THUMBNAIL] * with_thumbnails, batch_rows):
        table = pa.Table.from_batches([batch])
        homes = nearest(embeddings.unit(batch), index, probes) if count > 1 else np.zeros((batch.num_rows, 1), int)
        for partition in np.unique(homes):
            if partition not in writers:
                path = f"{root.rstrip('/')}/partition-{partition:05d}.parquet"
                writers[partition] = pq.ParquetWriter(path, table.schema, filesystem=filesystem)
            writers[partition].write_table(table.take(pa.array(np.flatnonzero((homes == partition).any(axis=1)))))
    for writer in writers.values():
        writer.close()
    return [f"{folder.rstrip('/')}/partition-{partition:05d}.parquet" for partition in sorted(writers)]


@ray.remote(num_cpus=1)
def partition_pairs(path: str, threshold: float, center, match: float | None, candidates: int) -> pa.Table:
    """`pairs_in` the partition file at `path` (a Ray task: partitions are searched side by side)."""
    faiss.omp_set_num_threads(1)  # the task's one CPU
    filesystem, file = resolve_location(path)
    return pairs_in(pq.read_table(file, filesystem=filesystem), threshold, center, match, candidates)


def pairs_in(table: pa.Table, threshold: float, center=None, match: float | None = None,
             candidates: int = 10) -> pa.Table:
    """The duplicate pairs among the rows of `table` (`id`, `content_hash`, `embedding`, and
    `thumbnail` with `match`): PAIRS_SCHEMA, a < b. Images with the same `content_hash` pair with
    the smallest id among them (similarity and match 1); one image per hash is searched for
    neighbours at cosine >= `threshold` (after subtracting `center`, when given). With `match`,
    only each image's `candidates` nearest are, and a neighbour is kept only when the two
    thumbnails' `match_scores` is at least `match` (`checked_until_joined`: a pair already joined
    through others is left out); without `match`, its match is NaN."""
    ids, hashes = table.column("id").to_pylist(), table.column(CONTENT_HASH).to_pylist()
    first_of_hash: dict[str, int] = {}
    pairs, similarity = [], []
    for row in sorted(range(len(ids)), key=ids.__getitem__):
        if hashes[row] in first_of_hash:
            pairs.append((first_of_hash[hashes[row]], row)), similarity.append(1.0)
        else:
            first_of_hash[hashes[row]] = row
    unique = np.array(sorted(first_of_hash.values()), dtype=np.int64)
    if len(unique) > 1:
        vectors = unit_vectors(table.take(pa.array(unique)), center)
        for first, second, score in similar_pairs(vectors, threshold, None if match is None else candidates):
            pairs.append(tuple(sorted((unique[first], unique[second]), key=ids.__getitem__)))
            similarity.append(score)
    matched = np.ones(len(pairs), np.float32)
    near = np.array([hashes[a] != hashes[b] for a, b in pairs], bool)
    if match is None:
        matched[near] = np.nan
    elif near.any():
        order = sorted(np.flatnonzero(near), key=lambda k: -similarity[k])
        exact = [pair for pair, is_near in zip(pairs, near) if not is_near]
        matched[order] = checked_until_joined([pairs[k] for k in order], thumbnail_array(table), match, exact)
    keep = np.flatnonzero(np.isnan(matched) | (matched >= (match or 0)))
    return pa.table({"a": [ids[pairs[k][0]] for k in keep], "b": [ids[pairs[k][1]] for k in keep],
                     "a_hash": [hashes[pairs[k][0]] for k in keep], "b_hash": [hashes[pairs[k][1]] for k in keep],
                     "similarity": pa.array([similarity[k] for k in keep], pa.float32()),
                     "match": pa.array(matched[keep], pa.float32())}, schema=PAIRS_SCHEMA)


def similar_pairs(vectors: np.ndarray, threshold: float, most: int | None) -> list[tuple[int, int, float]]:
    """(i, j, cosine) with i < j for the rows of unit `vectors` at cosine >= `threshold`: every
    such pair (faiss range search), or with `most`, those among each row's `most` nearest (a
    nearest-neighbour search, whose output is bounded by rows x `most` at any threshold: each pair
    found then costs a pixel match)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    if most is None:
        limits, scores, neighbours = index.range_search(vectors, threshold)
        hits = ((query, int(neighbours[hit]), float(scores[hit])) for query in range(len(vectors))
                for hit in range(limits[query], limits[query + 1]))
    else:
        scores, neighbours = index.search(vectors, min(most + 1, len(vectors)))
        hits = ((query, int(near), float(score)) for query in range(len(vectors))
                for near, score in zip(neighbours[query], scores[query]) if near >= 0 and score >= threshold)
    found = {(min(query, near), max(query, near)): score for query, near, score in hits if query != near}
    return [(first, second, score) for (first, second), score in found.items()]


class UnionFind:
    """Groups of items joined pair by pair (path halving); a group's root is its smallest item."""

    def __init__(self):
        self.parent: dict = {}

    def root(self, item):
        """`item`'s group's smallest item (itself when it was never joined)."""
        while self.parent.setdefault(item, item) != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def join(self, a, b) -> None:
        first, second = self.root(a), self.root(b)
        if first != second:
            self.parent[max(first, second)] = min(first, second)


def checked_until_joined(candidates: list[tuple[int, int]], thumbnails: np.ndarray, match: float,
                         joined: list[tuple[int, int]]) -> np.ndarray:
    """The `match_scores` of each candidate pair of rows (most similar first), MATCH_CHUNK at a
    time, 0 for one not checked: a candidate whose two images are already in one group (by the
    matches before it, or by the `joined` pairs) cannot change the groups. The copies of an image
    are each other's candidates, so most of their pairs need no check."""
    groups = UnionFind()
    for first, second in joined:
        groups.join(first, second)
    scores, position = np.zeros(len(candidates), np.float32), 0
    while position < len(candidates):
        chunk = []
        while position < len(candidates) and len(chunk) < MATCH_CHUNK:
            first, second = candidates[position]
            if groups.root(first) != groups.root(second):
                chunk.append(position)
            position += 1
        if chunk:
            rows = np.array([candidates[k] for k in chunk], dtype=np.int64)
            scores[chunk] = match_scores(thumbnails[rows[:, 0]], thumbnails[rows[:, 1]])
            for k in chunk:
                if scores[k] >= match:
                    groups.join(*candidates[k])
    return scores


def thumbnail_array(table: pa.Table) -> np.ndarray:
    """(rows, THUMBNAIL_SIDE**2) uint8: the table's `thumbnail` column."""
    column = table.column(THUMBNAIL).combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def duplicate_groups(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Every id in a pair -> its group's smallest id (the one kept): the connected components of
    the pairs."""
    groups = UnionFind()
    for a, b in pairs:
        groups.join(a, b)
    return {item: groups.root(item) for item in list(groups.parent)}


def find_duplicates(embeddings: Embeddings, work: str, threshold: float, partition_rows: int, probes: int,
                    seed: int, batch_rows: int, match: float | None = None, candidates: int = 10) -> pa.Table:
    """The duplicate groups of `embeddings` (DUPLICATES_SCHEMA: one row per image in a group of two
    or more, the kept one first), searched in partitions written under `work`/partitions (with
    `match`, each image's `candidates` nearest verified by their thumbnails: `pairs_in`)."""
    files = write_partitions(embeddings, f"{work.rstrip('/')}/partitions", partition_rows, probes, seed, batch_rows,
                             with_thumbnails=match is not None)
    pending = [partition_pairs.remote(path, threshold, embeddings.center, match, candidates) for path in files]
    parts = []
    progress = Progress("curate: near-duplicate search:", len(files), unit="partitions")
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        parts += ray.get(done)
        progress.tick(len(parts))
    found = pa.concat_tables(parts)
    keeper = duplicate_groups(zip(found.column("a").to_pylist(), found.column("b").to_pylist()))
    hashes = dict(zip(found.column("a").to_pylist() + found.column("b").to_pylist(),
                      found.column("a_hash").to_pylist() + found.column("b_hash").to_pylist()))
    number = {kept: index for index, kept in enumerate(sorted(set(keeper.values())))}
    members = sorted(keeper, key=lambda item: (number[keeper[item]], item != keeper[item], item))
    reasons = ["kept" if keeper[m] == m else "exact" if hashes[m] == hashes[keeper[m]] else "near" for m in members]
    return pa.table({"group": [number[keeper[m]] for m in members], "id": members,
                     CONTENT_HASH: [hashes[m] for m in members], "reason": reasons}, schema=DUPLICATES_SCHEMA)
