"""Frozen-feature evaluation: weighted kNN and a linear probe, plus feature extraction with
Ray Data batch inference for the offline `selfsup eval`."""

from __future__ import annotations

import math

import numpy as np
import ray
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.checkpoint import build_method, load_checkpoint
from pipelines.console import Progress
from pipelines.ingest import IngestConfig, image_dataset
from pipelines.shards import find_shards


@torch.no_grad()
def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN on L2-normalised features, as DINO's `eval_knn` (Wu et al. 2018): the k most
    cosine-similar training samples vote for their class with weight exp(sim / T).

    `train_features: (n, d)`, `train_labels: (n,)`, `test_features: (m, d)` -> top-1 accuracy.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        similarity = test[start : start + chunk] @ train.T
        top_sim, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_index], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk]).sum().item()
    return correct / len(test)


def linear_probe_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      test_labels: torch.Tensor, epochs: int = 100, batch_size: int = 256, lr: float = 0.01,
                      weight_decay: float = 1e-4, batch_norm: bool = True, seed: int = 0) -> float:
    """A linear classifier trained on frozen features, top-1 on the test features.

    With `batch_norm` the features first go through BatchNorm without affine parameters (MAE's
    linear-probe protocol; harmless for other methods, and it makes one learning rate fit all).
    AdamW with a cosine schedule; deterministic for a seed.
    """
    generator = torch.Generator().manual_seed(seed)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    dim = train_features.shape[1]
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False) if batch_norm else nn.Identity(),
                          nn.Linear(dim, classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_features) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    x, y = train_features.float(), train_labels
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:
                continue
            loss = F.cross_entropy(probe(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        return (probe(test_features.float()).argmax(1) == test_labels).float().mean().item()


def embedding_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """Collapse indicator as a 0-d tensor (no host sync): std over the batch of L2-normalised
    embeddings, averaged over dimensions, times sqrt(d). About 1 for spread-out embeddings; -> 0
    when they collapse."""
    normalised = F.normalize(embeddings.detach().float(), dim=1)
    return normalised.std(dim=0).mean() * math.sqrt(normalised.shape[1])


def embedding_std(embeddings: torch.Tensor) -> float:
    """`embedding_spread` as a number."""
    return embedding_spread(embeddings).item()


def split_bank_queries(keys: torch.Tensor, every: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic bank/query split of a labeled set by record key: key % every == 0 -> query."""
    query = keys % every == 0
    return ~query, query


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


def evaluate_checkpoint(path: str, train: str, test: str, protocol: str = "knn", baselines: bool = True,
                        also: tuple[str, ...] = ()) -> dict:
    """kNN or linear top-1 of a checkpoint's encoder; with `baselines`, the same for the
    random-init encoder of the same architecture (the floor) and for raw pixels. Each protocol
    in `also` is scored on the same features too, under its own key (`{"linear": {...}}`)."""
    method, config = load_checkpoint(path)
    encoders = {"top1": {k: v.cpu() for k, v in method.state_dict().items()}}
    if baselines:
        encoders["random_init_top1"] = None
    factory = lambda: build_method(config)  # noqa: E731
    sets = [extract(s, factory, encoders, config.data.canvas_size, with_pixels=baselines) for s in (train, test)]
    if baselines:
        encoders["raw_pixels_top1"] = "pixels"

    done = [0]

    def scores(protocol):
        def score(name):
            key = "pixels" if name == "raw_pixels_top1" else name
            args = (sets[0][key], sets[0]["label"], sets[1][key], sets[1]["label"])
            value = (knn_top1(*args, config.train.knn_k, config.train.knn_temperature) if protocol == "knn"
                     else linear_probe_top1(*args))
            done[0] += 1
            return value

        return {name: score(name) for name in encoders}

    # A linear probe of raw pixels takes tens of seconds on a CPU: say so while it runs.
    with Progress("eval: scored", len(encoders) * (1 + len(also)), unit="probes").watching(lambda: done[0]):
        return {"protocol": protocol, "checkpoint": path, "method": config.method, **scores(protocol),
                **{other: scores(other) for other in also}}
