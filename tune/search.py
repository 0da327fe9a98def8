"""`selfsup tune`: a Ray Tune search whose trials are full Ray Train pretraining runs.

Each trial builds a `TorchTrainer` (the same one `selfsup pretrain` runs) whose
`TuneReportCallback` forwards every epoch's report to Tune, so ASHA can stop a trial after any
epoch. Trials are ranked by a downstream metric: the online kNN top-1 when a labeled validation
set is given, else the label-free metric of the probe set that the method declares
(`Method.label_free`: the one the label-free study found to agree best with labels), named on the
console and in trials.md with that agreement (SSL losses are not comparable across temperatures
or mask ratios). A trial that trips the collapse
flag (a method's own, or dimensional collapse) is stopped. Each trial's Train run lives at `<search>/train/<trial_id>`,
so a search resumed after its driver died restarts an interrupted trial from its last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from dataclasses import dataclass

import yaml
from ray.tune.stopper import Stopper

from methods import get_method
from methods.base import LabelFreeObjective
from pipelines.config import RunConfig, with_sets
from pipelines.console import Relay
from pipelines.evaluate.label_free import PROBE_METRICS
from pipelines.images.shards import absolute_location
from pipelines.train.plan import peak_lr, plan_run
from pipelines.train.pretrain import make_trainer, raise_if_stopped
from tune.space import Dimension

log = logging.getLogger("selfsup")

STATUSES = ("finished", "stopped early", "collapsed", "error")
LABEL_FREE = PROBE_METRICS
# The first two trials are too close to separate when their label-free objective differs by less
# than this fraction of its range over the search's trials: a judgement, as the label-free study
# holds too few pairs that close to measure one (docs/FINDINGS.md, "Label-free model selection").
TOO_CLOSE = 0.05
# Shown beside the objective when the trials report them: label-free and labeled side by side.
ONLINE_METRICS = ("knn_top1", "rankme", "lidar", "alpha_req", "alpha_req_gap", "uniformity", "alignment")


@dataclass(frozen=True)
class SearchSettings:
    """Args:
    samples: trials drawn from the space (each `grid` dimension multiplies them).
    gpus_per_worker: GPUs of each worker of a trial's Ray Train group (its size is the base
        config's `train.workers`, which `--workers-per-trial` sets).
    scheduler: `asha` (stop weak trials after any epoch) or `fifo` (run every trial to the end).
    max_concurrent: trials at once; default: as many as fit while leaving each trial
        `data_cpus_per_trial` CPUs for Ray Data decoding.
    metric, mode: the objective: any reported metric; "" = `knn_top1` (max) when the search has
        a labeled `--val`, else the method's `label_free` objective (`resolved` fills it in);
        mode "" = the default objective's, else max.
    grace_epochs, reduction_factor: ASHA's first rung and halving rate.
    """

    samples: int = 8
    gpus_per_worker: float = 0
    scheduler: str = "asha"
    max_concurrent: int | None = None
    metric: str = ""
    mode: str = ""
    grace_epochs: int = 1
    reduction_factor: float = 2
    data_cpus_per_trial: float = 1.0

    def resolved(self, has_val: bool, has_probe: bool = True,
                 label_free: LabelFreeObjective = LabelFreeObjective()) -> SearchSettings:
        """These settings checked, with the default objective filled in (`label_free`: the
        method's, for a search without `--val`); ValueError in one line."""
        default = ("knn_top1", "max") if has_val else (label_free.metric, label_free.mode)
        metric = self.metric or default[0]
        mode = self.mode or (default[1] if not self.metric else "max")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ValueError(f"--samples {self.samples}: must be an integer >= 1")
        if self.scheduler not in ("asha", "fifo"):
            raise ValueError(f"--scheduler {self.scheduler}: must be asha or fifo")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent {self.max_concurrent}: must be >= 1")
        if mode not in ("max", "min"):
            raise ValueError(f"--mode {mode}: must be max or min")
        if metric == "knn_top1" and not has_val:
            raise ValueError("--metric knn_top1 needs --val (a labeled validation set)")
        if metric in LABEL_FREE and not has_probe:
            raise ValueError(f"--metric {metric} needs the probe set: train.probe_size must be > 0")
        if self.grace_epochs < 1 or self.reduction_factor <= 1:
            raise ValueError("ASHA needs grace_epochs >= 1 and reduction_factor > 1")
        return dataclasses.replace(self, metric=metric, mode=mode)


def check_space(base: dict, dimensions: list[Dimension], train_rows: int, data: str) -> None:
    """Every end of every dimension makes a run config that plans on the `train_rows` images at
    `data`, with a global batch its trial's workers split evenly (before Ray starts)."""
    for dimension in dimensions:
        for value in dimension.extremes():
            try:
                config = with_sets(base, {dimension.key: value})
                split = plan_run(config, train_rows, data).splits[-1]
            except ValueError as error:
                raise ValueError(f"--space {dimension.name}={value!r}: {error}") from None
            if not split.exact:
                raise ValueError(f"--space {dimension.name}={value!r}: optim.batch_size {config.optim.batch_size} "
                                 f"must divide evenly across {split.world_size} workers")


def concurrency(settings: SearchSettings, config: RunConfig) -> int:
    """Trials that fit the cluster's CPUs with `data_cpus_per_trial` left to decode for each."""
    import ray

    if settings.max_concurrent:
        return settings.max_concurrent
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = config.train.worker_range()[1] * config.train.cpus_per_worker + settings.data_cpus_per_trial
    return max(1, int(cpus // per_trial))


def _trial(values: dict, base: dict, data: str, train_rows: int, val: str | None, gpus_per_worker: float,
           train_storage: str, console=None) -> None:
    """One trial: a full pretraining run whose reports reach Tune (and whose lines reach the
    search's console through `console`, a `pipelines.console.Relay` queue)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = with_sets(base, values)
    trainer = make_trainer(config, data, plan_run(config, train_rows, data), val=val, gpus_per_worker=gpus_per_worker,
                           storage=train_storage, name=tune.get_context().get_trial_id(),
                           callbacks=[TuneReportCallback()], console=console,
                           console_prefix=f"trial {tune.get_context().get_trial_id()}: ")
    raise_if_stopped(trainer.fit())


class CollapseStopper(Stopper):
    """Stops a trial whose report carries `collapsed: 1` (DINO's collapse flag, or dimensional
    collapse of any method's features: pipelines/evaluate/label_free.py)."""

    def __call__(self, trial_id, result) -> bool:
        return bool(result.get("collapsed", 0))

    def stop_all(self) -> bool:
        return False


def run_search(base: dict, data: str, train_rows: int, val: str | None, dimensions: list[Dimension],
               settings: SearchSettings, storage: str, name: str) -> dict:
    """Run (or resume, when `storage/name` holds a search) and write the results beside it.
    `settings` are `SearchSettings.resolved`; `train_rows`: the images at `data` (`preflight`'s)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # Trials run in their own folders: relative paths are resolved here, where the user gave them.
    data, val = absolute_location(data), val and absolute_location(val)
    base = {**base, "train": {**base.get("train", {}), **{key: absolute_location(base["train"][key])
                                                        for key in ("probe", "init_from") if base.get("train", {}).get(key)}}}
    config = with_sets(base, {})
    if not settings.metric:
        raise ValueError("run_search: settings without an objective (use SearchSettings.resolved)")
    search_dir = os.path.join(storage, name)
    # Reports inside an epoch (train.checkpoint_every_steps) carry no kNN; ASHA skips them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    relay = Relay()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, data=data, train_rows=train_rows, val=val,
                             gpus_per_worker=settings.gpus_per_worker,
                             train_storage=os.path.join(search_dir, "train"), console=relay.queue),
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs: it must hold none,
        # or on a small machine Ray Data's first task (a whole CPU) never starts. Tune refuses an
        # empty request, so it asks for a little memory instead.
        {"CPU": 0, "memory": 256 * 1024**2},
    )
    if tune.Tuner.can_restore(search_dir):
        tuner = tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        if settings.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="epoch", metric=settings.metric, mode=settings.mode,
                                      max_t=config.optim.epochs, grace_period=settings.grace_epochs,
                                      reduction_factor=settings.reduction_factor)
            metric_mode = {}
        else:
            scheduler, metric_mode = FIFOScheduler(), {"metric": settings.metric, "mode": settings.mode}
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.domain() for d in dimensions},
            tune_config=tune.TuneConfig(num_samples=settings.samples, scheduler=scheduler,
                                        max_concurrent_trials=concurrency(settings, config),
                                        **metric_mode),
            run_config=tune.RunConfig(name=name, storage_path=storage, stop=CollapseStopper(),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
    objective = objective_note(settings, config.method)
    if objective:
        log.info(f"tune: {objective}")
    with relay:  # the trials' epoch and progress lines, on this console
        grid = tuner.fit()
    rows = trial_rows(grid, dimensions, settings, base)
    too_close = too_close_note(rows, settings)
    if too_close:
        log.warning(f"tune: {too_close}")
    # Results go beside the search; for a search on s3:// or gs://, into ./tune-results/NAME.
    folder = search_dir if "://" not in storage else os.path.abspath(os.path.join("tune-results", name))
    return write_results(rows, dimensions, settings, base, folder, config, notes=(objective, too_close))


def _last(frame, column):
    if frame is None or column not in frame:
        return None
    values = frame[column].dropna()
    return None if values.empty else float(values.iloc[-1])


def trial_rows(grid, dimensions: list[Dimension], settings: SearchSettings, base: dict) -> list[dict]:
    """One row per trial: its searched values, the LR its batch implies, the objective at its last
    report, epochs run and how it ended."""
    rows = []
    for result in grid:
        values = {d.key: result.config.get(d.key) for d in dimensions}
        frame = result.metrics_dataframe
        epochs_run = int(_last(frame, "epoch") or 0)
        config = with_sets(base, values)
        if result.error:
            status = "error"
        elif _last(frame, "collapsed"):
            status = "collapsed"
        elif epochs_run < config.optim.epochs:
            status = "stopped early"
        else:
            status = "finished"
        rows.append({
            "trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path),
            **{d.name: values[d.key] for d in dimensions},
            "peak_lr": peak_lr(config),
            **{m: _last(frame, m) for m in (settings.metric, *ONLINE_METRICS)},
            "epochs_run": epochs_run,
            "status": status,
            "error": str(result.error).strip().splitlines()[-1] if result.error else "",
        })
    return rows


def ranked_rows(rows: list[dict], settings: SearchSettings) -> list[dict]:
    """The trials that can be ranked (finished or stopped early, with an objective), best first."""
    sign = 1 if settings.mode == "max" else -1
    rankable = [r for r in rows if r.get(settings.metric) is not None and r["status"] in ("finished", "stopped early")]
    return sorted(rankable, key=lambda r: -sign * r[settings.metric])


def best_row(rows: list[dict], settings: SearchSettings) -> dict | None:
    ranked = ranked_rows(rows, settings)
    return ranked[0] if ranked else None


def objective_note(settings: SearchSettings, method: str) -> str | None:
    """For a search ranked by a label-free metric: the line naming it and how far the label-free
    study found it agrees with labels (for `method`'s declared objective)."""
    if settings.metric not in LABEL_FREE:
        return None
    declared = get_method(method).label_free
    if settings.metric == declared.metric:
        return (f"no labels: trials are ranked by {settings.metric} ({settings.mode}), {method}'s label-free "
                f"objective; {declared.agreement(method)}")
    return (f"no labels: trials are ranked by {settings.metric} ({settings.mode}), chosen by --metric; the "
            f"label-free study's choice for {method} is {declared.metric}")


def too_close_note(rows: list[dict], settings: SearchSettings) -> str | None:
    """For a search ranked by a label-free metric, once at least three trials are ranked: a line
    saying the first is not told apart from the second when the two are within TOO_CLOSE of the
    range of the ranked trials' values."""
    if settings.metric not in LABEL_FREE:
        return None
    ranked = ranked_rows(rows, settings)
    if len(ranked) < 3:
        return None
    values = [r[settings.metric] for r in ranked]
    if abs(values[0] - values[1]) >= TOO_CLOSE * (max(values) - min(values)):
        return None
    return (f"the first two trials' {settings.metric} ({values[0]:.4g}, {values[1]:.4g}) are within {TOO_CLOSE:.0%} "
            f"of its range over the trials ({min(values):.4g} to {max(values):.4g}): the ranking does not separate "
            f"trials {ranked[0]['trial_id']} and {ranked[1]['trial_id']}")


def write_results(rows: list[dict], dimensions: list[Dimension], settings: SearchSettings, base: dict,
                  folder: str, config: RunConfig, notes: tuple[str | None, ...] = ()) -> dict:
    """trials.csv, trials.md, best.yaml and search.png in `folder`; returns their paths and the best trial.
    `notes`: the lines the console gave about the ranking (objective_note, too_close_note), repeated
    in trials.md."""
    os.makedirs(folder, exist_ok=True)
    others = [m for m in ONLINE_METRICS if m != settings.metric and any(r.get(m) is not None for r in rows)]
    columns = ["trial_id", *[d.name for d in dimensions], "peak_lr", settings.metric, *others, "epochs_run", "status",
               "error"]
    paths = {name: os.path.join(folder, name) for name in ("trials.csv", "trials.md", "best.yaml", "search.png")}
    sign = -1 if settings.mode == "max" else 1
    rows = sorted(rows, key=lambda r: (r[settings.metric] is None, sign * (r[settings.metric] or 0)))
    with open(paths["trials.csv"], "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    rule = config.lr_rule()
    with open(paths["trials.md"], "w") as stream:
        stream.write(f"# {config.method} search: {settings.metric} ({settings.mode}), {len(rows)} trials, "
                     f"{config.optim.epochs} epochs each at most\n\n")
        stream.write(f"Trials are ranked by `{settings.metric}` ({_OBJECTIVES.get(settings.metric, 'a reported metric')}; "
                     f"{'highest' if settings.mode == 'max' else 'lowest'} first).\n\n")
        for line in notes:
            if line:
                stream.write(f"**{line[0].upper() + line[1:]}.**\n\n")
        stream.write("| " + " | ".join(columns[:-1]) + " |\n|" + "---|" * (len(columns) - 1) + "\n")
        for row in rows:
            stream.write("| " + " | ".join(_cell(row[c]) for c in columns[:-1]) + " |\n")
        stream.write(f"\nEach trial's peak LR is optim.base_lr scaled to its global batch by the `{rule}` rule "
                     "(linear: x B/256, sqrt: x sqrt(B)), so batch sizes are compared at the LR their recipe "
                     "implies.\n")
    best = best_row(rows, settings)
    if best is not None:
        best_config = with_sets(base, {d.key: best[d.name] for d in dimensions})
        with open(paths["best.yaml"], "w") as stream:
            stream.write(f"# best of a selfsup tune search: trial {best['trial_id']}, {settings.metric} "
                         f"{best[settings.metric]:.4f}; use with selfsup pretrain --config\n")
            yaml.safe_dump(best_config.to_dict(), stream, sort_keys=False)
    else:
        paths.pop("best.yaml")
    draw_search(rows, dimensions, settings, paths["search.png"])
    return {"search": folder, "trials": len(rows), "best": best,
            "by_status": {s: sum(r["status"] == s for r in rows) for s in STATUSES}, **paths}


_OBJECTIVES = {
    "knn_top1": "online kNN top-1 on the labeled validation set",
    "rankme": "RankMe, the effective rank of the features on the unlabeled probe set: no labels used",
    "rankme_fraction": "RankMe as a fraction of the feature width: no labels used",
    "lidar": "LiDAR, the rank of the linear discriminant between augmented views of the unlabeled probe images: "
             "no labels used",
    "alpha_req": "alpha-ReQ, the eigenspectrum decay of the features on the unlabeled probe set: no labels used",
    "alpha_req_gap": "alpha-ReQ's distance to 1, the centre of its band of good encoders, on the unlabeled probe "
                     "set: no labels used",
    "uniformity": "uniformity of the features on the unlabeled probe set: no labels used",
    "alignment": "alignment of two views on the unlabeled probe set: no labels used",
}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def draw_search(rows: list[dict], dimensions: list[Dimension], settings: SearchSettings, path: str) -> None:
    """The objective against each searched hyperparameter, one panel each, marked by status."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(dimensions), figsize=(4.2 * len(dimensions), 3.4), squeeze=False)
    markers = {"finished": ("o", "tab:blue"), "stopped early": ("x", "tab:orange"),
               "collapsed": ("v", "tab:red"), "error": ("s", "tab:gray")}
    for axis, dimension in zip(axes[0], dimensions):
        for status, (marker, colour) in markers.items():
            points = [(r[dimension.name], r[settings.metric]) for r in rows
                      if r["status"] == status and r[settings.metric] is not None and r[dimension.name] is not None]
            if points:
                axis.scatter(*zip(*points), marker=marker, color=colour, label=status)
        if dimension.log_scale:
            axis.set_xscale("log")
        axis.set_xlabel(dimension.name)
        axis.set_ylabel(settings.metric)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
