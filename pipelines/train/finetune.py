"""`selfsup finetune`: a pretrained encoder and a linear head trained end to end on labeled shards,
on Ray Train like pretraining (the same worker, loop, checkpoints and resume), and the same recipe
from a random init ("scratch") beside it, both scored top-1 on a labeled test set.

This is how MAE is judged (fine-tuning) and SimCLR's semi-supervised protocol (1 % / 10 % of the
labels, `labeled.labeled_subset`). The run config is the pretraining run's (backbone, canvas)
with the fine-tuning preset's `optim` and `finetune` sections (`classifier.FINETUNE_PRESETS`),
then the user's `--set`s; the pretraining sections (`backbone`, `hparams`, `views`) are the
checkpoint's and cannot be set here.
"""

from __future__ import annotations

import copy
import dataclasses
import time

from pipelines.config import RunConfig, build_method, build_section, fit_warmup, with_sets
from pipelines.console import log
from pipelines.evaluate.classify import classifier_top1
from pipelines.images.labeled import LabeledSet
from pipelines.train.classifier import (
    FINETUNE_LR_SCALING,
    FINETUNE_PRESETS,
    Classifier,
    ClassifierBuild,
    FineTuneConfig,
    default_preset,
)
from pipelines.train.plan import plan_run
from pipelines.train.pretrain import pretrain
from pipelines.weights.checkpoint import load_state

FIXED_SECTIONS = ("backbone", "hparams", "views")  # the pretrained encoder's; a fine-tune cannot change them


@dataclasses.dataclass(frozen=True)
class FineTuneRun:
    """A fine-tuning run, planned before Ray starts: its config, its `finetune` settings (as a
    dict: what workers receive), the preset they came from and the labeled records."""

    config: RunConfig
    settings: dict
    preset: str
    labeled: LabeledSet

    @property
    def build(self) -> ClassifierBuild:
        return ClassifierBuild(self.settings, self.labeled.num_classes)


def plan_finetune(base: RunConfig, labeled: LabeledSet, preset: str | None = None,
                  sets: dict | None = None) -> FineTuneRun:
    """The fine-tuning run of `base`'s encoder on `labeled`: the preset (by default the one of the
    encoder's family and view size), then `sets` (`optim.*`, `train.*`, `data.*`, `finetune.*`).
    A preset batch larger than the labeled images is fitted to them with a warning; a batch the
    user set is not. Raises ValueError, in one line, on a bad key or value."""
    sets = dict(sets or {})
    fixed = sorted(key for key in sets if key.split(".")[0] in FIXED_SECTIONS)
    if fixed:
        raise ValueError(f"--set {fixed[0]}: the encoder's architecture and pretraining settings come from the "
                         "checkpoint; fine-tuning sets optim.*, train.*, data.* and finetune.*")
    encoder = build_method(base)
    preset = preset or default_preset(encoder.encoder(), encoder.eval_size)
    if preset not in FINETUNE_PRESETS:
        raise ValueError(f"--preset {preset}: unknown fine-tuning preset (available: {', '.join(FINETUNE_PRESETS)})")
    chosen = copy.deepcopy(FINETUNE_PRESETS[preset])
    chosen["optim"]["lr_scaling"] = FINETUNE_LR_SCALING
    raw = base.to_dict()
    raw["optim"] = chosen["optim"]
    raw["train"].update(probe_size=0, knn_every_epochs=0, init_from="")
    settings = chosen["finetune"]
    for key in [key for key in sets if key.startswith("finetune.")]:
        field, _, view_key = key.removeprefix("finetune.").partition(".")
        if field == "views" and view_key:
            settings["views"] = {**settings["views"], view_key: sets.pop(key)}
        else:
            settings[field] = sets.pop(key)
    user_optim = {key.removeprefix("optim."): value for key, value in sets.items() if key.startswith("optim.")}
    raw["optim"] = fit_warmup(chosen["optim"], {**chosen["optim"], **user_optim}, set(sets))
    config = with_sets(raw, sets)
    workers = config.train.worker_range()[1]
    if "optim.batch_size" not in sets and config.optim.batch_size > labeled.rows:
        fitted = labeled.rows - labeled.rows % workers
        log.warning(f"optim.batch_size: the preset's {config.optim.batch_size} is more than the {labeled.rows} "
                    f"labeled images; fine-tuning with {fitted}")
        config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, batch_size=fitted))
    build_section(FineTuneConfig, settings, "finetune")
    run = FineTuneRun(config, settings, preset, labeled)
    run.build(config)  # a head or view setting that cannot be built fails here, before Ray
    return run


def finetune(run: FineTuneRun, test: str, weights: dict | None, scratch: bool = True, storage: str | None = None,
             name: str | None = None, gpus_per_worker: float = 0) -> dict:
    """Fine-tune from `weights` (the encoder's state dict; None: from scratch) and, with
    `scratch`, the same recipe from random init; each run's top-1 on `test`. Ray must be
    initialised. Returns the JSON line's fields and each run's last checkpoint."""
    plan = plan_run(run.config, run.labeled.rows, run.labeled.location)
    name = name or f"finetune-{run.config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    starts = ([("top1", weights, name)] if weights is not None else []) + (
        [("scratch_top1", None, f"{name}-scratch")] if scratch or weights is None else [])
    result = {"method": run.config.method, "preset": run.preset, "train_images": run.labeled.rows,
              "classes": run.labeled.num_classes, "epochs": run.config.optim.epochs,
              "batch_size": run.config.optim.batch_size, "checkpoints": {}}
    for key, init, run_name in starts:
        log.info(f"fine-tuning {'from the pretrained encoder' if init is not None else 'from scratch'}: "
                 f"{run.labeled.rows} labeled images, {plan.total_steps} steps")
        outcome = pretrain(run.config, run.labeled.location, plan, storage=storage, name=run_name,
                           gpus_per_worker=gpus_per_worker, init=(init, []) if init is not None else None,
                           labeled=run.labeled, build=run.build)
        classifier = load_classifier(outcome["checkpoint"], run)
        result[key] = classifier_top1(classifier, test, run.config.data.canvas_size)
        result["checkpoints"][key] = outcome["checkpoint"]
    return result


def load_classifier(checkpoint: str, run: FineTuneRun) -> Classifier:
    """The fine-tuned classifier of one of `run`'s checkpoints, in eval mode."""
    classifier = run.build(run.config)
    classifier.load_state_dict(load_state(checkpoint)["method"])
    return classifier.eval()
