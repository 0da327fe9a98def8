"""The curation report's picture: top-level cluster sizes before and after, and a few of each
cluster's selected images."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipelines.curate.balance import CLUSTERS_FILE
from pipelines.images.decode import BadImage, decode_canvas, image_bytes
from pipelines.images.shards import find_shards

PICTURE = "clusters.png"
SHOWN_CLUSTERS, SHOWN_IMAGES, CELL = 12, 8, 40  # the grid: largest clusters, images per cluster, pixels


def cluster_examples(clusters_file: str, filesystem, per_cluster: int) -> dict[int, list[str]]:
    """The first `per_cluster` selected ids of each top-level cluster, in file order."""
    examples: dict[int, list[str]] = {}
    columns = ["id", "cluster", "selected"]
    for batch in pq.ParquetFile(clusters_file, filesystem=filesystem).iter_batches(columns=columns):
        for item, cluster, chosen in zip(*(batch.column(name).to_pylist() for name in ("id", "cluster", "selected"))):
            if chosen and len(examples.setdefault(cluster, [])) < per_cluster:
                examples[cluster].append(item)
    return examples


def example_canvases(shards_location: str, wanted: set[str]) -> dict[str, np.ndarray]:
    """CELL-pixel canvases of the images `wanted`, read from the curated shards (one row group at a time)."""
    shards, canvases = find_shards(shards_location), {}
    for path in shards.files:
        for batch in pq.ParquetFile(path, filesystem=shards.filesystem).iter_batches(columns=["id", "image"]):
            for item, value in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist()):
                if item in wanted:
                    try:
                        canvases[item] = decode_canvas(image_bytes(value), CELL)
                    except BadImage:
                        pass
    return canvases


def draw_report(stages, shards_location: str, clusters: dict) -> str:
    """Writes `clusters.png` under the stages' folder: images per top-level cluster before and after
    (largest first), and a grid of selected images of the SHOWN_CLUSTERS largest clusters; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = np.array(clusters["before"]), np.array(clusters["after"])
    order = np.argsort(-before, kind="stable")
    examples = cluster_examples(stages.path(CLUSTERS_FILE), stages.filesystem, SHOWN_IMAGES)
    shown = [int(c) for c in order[:SHOWN_CLUSTERS] if c in examples]
    canvases = example_canvases(shards_location, {item for c in shown for item in examples[c]})
    grid = np.full((max(1, len(shown)) * CELL, SHOWN_IMAGES * CELL, 3), 255, dtype=np.uint8)
    for row, cluster in enumerate(shown):
        for column, item in enumerate(item for item in examples[cluster] if item in canvases):
            grid[row * CELL:(row + 1) * CELL, column * CELL:(column + 1) * CELL] = canvases[item]

    figure, (sizes, images) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.45 * len(shown) + 1.5)),
                                           gridspec_kw={"width_ratios": [1.3, 1]})
    positions = np.arange(len(order))
    sizes.bar(positions - 0.2, before[order], width=0.4, label=f"before ({before.sum():,})")
    sizes.bar(positions + 0.2, after[order], width=0.4, label=f"after ({after.sum():,})")
    sizes.set_xlabel("top-level cluster (largest first)")
    sizes.set_ylabel("images")
    sizes.set_title("images per top-level cluster, without duplicates")
    sizes.legend()
    images.imshow(grid)
    images.set_yticks([(row + 0.5) * CELL for row in range(len(shown))], [f"cluster {c}" for c in shown])
    images.set_xticks([])
    images.set_title(f"selected images of the {len(shown)} largest clusters")
    figure.tight_layout()
    with stages.filesystem.open_output_stream(stages.path(PICTURE)) as stream:
        figure.savefig(stream, format="png", dpi=100)
    plt.close(figure)
    return stages.location_of(PICTURE)
