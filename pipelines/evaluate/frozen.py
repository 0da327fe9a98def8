"""`selfsup eval`: a checkpoint's frozen encoder scored by kNN or a linear probe on labeled shards,
beside the floors (the random-init encoder of the same architecture, raw pixels)."""

from __future__ import annotations

import math

from pipelines.console import Progress
from pipelines.evaluate.features import PIXELS, Encoder, extract
from pipelines.evaluate.knn import knn_top1
from pipelines.evaluate.linear import linear_probe_top1
from pipelines.weights.checkpoint import load_checkpoint


def evaluate_checkpoint(path: str, train: str, test: str, protocol: str = "knn", baselines: bool = True,
                        also: tuple[str, ...] = ()) -> dict:
    """kNN or linear top-1 of a checkpoint's encoder (`top1`); with `baselines`, the same for the
    random-init encoder of the same architecture (`random_init_top1`, the floor) and for raw
    pixels (`raw_pixels_top1`). Each protocol in `also` is scored on the same features too, under
    its own key (`{"linear": {...}}`)."""
    method, config = load_checkpoint(path)
    return {"checkpoint": path, **evaluate_method(method, config, train, test, protocol, baselines, also)}


def evaluate_method(method, config, train: str, test: str, protocol: str = "knn", baselines: bool = True,
                    also: tuple[str, ...] = ()) -> dict:
    """`evaluate_checkpoint` of a method already built (e.g. encoder weights trained elsewhere,
    loaded with `method.init_encoder`), with `config` its run config."""
    encoders = (Encoder("top1", {k: v.cpu() for k, v in method.state_dict().items()}),
                *((Encoder("random_init_top1"),) if baselines else ()))
    columns = {encoder.name: encoder.name for encoder in encoders} | ({"raw_pixels_top1": PIXELS} if baselines else {})

    def score(name: str, column: str) -> float:
        args = (train_set[column], train_set["label"], test_set[column], test_set["label"])
        if name == "knn":
            return knn_top1(*args, config.train.knn_k, config.train.knn_temperature)
        return linear_probe_top1(*args)

    results, done, sets = {}, 0, []
    # The feature passes and a linear probe of raw pixels take tens of seconds each on a CPU: say so while they run.
    stages = 2 + len(columns) * (1 + len(also))
    with Progress("eval: feature passes and probes", stages, unit="stages").watching(lambda: done):
        for location in (train, test):
            sets.append(extract(location, config, encoders, pixels=baselines))
            done += 1
        train_set, test_set = sets
        for name in (protocol, *also):
            results[name] = {}
            for key, column in columns.items():
                results[name][key] = score(name, column)
                done += 1
    images = len(test_set["label"])
    return {"protocol": protocol, "method": config.method, **results[protocol], "test_images": images,
            "top1_margin_95": top1_margin(results[protocol]["top1"], images),
            **{other: results[other] for other in also}}


# The normal quantile of a two-sided 95% interval.
Z_95 = 1.959964


def top1_margin(top1: float, images: int, z: float = Z_95) -> float:
    """Half the width of the 95% Wilson score interval (Wilson, JASA 1927) of a top-1 measured on
    `images` test images: how far the same encoder's top-1 on another test set of that size may
    land. On 40 images it is about 0.15, so floors within it say nothing yet."""
    if images < 1:
        raise ValueError(f"top1_margin: needs at least one test image, got {images}")
    spread = top1 * (1 - top1) / images + z * z / (4 * images * images)
    return z / (1 + z * z / images) * math.sqrt(spread)


def result_line(result: dict) -> str:
    """The console's one line for an eval result: the encoder's top-1, the floors beside it and
    the margin a test set of this size allows."""
    floors = "".join(f" | {name} {result[key]:.3f}" for key, name in
                     (("random_init_top1", "random-init encoder"), ("raw_pixels_top1", "raw pixels")) if key in result)
    return (f"eval {result['protocol']}: top-1 {result['top1']:.3f}{floors}; each within about "
            f"±{result['top1_margin_95']:.2f} (95%) on {result['test_images']:,} test images")
