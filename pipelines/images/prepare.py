"""`selfsup prepare`: turn an image folder, a Hugging Face-style image Parquet or a bundled sample
into Parquet shards of the shard schema (docs/ARCHITECTURE.md §1), on Ray Data so it scales out.

Every image is fully decoded once to check it; bad ones are skipped, counted and named, and the
original encoded bytes of the good ones are written unchanged.
"""

from __future__ import annotations

import hashlib
import posixpath
import random
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data

from pipelines.console import Progress, log
from pipelines.images.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, image_bytes, open_image
from pipelines.images.labeled import rank_by_record_id
from pipelines.images.quality import check_bad_fraction, new_quality_log
from pipelines.images.samples import CLASS_NAMES, sample_tables
from pipelines.images.shards import (
    SHARD_SCHEMA,
    DataError,
    check_output_folder,
    find_shards,
    read_classes,
    resolve_location,
    write_classes,
)

MB = 1 << 20


@dataclass
class PrepareConfig:
    """Args:
    shard_mb: target size of one Parquet shard (rows per shard = this / mean encoded image size).
    row_group_mb: target size of one row group, the unit a reader streams.
    max_pixels: images with more pixels are skipped as decompression bombs.
    max_bad_fraction: fail when more than this fraction of the source is bad.
    overwrite: replace shards already in the output folder.
    test_fraction: for an image folder, or shards with an `id` column, hold out this fraction of
        every class (of the whole set when it has no classes) as `out/test`, the rest `out/train`;
        0 = one split.
    """

    shard_mb: float = 256.0
    row_group_mb: float = 8.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bad_fraction: float = 0.5
    overwrite: bool = False
    test_fraction: float = 0.0


def _group_rows(mean_bytes: float, config: PrepareConfig) -> int:
    return max(1, int(min(config.row_group_mb, config.shard_mb) * MB / max(mean_bytes, 1.0)))


def _to_shard_rows(batch: pa.Table, quality_log, max_pixels: int) -> pa.Table:
    """Check every image decodes; keep the good rows in the shard schema, report the bad ones."""
    images = batch.column("image").to_pylist()
    ids = batch.column("id").to_pylist()
    good, bad, encoded = [], [], []
    for index, value in enumerate(images):
        data = image_bytes(value)
        try:
            open_image(data, max_pixels)
            good.append(index)
            encoded.append(data)
        except BadImage as error:
            bad.append((ids[index], str(error)))
    ray.get(quality_log.record.remote(len(images), bad))
    labels = batch.column("label") if "label" in batch.column_names else pa.nulls(batch.num_rows, pa.int64())
    return pa.table(
        {
            "image": pa.array(encoded, pa.binary()),
            "label": labels.take(pa.array(good, pa.int64())).cast(pa.int64()),
            "id": pa.array([str(ids[i]) for i in good], pa.string()),
        },
        schema=SHARD_SCHEMA,
    )


def _with_folder_labels(batch: pa.Table, root: str, class_index: dict[str, int]) -> pa.Table:
    paths = batch.column("path").to_pylist()
    relative = [posixpath.relpath(p, root) for p in paths]
    labels = [class_index.get(r.split("/")[0]) if "/" in r else None for r in relative]
    return pa.table(
        {"image": batch.column("bytes"), "label": pa.array(labels, pa.int64()), "id": pa.array(relative)}
    )


def _hf_id(value, shard_path: str) -> str:
    """A stable id for a row without one: the image's own path, else shard name + content hash."""
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    data = image_bytes(value) or b""
    return f"{posixpath.basename(shard_path)}:{hashlib.sha1(data).hexdigest()[:16]}"


def _with_hf_columns(batch: pa.Table) -> pa.Table:
    image = batch.column("image")
    if "id" in batch.column_names:
        ids = pc.cast(batch.column("id"), pa.string())
    else:
        ids = pa.array([_hf_id(v, p) for v, p in zip(image.to_pylist(), batch.column("path").to_pylist())])
    columns = {"image": image, "id": ids}
    if "label" in batch.column_names:
        columns["label"] = batch.column("label")
    return pa.table(columns)


@dataclass(frozen=True)
class Source:
    """What `prepare` reads: its kind and, for a folder, the one recursive listing of it."""

    kind: str  # "sample", "folder" or "parquet"
    filesystem: pafs.FileSystem | None = None
    root: str = ""
    images: tuple = ()
    ignored: int = 0


def _folder_source(src: str, filesystem: pafs.FileSystem, root: str, entries: list[pafs.FileInfo]) -> Source:
    files = [e for e in entries if e.type == pafs.FileType.File and not posixpath.basename(e.path).startswith(".")]
    images = sorted((e for e in files if posixpath.splitext(e.path)[1].lower() in IMAGE_EXTENSIONS), key=lambda e: e.path)
    if not images:
        raise DataError(
            f"{src}: no image files found (expected {'/'.join(sorted(IMAGE_EXTENSIONS))} files, "
            "optionally one subfolder per class)"
        )
    return Source("folder", filesystem, root, tuple(images), len(files) - len(images))


def split_by_record_id(ids: list[str], classes: list[str], test_fraction: float) -> set[str]:
    """The ids held out as the test split: per class, the round(fraction x n) ids that rank first
    by the CRC-32 of the id. Deterministic (the same folder gives the same split on any machine),
    independent of listing order, and exact per class."""
    by_class: dict[str, list[str]] = {}
    for record, label in zip(ids, classes):
        by_class.setdefault(label, []).append(record)
    held_out = set()
    for members in by_class.values():
        held_out.update(rank_by_record_id(members)[:int(round(test_fraction * len(members)))])
    return held_out


def held_out_images(source: Source, test_fraction: float) -> set[str]:
    """The paths of a folder source that `test_fraction` holds out (see `split_by_record_id`;
    the record id is the path relative to the folder, its first part the class). Raises DataError
    when a split would be empty; cheap, so callers check before Ray starts."""
    relative = {e.path: posixpath.relpath(e.path, source.root) for e in source.images}
    classes = [r.split("/")[0] if "/" in r else "" for r in relative.values()]
    held_ids = split_by_record_id(list(relative.values()), classes, test_fraction)
    if not held_ids or len(held_ids) == len(relative):
        raise DataError(f"--test-fraction {test_fraction}: would leave the {'test' if not held_ids else 'train'} "
                        f"split of the {len(relative)} images empty")
    return {path for path, record in relative.items() if record in held_ids}


def held_out_ids(src: str, test_fraction: float) -> set[str]:
    """The record ids of a Parquet source with an `id` column that `test_fraction` holds out (see
    `split_by_record_id`; classes from `label` when there is one). Reads only the id and label
    columns. Raises DataError when there are no ids or a split would be empty."""
    import pyarrow.parquet as pq

    shards = find_shards(src)
    if not shards.has_id:
        raise DataError(f"--test-fraction: {src} has no `id` column to split by; write shards first "
                        f"(`selfsup prepare {src} --out ALL`), then split them (`selfsup prepare ALL --out SPLIT "
                        f"--test-fraction {test_fraction}`)")
    columns = ["id"] + (["label"] if shards.has_label else [])
    tables = [pq.read_table(f, columns=columns, filesystem=shards.filesystem) for f in shards.files]
    ids = [str(i) for t in tables for i in t.column("id").to_pylist()]
    labels = [str(v) for t in tables for v in t.column("label").to_pylist()] if shards.has_label else [""] * len(ids)
    held = split_by_record_id(ids, labels, test_fraction)
    if not held or len(held) == len(set(ids)):
        raise DataError(f"--test-fraction {test_fraction}: would leave the {'test' if not held else 'train'} "
                        f"split of the {len(ids)} images empty")
    return held


def _in_split(batch: pa.Table, held: pa.Array, test: bool) -> pa.Table:
    inside = pc.is_in(batch.column("id"), value_set=held)
    return batch.filter(inside if test else pc.invert(inside))


def _write(dataset: ray.data.Dataset, out: str, mean_bytes: float, config: PrepareConfig) -> None:
    dataset.write_parquet(
        out,
        # Blocks are gathered into shard-sized writes; min_rows_per_file would instead force the
        # row group up to the whole file.
        min_bytes_per_file=int(config.shard_mb * MB),
        row_group_size=_group_rows(mean_bytes, config),
    )


def plan_source(src: str) -> Source:
    """Find out what `src` is, listing a folder once; raises DataError for a missing or unusable
    source (call it before Ray starts, and hand the result to `prepare`)."""
    if src.startswith("sample:"):
        return Source("sample")
    filesystem, root = resolve_location(src)
    root = root.rstrip("/") or "/"
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{src}: no such file or folder (expected an image folder, an image Parquet or sample:NAME)")
    entries = [] if info.type == pafs.FileType.File else filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    if info.type == pafs.FileType.File or any(e.path.endswith(".parquet") for e in entries):
        find_shards(src)  # checks the image column
        return Source("parquet")
    return _folder_source(src, filesystem, root, entries)


def prepare(src: str, out: str, config: PrepareConfig, source: Source | None = None) -> dict:
    """Write shards for `src` under `out` and return the summary printed as the final JSON line.

    Ray must be initialised. Sample sources are split into `out/train` and `out/test`.
    `source` is `plan_source(src)` when the caller already has it.
    """
    source = source or plan_source(src)
    kind = source.kind
    check_output_folder(out, config.overwrite)
    context = ray.data.DataContext.get_current()
    # Blocks no larger than a shard, so shard sizes land between one and two targets.
    context.target_max_block_size = min(context.target_max_block_size or 128 * MB, int(config.shard_mb * MB))
    quality_log = new_quality_log()
    validate = dict(fn_kwargs=dict(quality_log=quality_log, max_pixels=config.max_pixels), batch_format="pyarrow")
    summary: dict = {"source": src, "kind": kind, "out": out}
    seen = lambda: ray.get(quality_log.summary.remote())["seen"]  # noqa: E731
    with Progress("prepare: checked", _image_count(src, source)).watching(seen):
        outputs, ignored = _write_splits(src, out, source, config, summary, validate)

    quality = ray.get(quality_log.summary.remote())
    written = {split: find_shards(path) for split, path in outputs.items()}
    summary.update(
        images_written=sum(s.num_rows for s in written.values()),
        shards=sum(len(s.files) for s in written.values()),
        splits={split: {"path": outputs[split], "images": s.num_rows, "shards": len(s.files)} for split, s in written.items()},
        bad_skipped=quality["bad"],
        bad_by_reason=quality["bad_by_reason"],
        bad_examples=quality["bad_examples"],
        ignored_non_image_files=ignored,
    )
    check_bad_fraction(quality, config.max_bad_fraction, f"prepare {src}")
    if quality["bad"]:  # on the console too, not only in the JSON line
        first = summary["bad_examples"][0]
        log.warning(f"prepare: skipped {quality['bad']:,} image(s) that do not decode ("
                    + ", ".join(f"{count} {reason}" for reason, count in quality["bad_by_reason"].items())
                    + f"; e.g. {first['id']}: {first['reason']}); the JSON line's bad_examples names up to "
                    f"{len(summary['bad_examples'])}")
    return summary


def _image_count(src: str, source: Source) -> int:
    if source.kind == "sample":
        return sum(t.num_rows for t in sample_tables(src.split(":", 1)[1]).values())
    if source.kind == "folder":
        return len(source.images)
    return find_shards(src).num_rows


def _write_splits(src: str, out: str, source: Source, config: PrepareConfig, summary: dict,
                  validate: dict) -> tuple[dict[str, str], int]:
    """Write the shards of every split: ({split: folder}, non-image files ignored)."""
    if source.kind == "sample":
        return _write_sample(src.split(":", 1)[1], out, config, summary, validate), 0
    if source.kind == "folder":
        return _write_folder(source, out, config, summary, validate), source.ignored
    return _write_parquet(src, out, config, validate), 0


def _write_sample(name: str, out: str, config: PrepareConfig, summary: dict, validate: dict) -> dict[str, str]:
    tables = sample_tables(name)
    for split, table in tables.items():
        mean_bytes = table.column("image").nbytes / table.num_rows
        rows = max(1, int(config.shard_mb * MB / mean_bytes))
        blocks = [table.slice(start, rows) for start in range(0, table.num_rows, rows)]
        dataset = ray.data.from_arrow(blocks).map_batches(_to_shard_rows, **validate)
        _write(dataset, f"{out}/{split}", mean_bytes, config)
        write_classes(f"{out}/{split}", CLASS_NAMES)
    summary["classes"] = CLASS_NAMES
    return {split: f"{out}/{split}" for split in tables}


def _write_folder(source: Source, out: str, config: PrepareConfig, summary: dict, validate: dict) -> dict[str, str]:
    filesystem, root, images = source.filesystem, source.root, source.images
    class_names = sorted(
        {posixpath.relpath(e.path, root).split("/")[0] for e in images if "/" in posixpath.relpath(e.path, root)}
    )
    class_index = {name: i for i, name in enumerate(class_names)}
    # Folders are sorted by class; shards written in that order would feed a bounded shuffle
    # buffer batches of a few classes. A seeded random order mixes them once, for every pass.
    paths = [e.path for e in images]
    random.Random(0).shuffle(paths)
    outputs, groups = {"all": out}, {"all": paths}
    if config.test_fraction:
        held_out = held_out_images(source, config.test_fraction)
        groups = {"train": [p for p in paths if p not in held_out], "test": [p for p in paths if p in held_out]}
        outputs = {split: f"{out}/{split}" for split in groups}
    mean_bytes = sum(e.size for e in images) / len(images)
    for split, members in groups.items():
        dataset = ray.data.read_binary_files(members, filesystem=filesystem, include_paths=True).map_batches(
            _with_folder_labels, fn_kwargs=dict(root=root, class_index=class_index), batch_format="pyarrow")
        _write(dataset.map_batches(_to_shard_rows, **validate), outputs[split], mean_bytes, config)
        if class_names:
            write_classes(outputs[split], class_names)
    if class_names:
        summary["classes"] = class_names
    return outputs


def _write_parquet(src: str, out: str, config: PrepareConfig, validate: dict) -> dict[str, str]:
    shards = find_shards(src)
    mean_bytes = sum(shards.filesystem.get_file_info(f).size for f in shards.files) / max(shards.num_rows, 1)
    dataset = ray.data.read_parquet(shards.files, filesystem=shards.filesystem, include_paths=not shards.has_id)
    keep = ["image", "id" if shards.has_id else "path"] + (["label"] if shards.has_label else [])
    dataset = dataset.select_columns(keep).map_batches(_with_hf_columns, batch_format="pyarrow")
    dataset = dataset.map_batches(_to_shard_rows, **validate)
    if not config.test_fraction:
        _write(dataset, out, mean_bytes, config)
        return {"all": out}
    held = pa.array(sorted(held_out_ids(src, config.test_fraction)), pa.string())  # one pass per split
    outputs = {"train": f"{out}/train", "test": f"{out}/test"}
    classes = read_classes(src) if not src.endswith(".parquet") else None
    for split, folder in outputs.items():
        part = dataset.map_batches(_in_split, fn_kwargs=dict(held=held, test=split == "test"), batch_format="pyarrow")
        _write(part, folder, mean_bytes, config)
        if classes:
            write_classes(folder, classes)
    return outputs
