"""Tiny run configs on sample:digits, shared by the tests that train (see conftest's run fixtures),
and a reader of the TensorBoard files runs write."""

import os

from methods import METHODS
from pipelines.config import build_config, pinned_config

COMMON = {"data.canvas_size": 16, "data.decode_num_cpus": 0.25, "optim.batch_size": 64, "train.knn_every_epochs": 1,
          "train.probe_size": 256}
TINY = {name: cls.smoke_sets for name, cls in METHODS.items()}  # every registered method, at 16 px
STEPS_PER_EPOCH = 1438 // 64  # sample:digits train split, global batch 64


def tiny_config(method="simclr", **sets):
    """The smoke config of `method`, pinned as a run pins it (distillation's teacher read and hashed)."""
    return pinned_config(build_config(method, "tiny", sets={**COMMON, **TINY[method], **sets}))


# Each method's short run on sample:digits that must beat its random-init encoder (issue 35, item 5):
# (the protocol it is judged by, its --sets on top of tiny_config's). The margins over seeds are in
# docs/BENCHMARKS.md ("Every method learns on the digits sample"), measured by
# benchmarks/research/learns_margin.py; the smoke ViT learned nothing in this budget, so MAE and
# DINO take the `tiny` ViT's width and depth. DINO adds DINOv2's KoLeo term: without it the run
# beats its random init but ends flagged for dimensional collapse (same section of the doc).
LEARNS = {
    "simclr": ("knn", {"optim.epochs": 2}),
    "byol": ("linear", {"optim.epochs": 4}),
    # timm's init: the reference init's random ViT is already a strong probe on these digits and
    # this run does not beat it (docs/BENCHMARKS.md, same section)
    "mae": ("linear", {"optim.epochs": 10, "optim.warmup_epochs": 1, "optim.base_lr": 6e-3, "backbone.patch_size": 2,
                       "backbone.kwargs.embed_dim": 96, "backbone.kwargs.depth": 4, "backbone.kwargs.num_heads": 3,
                       "hparams.init": "timm"}),
    "dino": ("knn", {"optim.epochs": 8, "backbone.kwargs.embed_dim": 96, "backbone.kwargs.depth": 4,
                     "backbone.kwargs.num_heads": 3, "hparams.teacher_momentum": 0.95, "hparams.koleo_weight": 0.5}),
}


# Distillation's "it learns" run (issue 32): the student of `tiny` at 16 px, taught by SimCLR's "it
# learns" encoder exported as a timm folder (the teacher's architecture comes from its config.json,
# its path from `distill_learns_config`); tests/test_distill.py judges it, not test_learns.py. Its
# margins over seeds: docs/BENCHMARKS.md, "Every method learns on the digits sample".
DISTILL_LEARNS = {"optim.epochs": 4, "hparams.teacher": "", "hparams.teacher_args": {}, "hparams.queue_size": 1024}
LEARNS_SETS = {**{method: sets for method, (_, sets) in LEARNS.items()}, "distill": DISTILL_LEARNS}


def learns_sets(method: str) -> dict:
    """The `--set`s on the `tiny` preset of `method`'s "it learns" run (LEARNS_SETS; a method without
    one, its tiny config): the label-free metrics (and the kNN, given a validation set) once, after
    the last epoch."""
    return {**COMMON, **TINY[method], **LEARNS_SETS.get(method, {}), "train.knn_every_epochs": 0}


def learns_config(method: str, seed: int = 0):
    """`method`'s "it learns" run with `train.seed` = `seed`."""
    return build_config(method, "tiny", sets={**learns_sets(method), "train.seed": seed})


def distill_learns_config(teacher: str, seed: int = 0):
    """Distillation's "it learns" run from the teacher folder `teacher`, with `train.seed` = `seed`."""
    return build_config("distill", "tiny", sets={**learns_sets("distill"), "hparams.teacher_weights": teacher,
                                                 "train.seed": seed})


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """`{tag: {step: value}}` as TensorBoard shows the event files in `folder`: files in the order
    they were started, a SessionLog.START at step s hiding earlier files' events from step s on.
    (TFRecord framing: length, CRC, payload, CRC.)"""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    files = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as stream:
            data = stream.read()
        events, offset = [], 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
        files.append(events)
    scalars: dict[str, dict[int, float]] = {}
    for events in sorted(files, key=lambda events: events[0].wall_time):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for values in scalars.values():
                    for step in [s for s in values if s >= event.step]:
                        del values[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def simulated_cluster_environment(**extra) -> dict:
    """The environment of a process that simulates a multi-node cluster on this machine. It stands
    for a real cluster, whose nodes listen on their own addresses (selfsup's loopback-only mode is
    for local single-node runs), so the test session's loopback switch is taken out."""
    from pipelines.train.local_ray import LISTEN_ENV, RAY_SWITCH

    environment = {key: value for key, value in os.environ.items() if key != RAY_SWITCH}
    return {**environment, LISTEN_ENV: "all", "RAY_ADDRESS": "", **extra}
