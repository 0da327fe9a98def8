"""Batch inference: a checkpoint's encoder over Parquet image shards -> embeddings as Parquet.

One streaming Ray Data pipeline, like ingest: read and decode on CPU tasks, embed in an
autoscaling pool of actors that each hold the model once (one GPU per actor when the cluster
has GPUs), write Parquet as batches finish. Nothing is collected on the driver, so it scales
with the cluster, not with the driver's memory. Each output row is `id` (string, from the
shard), `embedding` (`fixed_size_list<float32>[d]`, readable by pyarrow/pandas/polars without
Ray), `content_hash` (of the encoded bytes, `decode_tasks.content_hash`), `label` when the
shards have one and, when asked, `thumbnail` (a small grey copy of the image, which `selfsup
curate` compares pixel by pixel). Undecodable images are skipped and counted.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale

from pipelines.console import Progress
from pipelines.evaluate.features import Encoder, FeatureExtractor
from pipelines.images.decode_tasks import CONTENT_HASH
from pipelines.images.ingest import IngestConfig, image_dataset
from pipelines.images.shards import DataError, check_output_folder, find_shards, parquet_files, resolve_location
from pipelines.weights.checkpoint import load_checkpoint, load_state

SUMMARY_FILE = "_embeddings.json"
EMBEDDING = "embedding"  # the column of each row's features
THUMBNAIL = "thumbnail"  # the column of each row's grey thumbnail, when asked for
THUMBNAIL_SIDE = 32


def thumbnails(canvases: torch.Tensor) -> torch.Tensor:
    """(n, THUMBNAIL_SIDE**2) uint8 grey thumbnails of (n, h, w, 3) uint8 canvases."""
    grey = rgb_to_grayscale(canvases.permute(0, 3, 1, 2).float() / 255)
    small = F.interpolate(grey, size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE), mode="bilinear", antialias=True,
                          align_corners=False)
    return (small * 255).round().clamp(0, 255).to(torch.uint8).flatten(1)


class Embedder(FeatureExtractor):
    """Ray Data actor: the checkpoint's encoder as a `FeatureExtractor`, its output a Parquet-ready
    table of `id`, `embedding` (`fixed_size_list<float32>[d]`), `content_hash`, `label` when the
    shards have it and `thumbnail` (`fixed_size_list<uint8>[THUMBNAIL_SIDE**2]`) with `with_thumbnails`."""

    def __init__(self, config: dict, method_state: dict, precision: str, with_thumbnails: bool = False):
        super().__init__(config, (Encoder(EMBEDDING, method_state),), precision, carry=("id", CONTENT_HASH, "label"))
        self.with_thumbnails = with_thumbnails

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        out = super().__call__(batch)
        features = out[EMBEDDING]
        columns = {
            "id": pa.array(out["id"].tolist(), pa.string()),
            EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1]),
            CONTENT_HASH: pa.array(out[CONTENT_HASH].tolist(), pa.string()),
        }
        if "label" in out:
            columns["label"] = pa.array(out["label"], pa.int64())
        if self.with_thumbnails:
            small = out[THUMBNAIL]
            columns[THUMBNAIL] = pa.FixedSizeListArray.from_arrays(pa.array(small.reshape(-1)), small.shape[1])
        return pa.table(columns)

    def from_canvases(self, canvases: torch.Tensor) -> dict[str, np.ndarray]:
        return {THUMBNAIL: thumbnails(canvases).cpu().numpy()} if self.with_thumbnails else {}


def embeddable_shards(data: str):
    """The shards at `data`, refused when they have no `id` column to carry into the embeddings."""
    shards = find_shards(data)
    if not shards.has_id:
        raise DataError(f"--data {data}: shards have no `id` column to carry into the embeddings; "
                        "write them with `selfsup prepare` first")
    return shards


def embed(checkpoint: str, data: str, out: str, batch_size: int = 256, actors: int | None = None,
          gpus_per_actor: float | None = None, precision: str = "auto", overwrite: bool = False,
          shards=None, encoder: tuple | None = None, with_thumbnails: bool = False) -> dict:
    """Embed every image of the shards at `data` with `checkpoint`'s encoder into Parquet at `out`.

    Args:
        batch_size: images per model call.
        actors: most model-holding actors (default: one per GPU, else CPUs / 2, at least 1).
        gpus_per_actor: GPUs each actor reserves (default 1 when the cluster has GPUs, else 0).
        precision: autocast for the forward pass (`auto` = bf16 on GPU, fp32 on CPU).
        shards: `embeddable_shards(data)`, when the caller has it.
        encoder: (method, RunConfig) already built, used instead of reading `checkpoint` (which then
            only names the weights in the summary).
        with_thumbnails: also write each image's `thumbnail` (1 KB a row).
    Returns the summary printed as the command's JSON line (rows, dimension, skipped records).
    """
    method, config = encoder or load_checkpoint(checkpoint, load_state(checkpoint))
    shards = shards or embeddable_shards(data)
    check_output_folder(out, overwrite)

    resources = ray.cluster_resources()
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if actors is None:
        actors = int(resources.get("GPU", 0) // gpus_per_actor) if gpus_per_actor else int(resources.get("CPU", 2) // 2)
    ingest = IngestConfig(canvas_size=config.data.canvas_size, shuffle_files=False, shuffle_buffer=0,
                          max_bad_fraction=config.data.max_bad_fraction)
    dataset, quality_log = image_dataset(data, ingest, with_labels=shards.has_label, with_ids=True)
    embedded = dataset.map_batches(
        Embedder,
        fn_constructor_args=(config.to_dict(), {k: v.cpu() for k, v in method.state_dict().items()}, precision,
                             with_thumbnails),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_gpus=gpus_per_actor,
    )
    seen = lambda: ray.get(quality_log.summary.remote())["seen"]  # noqa: E731
    with Progress("embed:", shards.num_rows).watching(seen):
        embedded.write_parquet(out)

    quality = ray.get(quality_log.summary.remote())
    filesystem, files = parquet_files(out)
    root = resolve_location(out)[1]
    rows = sum(pq.ParquetFile(f, filesystem=filesystem).metadata.num_rows for f in files)
    probe = torch.zeros(2, config.data.canvas_size, config.data.canvas_size, 3, dtype=torch.uint8)
    dim = int(method.eval().features(method.eval_images(probe)).shape[1])
    summary = {
        "out": out, "rows": rows, "files": len(files), "dimension": dim, "method": config.method,
        "checkpoint": checkpoint, "images_seen": quality["seen"], "bad_skipped": quality["bad"],
        "bad_by_reason": quality["bad_by_reason"], "bad_examples": quality["bad_examples"],
    }
    with filesystem.open_output_stream(os.path.join(root, SUMMARY_FILE)) as stream:
        stream.write(json.dumps(summary, indent=1).encode())
    return summary
