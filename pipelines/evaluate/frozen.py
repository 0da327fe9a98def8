"""`selfsup eval`: a checkpoint's frozen encoder scored by kNN or a linear probe on labeled shards,
beside the floors (the random-init encoder of the same architecture, raw pixels)."""

from __future__ import annotations

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
    train_set, test_set = (extract(location, config, encoders, pixels=baselines) for location in (train, test))
    columns = {encoder.name: encoder.name for encoder in encoders} | ({"raw_pixels_top1": PIXELS} if baselines else {})

    def score(name: str, column: str) -> float:
        args = (train_set[column], train_set["label"], test_set[column], test_set["label"])
        if name == "knn":
            return knn_top1(*args, config.train.knn_k, config.train.knn_temperature)
        return linear_probe_top1(*args)

    results, done = {}, 0
    # A linear probe of raw pixels takes tens of seconds on a CPU: say so while it runs.
    with Progress("eval: scored", len(columns) * (1 + len(also)), unit="probes").watching(lambda: done):
        for name in (protocol, *also):
            results[name] = {}
            for key, column in columns.items():
                results[name][key] = score(name, column)
                done += 1
    return {"protocol": protocol, "method": config.method, **results[protocol],
            **{other: results[other] for other in also}}
