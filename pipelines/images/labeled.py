"""Labeled shards for fine-tuning: which records a few-label run trains on, chosen the same way on
every machine, and the checks that refuse a labeled set it cannot use, before Ray starts.

The subset is the semi-supervised protocol of SimCLR (1 % / 10 % of the labels) and of MAE's
low-shot fine-tuning: per class, the records that rank first by the CRC-32 of their id, which is
the ranking `selfsup prepare --test-fraction` splits by (`rank_by_record_id`), so a 10-per-class
set is the same on every machine, independent of shard order, and grows by adding records.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.expressions import col

from pipelines.images.decode_tasks import record_key
from pipelines.images.ingest import image_dataset
from pipelines.images.shards import DataError, find_shards


def rank_by_record_id(records: list[str]) -> list[str]:
    """`records` ordered by the CRC-32 of the id (ties by the id): a deterministic shuffle that
    any machine repeats. The CRC-32 is also the `key` column of labeled batches (`record_key`)."""
    return sorted(records, key=lambda record: (record_key(record), record))


@dataclass(frozen=True)
class LabeledSet:
    """The labeled records a fine-tuning run trains on.

    Attributes:
        location: the shards.
        ids: the chosen records' ids, or None for every labeled record.
        rows: images in the run.
        per_class: images per class label in the run.
        num_classes: the classifier's outputs (largest label + 1).
    """

    location: str
    ids: tuple[str, ...] | None
    rows: int
    per_class: dict[int, int]
    num_classes: int


def read_labels(location: str, flag: str) -> tuple[list[str], list[int]]:
    """(record ids, labels) of the labeled records under `location`, reading only those two
    columns; refuses shards without labels (named by `flag`)."""
    shards = find_shards(location)
    if not shards.has_label:
        raise DataError(f"{flag} {location}: the shards have no `label` column; fine-tuning needs labeled shards "
                        "(`selfsup prepare` writes one from class subfolders)")
    columns = ["label"] + (["id"] if shards.has_id else [])
    ids, labels = [], []
    for file in shards.files:
        table = pq.read_table(file, columns=columns, filesystem=shards.filesystem)
        known = pc.is_valid(table.column("label"))
        table = table.filter(known)
        labels.extend(int(v) for v in table.column("label").to_pylist())
        ids.extend([str(v) for v in table.column("id").to_pylist()] if shards.has_id else [""] * len(table))
    if not labels:
        raise DataError(f"{flag} {location}: no record has a label")
    if min(labels) < 0:
        raise DataError(f"{flag} {location}: label {min(labels)} is negative; labels must be class indices >= 0")
    return ids, labels


def labeled_subset(location: str, labels_per_class: int | None = None,
                   label_fraction: float | None = None) -> LabeledSet:
    """The records of `location` a fine-tuning run trains on: all labeled ones, or per class the
    first `labels_per_class` (or round(`label_fraction` x its count), at least 1) by
    `rank_by_record_id`. Raises DataError, in one line, when a class has fewer images than asked
    or the shards have no ids to choose by."""
    if labels_per_class is not None and label_fraction is not None:
        raise DataError("--labels-per-class and --label-fraction: give one of them")
    ids, labels = read_labels(location, "--data")
    by_class: dict[int, list[str]] = {}
    for record, label in zip(ids, labels):
        by_class.setdefault(label, []).append(record)
    num_classes = max(by_class) + 1
    if labels_per_class is None and label_fraction is None:
        return LabeledSet(location, None, len(labels), {c: len(m) for c, m in sorted(by_class.items())}, num_classes)
    if not all(ids):
        raise DataError(f"--data {location}: the shards have no `id` column to choose labeled records by; "
                        f"write them with `selfsup prepare {location} --out FOLDER` first")
    chosen: dict[int, list[str]] = {}
    for label, members in sorted(by_class.items()):
        want = labels_per_class if labels_per_class is not None else max(1, round(label_fraction * len(members)))
        if want > len(members):
            raise DataError(f"--labels-per-class {labels_per_class}: class {label} has only {len(members)} labeled "
                            f"images in {location}")
        chosen[label] = rank_by_record_id(members)[:want]
    ids = tuple(sorted(record for members in chosen.values() for record in members))
    return LabeledSet(location, ids, len(ids), {c: len(m) for c, m in chosen.items()}, num_classes)


def check_test_classes(test: str, train: LabeledSet) -> int:
    """The test shards' labeled image count; refuses, in one line, a test set missing a class
    the run trains on or holding a class it never sees."""
    _, labels = read_labels(test, "--test")
    present, trained = set(labels), set(train.per_class)
    if trained - present:
        raise DataError(f"--test {test}: class {min(trained - present)} is in the training labels but has no "
                        "test image")
    if present - trained:
        raise DataError(f"--test {test}: class {min(present - trained)} has test images but none in --data "
                        f"{train.location}")
    return len(labels)


# Decoded canvases up to this size are decoded once and kept in Ray's object store for every
# epoch: a few-label run's pass is otherwise all reading and decoding (docs/BENCHMARKS.md, "Fine-tuning").
KEEP_DECODED_BYTES = 256 * 2**20


def labeled_dataset(labeled: LabeledSet, config, quality_log):
    """The training stream of `labeled`'s records (`image_dataset` rows with `label` and `key`):
    only the chosen records are read and decoded; records without a label are dropped. A set
    whose canvases fit in `KEEP_DECODED_BYTES` is decoded once, here, and kept."""
    dataset, _ = image_dataset(labeled.location, config, quality_log, with_labels=True, stop_early=True,
                               only_ids=labeled.ids)
    dataset = dataset.filter(expr=col("label") >= 0)
    if labeled.rows * config.canvas_size**2 * 3 <= KEEP_DECODED_BYTES:
        dataset = dataset.materialize()
    return dataset
