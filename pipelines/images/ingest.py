"""Streaming ingest: Parquet shards -> Ray Data -> decoded uint8 canvases on the training device.

The dataset is lazy and streaming: Ray Data reads row groups, decodes them on CPU workers and
hands batches to the consumer under its object-store budget, so memory does not grow with the
dataset. Each pass (epoch) re-reads the shards in a new order; a local shuffle buffer mixes rows
across shards.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import ray
import ray.data
import torch
from ray.data.expressions import col

from methods.checks import check_rules
from pipelines.images.decode import DEFAULT_MAX_PIXELS
from pipelines.images.decode_tasks import MIN_SEEN_FOR_EARLY_STOP, decode_records, report_bad, route_for_device
from pipelines.images.device_decode import device_canvases
from pipelines.images.quality import check_bad_fraction, new_quality_log
from pipelines.images.shards import find_shards

CHECK_EVERY_BATCHES = 50


@dataclass
class IngestConfig:
    """How shards are read and decoded.

    Args:
        canvas_size: side of the square uint8 canvas every image is decoded to (shorter side
            resized, centre kept); views are cropped from it on the device.
        decode_block_mb: decoded canvases per decode task (MB); also bounds read blocks, so
            the first batch arrives before a whole shard is read and every CPU decodes.
        decode_num_cpus: CPUs reserved per read/decode task (fractional leaves room for training).
        shuffle_files: read shards in a new random order each pass.
        shuffle_buffer: rows in the consumer's local shuffle buffer (0 = off).
        max_bad_fraction: stop with an error when more than this fraction fails to decode.
        max_pixels: images with more pixels are refused as decompression bombs.
        seed: seeds shard order (reseeded each pass) and the shuffle buffer; None = random.
        decode: where training JPEGs are decoded: `cpu` (the Ray Data tasks, Pillow) or `gpu`
            (the training worker's GPU, nvJPEG; pipelines/images/device_decode.py). Evaluation sets
            are always decoded on CPU.
        prefetch_batches: training batches made ahead of the step, on the training device, by
            a thread that starts each epoch's pass as soon as the one before is read
            (`EpochStream`), so no epoch starts by waiting for Ray Data to plan it; 0 = none
            (each epoch's pass starts when the loop asks for it). Costs this many batches of
            canvases in device memory.
    """

    canvas_size: int = 64
    decode_block_mb: float = 4.0
    decode_num_cpus: float = 0.5
    shuffle_files: bool = True
    shuffle_buffer: int = 1024
    max_bad_fraction: float = 0.01
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int | None = None
    decode: str = "cpu"
    prefetch_batches: int = 8

    def decode_rows(self) -> int:
        """Rows per decode task: `decode_block_mb` of canvases, between 8 and 8192 rows."""
        return int(min(8192, max(8, self.decode_block_mb * 2**20 // (3 * self.canvas_size**2))))

    def validate(self) -> None:
        check_rules("data", self, {
            "canvas_size": (self.canvas_size >= 4, "an integer >= 4"),
            "decode_block_mb": (self.decode_block_mb > 0, "a number > 0"),
            "decode_num_cpus": (0 < self.decode_num_cpus <= 64, "a number in (0, 64]"),
            "shuffle_buffer": (self.shuffle_buffer >= 0, "an integer >= 0"),
            "max_bad_fraction": (0 <= self.max_bad_fraction <= 1, "a fraction in [0, 1]"),
            "max_pixels": (self.max_pixels >= 1, "an integer >= 1"),
            "decode": (self.decode in ("cpu", "gpu"), "cpu or gpu"),
            "prefetch_batches": (isinstance(self.prefetch_batches, int) and self.prefetch_batches >= 0,
                                 "an integer >= 0"),
        })


def image_dataset(
    location: str, config: IngestConfig, quality_log=None, with_labels: bool = False, with_ids: bool = False,
    stop_early: bool = False, jpeg_on_device: bool = False, only_ids: tuple[str, ...] | None = None,
) -> tuple[ray.data.Dataset, object]:
    """A lazy, streaming dataset of `{"image": (S, S, 3) uint8}` rows; `with_labels` adds
    `"label"` (int64, -1 when null) and `"key"` (int64 hash of the record id); `with_ids` adds
    `"id"` (the record's id string; the shard's path for shards without an id column) and
    `"content_hash"` (`content_hash` of its encoded bytes).
    `stop_early`: a pass over `config.max_bad_fraction` fails in its decode tasks, as soon as
    enough records are seen (for a consumer that reads it with `iter_canvas_batches`).
    `jpeg_on_device`: rows are `route_for_device`'s instead, for `iter_canvas_batches` with
    `config.decode == "gpu"` to decode on the training device (no labels or ids).
    `only_ids`: only the records with these ids (filtered in the read tasks' blocks, so the
    others are never decoded; the shards need an `id` column).

    Returns the dataset and the `QualityLog` actor that counts skipped records.
    """
    config.validate()
    shards = find_shards(location)
    quality_log = quality_log or new_quality_log()
    shuffle = ray.data.FileShuffleConfig(seed=config.seed) if config.shuffle_files else None
    if only_ids is not None and not shards.has_id:
        raise ValueError(f"{location}: the shards have no `id` column to select records by")
    dataset = ray.data.read_parquet(
        shards.files,
        filesystem=shards.filesystem,
        shuffle=shuffle,
        include_paths=not shards.has_id,
        num_cpus=config.decode_num_cpus,
    )
    if only_ids is not None:  # before decoding, in the read tasks' blocks
        dataset = dataset.filter(expr=col("id").is_in(list(only_ids)), num_cpus=config.decode_num_cpus)
    columns = ["image", "id" if shards.has_id else "path"]
    if with_labels and shards.has_label:
        columns.append("label")
    stop_over = config.max_bad_fraction if stop_early else None
    if jpeg_on_device:
        if with_labels or with_ids:
            raise ValueError("jpeg_on_device: a training stream only (no labels or ids)")
        udf, options = route_for_device, {}
    else:
        udf, options = decode_records, dict(with_labels=with_labels, with_ids=with_ids)
    dataset = dataset.select_columns(columns).map_batches(
        udf,
        fn_kwargs=dict(size=config.canvas_size, max_pixels=config.max_pixels, quality_log=quality_log,
                       stop_over=stop_over, **options),
        batch_format="pyarrow",
        batch_size=config.decode_rows(),
        num_cpus=config.decode_num_cpus,
    )
    dataset.context.target_max_block_size = int(config.decode_block_mb * 2**20)
    return dataset, quality_log


def iter_canvas_batches(
    source,
    batch_size: int,
    quality_log,
    config: IngestConfig,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
    where: str = "data",
    epoch: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over a dataset (or a Ray Train dataset shard) as batches of tensors on `device`.

    Checks the bad-record fraction while streaming (once enough records are seen) and at the end
    of the pass; raises `BadDataError` when it is over `config.max_bad_fraction`, also when a
    decode task ended the pass on it (`image_dataset(stop_early=True)`). With `config.decode ==
    "gpu"` the source holds `image_dataset(jpeg_on_device=True)` rows, decoded here on `device`.
    """
    seed = None if config.seed is None else config.seed + epoch
    shuffle = dict(local_shuffle_buffer_size=config.shuffle_buffer or None,
                   local_shuffle_seed=seed if config.shuffle_buffer else None)
    if config.decode == "gpu":
        rows = source.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, **shuffle)
        batches = _decoded_on_device(rows, batch_size, quality_log, config, device, drop_last, where)
    else:
        batches = source.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last, **shuffle)
    try:
        for index, batch in enumerate(batches, start=1):
            if index % CHECK_EVERY_BATCHES == 0:
                check_bad_fraction(
                    ray.get(quality_log.summary.remote()), config.max_bad_fraction, where, MIN_SEEN_FOR_EARLY_STOP
                )
            yield batch
    except Exception:  # also a pass that a decode task stopped (`stop_early`): said as this consumer would
        check_bad_fraction(ray.get(quality_log.summary.remote()), config.max_bad_fraction, where)
        raise
    check_bad_fraction(ray.get(quality_log.summary.remote()), config.max_bad_fraction, where)


class EpochStream:
    """Every epoch's batches, read ahead across epoch boundaries by one background thread.

    Ray Data plans and starts each pass anew (file listing, footers, the first read and decode
    tasks: seconds, docs/BENCHMARKS.md, "One stream across epochs"); a loop that asks for the next
    pass only when its epoch ends waits that long every epoch. Here a thread reads pass after pass
    into a queue of `depth`
    batches: it starts the next pass as soon as the current one is read, while the loop still
    has the queued batches to train on. Passes stay whole: each ends with a marker, so the loop
    sees the same epochs (and the same end-of-pass bad-data checks) as without the thread.

    Args:
        open_pass: `epoch -> iterator` of that epoch's batches (`iter_canvas_batches`).
        epochs: the epochs to read, in order (from a resumed run's epoch to the last).
        depth: batches queued ahead of the loop (>= 1).
    """

    _END = object()  # the current pass is over

    def __init__(self, open_pass: Callable[[int], Iterator[dict]], epochs: range, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._in_pass = False
        self._reader = threading.Thread(target=self._read, args=(open_pass, epochs), name="selfsup-epochs",
                                        daemon=True)
        self._reader.start()

    def _read(self, open_pass, epochs) -> None:
        try:
            for epoch in epochs:
                for batch in open_pass(epoch):
                    if not self._put(batch):
                        return
                if not self._put(self._END):
                    return
        except BaseException as error:  # noqa: BLE001  (raised to the loop where it asks for a batch)
            self._put(error)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next_pass(self) -> Iterator[dict]:
        """The next epoch's batches. What the loop left of the pass before (its epoch can end a
        batch before the pass does) is dropped first."""
        if self._in_pass:
            for _ in self._batches():
                pass
        self._in_pass = True
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._in_pass = False
                raise item
            if item is self._END:
                self._in_pass = False
                return
            yield item

    def close(self) -> None:
        self._stop.set()


def _decoded_on_device(rows, batch_size: int, quality_log, config: IngestConfig, device, drop_last: bool,
                       where: str) -> Iterator[dict[str, torch.Tensor]]:
    """`route_for_device` rows -> `{"image": canvases}` batches of exactly `batch_size` on `device`
    (but a short last one when not `drop_last`): a JPEG that fails here leaves a gap that the next
    rows fill, so every step keeps the planned batch."""
    held = None  # canvases decoded and not yet yielded
    for batch in rows:
        canvases, bad = device_canvases(batch, config.canvas_size, device, config.max_pixels)
        if bad:  # seen already counted by the decode task that routed them
            report_bad(quality_log, 0, bad, config.max_bad_fraction, where)
        held = canvases if held is None or not len(held) else torch.cat([held, canvases])
        while len(held) >= batch_size:
            yield {"image": held[:batch_size]}
            held = held[batch_size:]
    if held is not None and len(held) and not drop_last:
        yield {"image": held}
