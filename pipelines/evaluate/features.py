"""Features of an encoder: on the training worker from batches it already holds
(`collect_features`), and over shards by Ray Data batch inference in an actor that holds the
encoders once (`FeatureExtractor`, used by `extract` for `selfsup eval` and by `selfsup embed`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import ray
import torch

from pipelines.config import RunConfig, build_method, config_from_dict
from pipelines.console import Progress
from pipelines.images.ingest import IngestConfig, image_dataset
from pipelines.images.shards import find_shards


def autocast_for(precision: str, device: torch.device):
    """(autocast context, whether fp16 needs a GradScaler) for `precision`: `auto` (bf16 on a
    GPU, fp32 on a CPU), `bf16`, `fp16` or `fp32`."""
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


PIXELS = "pixels"  # the column of raw pixels, the floor every encoder is scored against


@dataclass(frozen=True)
class Encoder:
    """One encoder of a `FeatureExtractor`: `name` keys its features (and its score); `weights` is
    a method state dict, or None for the seeded random init of the same architecture (the floor)."""

    name: str
    weights: dict[str, torch.Tensor] | None = None


class FeatureExtractor:
    """Ray Data batch-inference actor: builds the run config's method once per encoder (same
    architecture, different weights) and turns each batch of canvases into every encoder's
    features, `features(eval_images(canvases))`, under `precision`'s autocast. Columns named in
    `carry` pass through when the batch has them; with `pixels`, raw pixels too (`PIXELS`)."""

    def __init__(self, config: dict, encoders: tuple[Encoder, ...], precision: str = "fp32", pixels: bool = False,
                 carry: tuple[str, ...] = ("label", "key")):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.methods, run_config = {}, config_from_dict(config)
        for encoder in encoders:
            method = build_method(run_config)  # seeded: the same random init every time
            if encoder.weights is not None:
                method.load_state_dict(encoder.weights)
            self.methods[encoder.name] = method.to(self.device).eval()
        self.autocast, _ = autocast_for(precision, self.device)
        self.pixels, self.carry = pixels, carry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data's arrays are read-only: copied only then, so that torch may own the memory.
        canvases = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"])).to(self.device,
                                                                                          non_blocking=True)
        out = {column: batch[column] for column in self.carry if column in batch}
        with torch.no_grad(), self.autocast:
            for name, method in self.methods.items():
                out[name] = method.features(method.eval_images(canvases)).float().cpu().numpy()
        out.update(self.from_canvases(canvases))
        if self.pixels:
            out[PIXELS] = batch["image"].reshape(len(canvases), -1).astype(np.float32) / 255
        return out

    def from_canvases(self, canvases: torch.Tensor) -> dict[str, np.ndarray]:
        """More columns made from a batch's canvases already on the device (none here; a subclass's)."""
        return {}


def extract(location: str, config: RunConfig, encoders: tuple[Encoder, ...], pixels: bool = False,
            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Every encoder's features (and raw pixels), labels and keys of the labeled shards at
    `location`, decoded to `config`'s canvas, in one Ray Data batch-inference pass (an actor
    holding the encoders; a GPU when the cluster has one)."""
    ingest = IngestConfig(canvas_size=config.data.canvas_size, shuffle_files=False, shuffle_buffer=0)
    dataset, _ = image_dataset(location, ingest, with_labels=True)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    features = dataset.map_batches(
        FeatureExtractor,
        fn_constructor_args=(config.to_dict(), tuple(encoders), "fp32", pixels),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if use_gpu else 0,
    )
    parts, rows = [], 0
    with Progress(f"features of {location}:", find_shards(location).num_rows).watching(lambda: rows):
        for part in features.iter_batches(batch_size=None, batch_format="numpy"):
            parts.append(part)
            rows += len(part["label"])
    return {key: torch.from_numpy(np.concatenate([p[key] for p in parts])) for key in parts[0]}
