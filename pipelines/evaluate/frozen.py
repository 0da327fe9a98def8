"""`selfsup eval`: a checkpoint's frozen encoder scored by kNN or a linear probe on labeled shards,
beside the floors (the random-init encoder of the same architecture, raw pixels)."""

from __future__ import annotations

from pipelines.console import Progress
from pipelines.evaluate.features import extract
from pipelines.evaluate.knn import knn_top1
from pipelines.evaluate.linear import linear_probe_top1
from pipelines.weights.checkpoint import load_checkpoint
from pipelines.config import build_method


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

