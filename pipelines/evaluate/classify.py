"""Top-1 of a classifier (a fine-tuned encoder with its head) on labeled shards."""

from __future__ import annotations

import torch

from pipelines.evaluate.features import collect_features
from pipelines.images.ingest import IngestConfig, image_dataset


def classifier_top1(model, location: str, canvas_size: int, batch_size: int = 256) -> float:
    """The share of labeled images in `location` whose highest class score (`model.features` of
    `model.eval_images`, the whole canvas) is their label; images without a label are left out."""
    ingest = IngestConfig(canvas_size=canvas_size, shuffle_files=False, shuffle_buffer=0)
    dataset, _ = image_dataset(location, ingest, with_labels=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    scores, labels, _ = collect_features(dataset.iter_torch_batches(batch_size=batch_size), model, device)
    known = labels >= 0
    return (scores[known].argmax(dim=1) == labels[known]).float().mean().item()
