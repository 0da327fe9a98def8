"""`selfsup curate`: embed, remove duplicates, balance concepts, write curated shards and a report.

Four stages, each finished one recorded in `OUT/curation/` with the inputs and options it ran
with, so an interrupted curate reruns only what it had not finished (and a changed option redoes
its stage and those after it):

1. embeddings: `selfsup embed` of the shards with the checkpoint's encoder (Ray Data actors, a GPU
   each when there is one), or a given `selfsup embed` output;
2. duplicates (`curate.duplicates`): exact by content hash, near by cosine similarity and then by
   their thumbnails' pixels (`curate.match`), one image kept per group; the groups in
   `duplicates.parquet`;
3. clusters (`curate.balance`): hierarchical k-means over what is left and the target sampled
   evenly over the top-level clusters; every image's clusters in `clusters.parquet`;
4. shards: the selected rows copied from the input shards to `OUT/shards` (same schema, original
   bytes, labels and ids), by Ray Data; then `report.json` and `clusters.png`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.expressions import col

from pipelines.console import UsageError, log
from pipelines.curate.balance import CLUSTERS_FILE, assign_and_select, cluster_levels, parents
from pipelines.curate.duplicates import DUPLICATES_FILE, REASONS, Embeddings, find_duplicates
from pipelines.curate.report import draw_report
from pipelines.images.decode_tasks import CONTENT_HASH
from pipelines.images.shards import DataError, ShardSet, parquet_files, read_classes, resolve_location, write_classes
from pipelines.outputs.embed import EMBEDDING, THUMBNAIL, embed

WORK, SHARDS, REPORT = "curation", "shards", "report.json"


@dataclass(frozen=True)
class CurateOptions:
    """Args:
    threshold: cosine similarity from which two images are near-duplicate candidates.
    match: pixel match score (`curate.match`) from which a candidate pair is a near-duplicate;
        None takes every candidate (the embeddings alone decide).
    candidates: with `match`, the most candidates checked per image (its nearest at `threshold` or
        more): each check costs milliseconds, and a loose threshold lets in many.
    clusters: k-means clusters per level, first (over the images) to top, e.g. (100, 10).
    target: images to keep, sampled evenly over the top-level clusters; None keeps every image
        left after removing duplicates.
    seed: k-means and sampling seed.
    partition_rows: rows per near-duplicate search partition (bounds one task's memory).
    probes: partitions each image is searched in (its nearest coarse centroids).
    batch_rows: rows read at a time from Parquet.
    """

    threshold: float = 0.9
    match: float | None = 0.93
    candidates: int = 10
    clusters: tuple[int, ...] = (100, 10)
    target: int | None = None
    seed: int = 0
    partition_rows: int = 25_000
    probes: int = 2
    batch_rows: int = 4096

    def check(self, rows: int) -> None:
        """Refuses, in one line naming the option, a value that cannot work on `rows` images."""
        if not 0.0 < self.threshold <= 1.0:
            raise UsageError(f"--threshold {self.threshold}: a cosine similarity in (0, 1]")
        if self.match is not None and not 0.0 < self.match <= 1.0:
            raise UsageError(f"--match {self.match}: a correlation in (0, 1], or 'off'")
        if not self.clusters or any(k < 1 for k in self.clusters) or list(self.clusters) != sorted(self.clusters)[::-1]:
            raise UsageError(f"--clusters {','.join(map(str, self.clusters))}: positive counts, first level to top, "
                             "each at most the one before (e.g. 100,10)")
        if self.clusters[0] > rows:
            raise UsageError(f"--clusters {self.clusters[0]}: more first-level clusters than the {rows:,} images")
        if self.target is not None and not 1 <= self.target <= rows:
            raise UsageError(f"--target {self.target}: must be between 1 and the {rows:,} images of --data")
        for name in ("candidates", "partition_rows", "probes", "batch_rows"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")


def given_embeddings(location: str, shards: ShardSet, need_thumbnails: bool = False) -> Embeddings:
    """A `selfsup embed` output, refused in one line when it is not one for these shards (or has no
    thumbnails when `need_thumbnails`)."""
    filesystem, files = parquet_files(location)
    if not files:
        raise DataError(f"--embeddings {location}: no Parquet files (expected a `selfsup embed` output)")
    schema = pq.read_schema(files[0], filesystem=filesystem)
    for column in ("id", EMBEDDING, CONTENT_HASH):
        if column not in schema.names:
            raise DataError(f"{files[0]}: no '{column}' column (found {', '.join(schema.names)}); write the "
                            "embeddings with `selfsup embed` of this version, or give --checkpoint")
    if need_thumbnails and THUMBNAIL not in schema.names:
        raise DataError(f"{files[0]}: no '{THUMBNAIL}' column to match pixels with; write the embeddings with "
                        "`selfsup embed --thumbnails`, or give --match off")
    rows = sum(pq.ParquetFile(f, filesystem=filesystem).metadata.num_rows for f in files)
    if rows > shards.num_rows:
        raise DataError(f"--embeddings {location}: {rows:,} rows, more than the {shards.num_rows:,} images of "
                        f"--data {shards.root} (embeddings of other shards?)")
    return Embeddings(filesystem, files, rows, schema.field(EMBEDDING).type.list_size)


def earlier_curate(out: str) -> bool:
    """Whether `out` (a path or URI) holds an earlier curate's stages, which a rerun reuses."""
    filesystem, root = resolve_location(f"{out.rstrip('/')}/{WORK}")
    return filesystem.get_file_info(root).type == pafs.FileType.Directory


class Stages:
    """The finished stages under `OUT/curation`: each a JSON file of the inputs it ran with (`key`)
    and its result, reused when a rerun asks for the same."""

    def __init__(self, work: str):
        self.location = work.rstrip("/")
        self.filesystem, self.root = resolve_location(work)
        self.filesystem.create_dir(self.root, recursive=True)

    def path(self, name: str) -> str:
        """`name`'s path on `self.filesystem`."""
        return f"{self.root.rstrip('/')}/{name}"

    def location_of(self, name: str) -> str:
        """`name`'s location as the user gave it (a URI keeps its scheme), for other functions to resolve."""
        return f"{self.location}/{name}"

    def finished(self, name: str, key: dict) -> dict | None:
        if self.filesystem.get_file_info(self.path(name)).type != pafs.FileType.File:
            return None
        with self.filesystem.open_input_stream(self.path(name)) as stream:
            record = json.loads(stream.read())
        return record["result"] if record.get("key") == key else None

    def finish(self, name: str, key: dict, result: dict) -> dict:
        with self.filesystem.open_output_stream(self.path(name)) as stream:
            stream.write(json.dumps({"key": key, "result": result}, indent=1).encode())
        return result


def curate(shards: ShardSet, out: str, options: CurateOptions, checkpoint: str | None = None,
           embeddings: Embeddings | None = None, batch_size: int = 256, encoder: tuple | None = None) -> dict:
    """Curates the shards `shards` into `out`/shards (see the module's docstring); returns the
    report (the command's JSON line). Either `checkpoint`'s encoder embeds the images (`encoder`:
    (method, RunConfig) when it was built from the weights file `checkpoint` names), or
    `embeddings` holds their `selfsup embed` output; the options were checked (`CurateOptions.check`)."""
    started, stages = time.monotonic(), Stages(f"{out.rstrip('/')}/{WORK}")
    key = {"data": shards.root, "rows": shards.num_rows, "checkpoint": checkpoint,
           "embeddings": embeddings.files[0] if embeddings else None,
           THUMBNAIL: True}  # earlier curates embedded without thumbnails: embed again
    embeddings, bad_skipped = embeddings_stage(shards, stages, key, checkpoint, embeddings, batch_size, encoder)
    embeddings = embeddings.with_center(options.batch_rows)

    searched = ("threshold", "match", "candidates", "partition_rows", "probes")
    key = {**key, **{name: getattr(options, name) for name in searched}}
    removed, reasons = duplicates_stage(embeddings, stages, key, options)
    left = embeddings.rows - len(removed)
    if options.target is not None and options.target > left:
        raise DataError(f"--target {options.target:,}: only {left:,} images are left after removing {len(removed):,} "
                        f"duplicates (kept in {stages.location_of(DUPLICATES_FILE)}; a rerun with --target "
                        f"{left:,} or less reuses them)")
    key = {**key, "clusters": list(options.clusters), "target": options.target, "seed": options.seed}
    clusters = clusters_stage(embeddings, stages, key, options, removed)
    report = stages.finished(REPORT, key)
    if report is None:
        shards_out = write_curated(shards, f"{out.rstrip('/')}/{SHARDS}", stages.location_of(CLUSTERS_FILE))
        report = {"out": shards_out, "rows": shards.num_rows, "bad_skipped": bad_skipped,
                  "removed_exact": reasons["exact"], "removed_near": reasons["near"],
                  "duplicate_groups": reasons["kept"], "left_after_duplicates": left,
                  "selected": clusters["selected"], "target": options.target, "options": asdict(options),
                  "top_clusters_before": clusters["before"], "top_clusters_after": clusters["after"],
                  "picture": draw_report(stages, shards_out, clusters), "work": stages.location}
        report = stages.finish(REPORT, key, report)
    log.info(f"curate: {report['rows']:,} images -> {report['selected']:,} in {report['out']} "
             f"({report['removed_exact']:,} exact and {report['removed_near']:,} near-duplicates removed, "
             f"{report['bad_skipped']:,} undecodable; {len(report['top_clusters_after'])} top-level clusters); "
             f"report: {stages.location_of(REPORT)}")
    return {**report, "seconds": round(time.monotonic() - started, 1)}


def embeddings_stage(shards: ShardSet, stages: Stages, key: dict, checkpoint: str | None,
                     embeddings: Embeddings | None, batch_size: int,
                     encoder: tuple | None) -> tuple[Embeddings, int]:
    """(the images' embeddings: given, embedded now, or read back from a finished stage; how many
    images could not be decoded and have none)."""
    embedded = stages.finished("embedded.json", key)
    if embeddings is not None:
        embedded = embedded or stages.finish("embedded.json", key, {"bad_skipped": shards.num_rows - embeddings.rows})
        return embeddings, embedded["bad_skipped"]
    location = stages.location_of("embeddings")
    if embedded is None:
        log.info(f"curate: embedding {shards.num_rows:,} images with {checkpoint}")
        summary = embed(checkpoint, shards.root, location, batch_size=batch_size, overwrite=True, shards=shards,
                        encoder=encoder, with_thumbnails=True)
        embedded = stages.finish("embedded.json", key, {"bad_skipped": summary["bad_skipped"]})
    else:
        log.info(f"curate: embeddings of {shards.num_rows:,} images: reused from {location}")
    return given_embeddings(location, shards), embedded["bad_skipped"]


def duplicates_stage(embeddings: Embeddings, stages: Stages, key: dict,
                     options: CurateOptions) -> tuple[frozenset, dict[str, int]]:
    """(the ids removed as duplicates, images per reason: kept, exact, near): found now, or read back
    from a finished stage."""
    reasons = stages.finished("duplicates.json", key)
    if reasons is None:
        verified = f" and pixel match >= {options.match}" if options.match is not None else ""
        log.info(f"curate: duplicates among {embeddings.rows:,} embeddings (exact by content hash, near at cosine >= "
                 f"{options.threshold}{verified}, partitions of ~{options.partition_rows:,} rows)")
        groups = find_duplicates(embeddings, stages.location, options.threshold, options.partition_rows, options.probes,
                                 options.seed, options.batch_rows, options.match, options.candidates)
        pq.write_table(groups, stages.path(DUPLICATES_FILE), filesystem=stages.filesystem)
        found = groups.column("reason").to_pylist()
        reasons = stages.finish("duplicates.json", key, {reason: found.count(reason) for reason in REASONS})
    else:
        log.info(f"curate: duplicates: reused from {stages.location_of(DUPLICATES_FILE)}")
        groups = pq.read_table(stages.path(DUPLICATES_FILE), columns=["id", "reason"], filesystem=stages.filesystem)
    removed = frozenset(item for item, reason in zip(groups.column("id").to_pylist(),
                                                      groups.column("reason").to_pylist()) if reason != "kept")
    return removed, reasons


def clusters_stage(embeddings: Embeddings, stages: Stages, key: dict, options: CurateOptions,
                   removed: frozenset) -> dict:
    """Clusters every image left and selects the target: {selected, before, after} (images per
    top-level cluster before and after), computed now or read back from a finished stage."""
    finished = stages.finished("clusters.json", key)
    if finished is not None:
        log.info(f"curate: clusters: reused from {stages.location_of(CLUSTERS_FILE)}")
        return finished
    log.info(f"curate: hierarchical k-means ({' -> '.join(map(str, options.clusters))} clusters) over "
             f"{embeddings.rows - len(removed):,} images" + (f", {options.target:,} sampled evenly over the top level"
                                                            if options.target else ""))
    levels = cluster_levels(embeddings, options.clusters, options.seed, removed, options.batch_rows)
    selected, before, after = assign_and_select(embeddings, levels, options.target, options.seed, removed,
                                                stages.location, options.batch_rows)
    top = np.arange(len(levels[0]))
    for mapping in parents(levels):
        top = mapping[top]
    count = len(levels[-1])
    per_top = lambda sizes: np.bincount(top, weights=sizes, minlength=count).astype(int).tolist()  # noqa: E731
    result = {"selected": len(selected), "before": per_top(before), "after": per_top(after)}
    return stages.finish("clusters.json", key, result)


def write_curated(shards: ShardSet, out: str, clusters_file: str) -> str:
    """Copies the selected rows of `shards` to `out` (same columns; a partial earlier write is
    replaced), with the class names beside them; returns `out`."""
    filesystem, root = resolve_location(out)
    if filesystem.get_file_info(root).type == pafs.FileType.Directory:
        filesystem.delete_dir_contents(root)
    work_fs, clusters_path = resolve_location(clusters_file)
    batches = pq.ParquetFile(clusters_path, filesystem=work_fs).iter_batches(columns=["id", "selected"])
    chosen = [item for batch in batches
              for item, keep in zip(batch.column("id").to_pylist(), batch.column("selected").to_pylist()) if keep]
    log.info(f"curate: writing {len(chosen):,} images to {out}")
    dataset = ray.data.read_parquet(shards.files, filesystem=shards.filesystem)
    dataset.filter(expr=col("id").is_in(chosen)).write_parquet(out)
    names = read_classes(shards.root)
    if names:
        write_classes(out, names)
    return out
