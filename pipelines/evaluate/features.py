"""Features of an encoder: on the training worker from batches it already holds
(`collect_features`), and over labeled shards by Ray Data batch inference (`extract`)."""

from __future__ import annotations

import contextlib

import numpy as np
import ray
import torch

from pipelines.console import Progress
from pipelines.data.ingest import IngestConfig, image_dataset
from pipelines.data.shards import find_shards


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), precision == "fp16"


def collect_features(batches, method, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, labels and keys of every batch `{"image", "label", "key"}` (eval mode, no grad)."""
    features, labels, keys = [], [], []
    was_training = method.training
    method.eval()
    with torch.no_grad():
        for batch in batches:
            images = method.eval_images(batch["image"].to(device))
            features.append(method.features(images).float().cpu())
            labels.append(batch["label"].cpu())
            keys.append(batch["key"].cpu())
    method.train(was_training)
    return torch.cat(features), torch.cat(labels), torch.cat(keys)


class FeatureExtractor:
    """Ray Data batch-inference actor: holds one or more encoders (same architecture, different
    weights) and turns each batch of canvases into every encoder's features, plus raw pixels."""

    def __init__(self, method_factory, state_dicts: dict, with_pixels: bool):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.methods = {}
        for name, state_dict in state_dicts.items():
            method = method_factory()  # seeded: the same random init every time
            if state_dict is not None:
                method.load_state_dict(state_dict)
            self.methods[name] = method.to(self.device).eval()
        self.with_pixels = with_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data's arrays are read-only: copied only then, so that torch may own the memory.
        canvases = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"])).to(self.device)
        out = {"label": batch["label"], "key": batch["key"]}
        with torch.no_grad():
            for name, method in self.methods.items():
                out[name] = method.features(method.eval_images(canvases)).float().cpu().numpy()
        if self.with_pixels:
            out["pixels"] = batch["image"].reshape(len(canvases), -1).astype(np.float32) / 255
        return out


def extract(location: str, method_factory, state_dicts: dict, canvas_size: int, with_pixels: bool = False,
            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Every encoder's features (and raw pixels), labels and keys of a labeled shard set, in one
    Ray Data batch-inference pass (an actor holding the encoders; a GPU when the cluster has one)."""
    config = IngestConfig(canvas_size=canvas_size, shuffle_files=False, shuffle_buffer=0)
    dataset, _ = image_dataset(location, config, with_labels=True)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    features = dataset.map_batches(
        FeatureExtractor,
        fn_constructor_args=(method_factory, state_dicts, with_pixels),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if use_gpu else 0,
    )
    parts, rows = [], [0]
    with Progress(f"features of {location}:", find_shards(location).num_rows).watching(lambda: rows[0]):
        for part in features.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(part)
            rows[0] += len(part["label"])
    return {key: torch.from_numpy(np.concatenate([p[key] for p in parts])) for key in parts[0]}

