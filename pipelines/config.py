"""Run configuration: method defaults <- preset <- YAML file <- `--set key=value`, validated
before Ray starts. Every error is one line naming the key and what it allows."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from methods import Method, get_method
from methods.backbone import BackboneConfig
from methods.base import hparams_from_dict
from methods.checks import check_rules, typed_values
from methods.views import ViewRecipe
from pipelines.console import log
from pipelines.images.ingest import IngestConfig


class ConfigLoader(yaml.SafeLoader):
    """YAML as people mean it in configs: `1:3` is a string (YAML 1.1 reads it as the base-60
    number 63: `workers: 1:3` would ask for 63 workers)."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(  # SafeLoader's integers without the base-60 form
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def load_yaml(stream) -> Any:
    """A YAML document (text or file) read with `ConfigLoader`."""
    return yaml.load(stream, Loader=ConfigLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_value(text: str) -> Any:
    """A `--set` / `--space` value as YAML, except that `1e-9` is a number (YAML 1.1 wants `1.0e-9`)."""
    value = load_yaml(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_workers(value, name: str = "workers") -> tuple[int, int]:
    """`3` or `"3"` -> (3, 3); `"1:4"` or `[1, 4]` -> (1, 4): the fixed or elastic worker count."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = value
    elif isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and value.strip():
        parts = value.split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            low = high = None
    else:
        low = high = None
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ValueError(f"{name}={value!r}: must be N or MIN:MAX with 1 <= MIN <= MAX")
    return low, high


SECTIONS = ("backbone", "hparams", "views", "data", "optim", "train", "tracking")


@dataclass
class OptimConfig:
    """Args:
    epochs: passes over the training data.
    batch_size: the *global* batch (split evenly across workers).
    base_lr: learning rate before scaling by the global batch (see lr_scaling).
    lr_scaling: `linear` (base x B/256), `sqrt` (base x sqrt(B)) or null for the method's rule.
    warmup_epochs: linear warmup from 0, then the schedule.
    lr_schedule: after the warm-up, `cosine` (per iteration, to min_lr) or `constant` (the peak LR
        to the end, whatever the batch it is scaled to).
    min_lr: final learning rate of the cosine; not above the peak.
    weight_decay: on weights only (never biases or norms).
    momentum: for SGD/LARS; betas: for AdamW.
    clip_grad: clip the global gradient norm to this (0 = off).
    max_worker_batch: most images a worker puts through one forward pass (its memory); a larger
        share of the global batch is split into gradient-accumulation steps (0 = no limit).
    """

    epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.3
    lr_scaling: str | None = None
    warmup_epochs: float = 1.0
    lr_schedule: str = "cosine"
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 0.0
    max_worker_batch: int = 0

    def validate(self) -> None:
        rules = {
            "epochs": (isinstance(self.epochs, int) and self.epochs >= 1, "an integer >= 1"),
            "batch_size": (isinstance(self.batch_size, int) and self.batch_size >= 2, "an integer >= 2"),
            "base_lr": (self.base_lr > 0, "a number > 0"),
            "lr_scaling": (self.lr_scaling in (None, "linear", "sqrt"), "linear, sqrt or null"),
            "warmup_epochs": (0 <= self.warmup_epochs <= self.epochs, "in [0, epochs]"),
            "lr_schedule": (self.lr_schedule in ("cosine", "constant"), "cosine or constant"),
            "min_lr": (0 <= self.min_lr, "a number >= 0"),
            "weight_decay": (0 <= self.weight_decay < 1, "in [0, 1)"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "betas": (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            "clip_grad": (self.clip_grad >= 0, "a number >= 0 (0 = off)"),
            "max_worker_batch": (isinstance(self.max_worker_batch, int) and self.max_worker_batch >= 0,
                                 "an integer >= 0 (0 = no limit)"),
        }
        check_rules("optim", self, rules)


@dataclass
class TrainConfig:
    """Args:
    checkpoint_every_steps: also checkpoint every N steps inside an epoch (0 = epoch ends only).
    keep_checkpoints: how many checkpoints storage keeps (the latest ones).
    knn_every_epochs: online evaluation (kNN on the validation set, label-free metrics on the
        probe set) every K epochs (and at the end).
    knn_k, knn_temperature: weighted kNN settings (DINO's eval_knn: 20, 0.07).
    probe_size: images in the probe set on which every online evaluation measures the label-free
        metrics (RankMe, LiDAR, alpha-ReQ, alignment, uniformity; pipelines/evaluate/label_free.py);
        0 = off, else at least 3 (the fewest images a covariance spectrum can be fitted on).
    probe: shards to draw the probe set from (`--probe`); "" = the training shards.
    precision: `auto` (bf16 autocast on GPU, fp32 on CPU), `bf16`, `fp16` or `fp32`.
    seed: seeds models, views and data order.
    max_failures: worker-group restarts from the last checkpoint before the run fails.
    cpus_per_worker: CPUs each training worker reserves (the rest decodes data).
    torch_threads: intra-op threads per worker; 0 = the node's CPUs shared among the training
        workers on it, at least cpus_per_worker (`pipelines.train.worker.step_threads`).
    placement_strategy: how workers spread over nodes: PACK (fewest nodes), SPREAD,
        STRICT_SPREAD (one per node: a lost node costs one worker), STRICT_PACK.
    workers: training workers, N or "MIN:MAX" for an elastic group that shrinks when nodes go
        and grows when they come back (each time from the last checkpoint; `--workers` sets it).
    resize_interval_s: an elastic group looks for more room this often (seconds).
    init_from: start the encoder from these weights (`--init-from`: a `selfsup export` or timm
        model folder, or a .safetensors/.pth file; pipelines/weights/init_from.py); "" = random init.
    compile: `torch.compile` the method's forward and loss (TorchInductor). Each worker start
        pays the compile once before its first step; it pays for ResNets, not for DINO's ViT
        (docs/BENCHMARKS.md, "Step options").
    channels_last: weights and views in channels-last memory, what convolutions run fastest on
        (ResNets gain, ViTs are unchanged: the same section).
    """

    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    knn_every_epochs: int = 1
    knn_k: int = 20
    knn_temperature: float = 0.07
    probe_size: int = 2048
    probe: str = ""
    precision: str = "auto"
    seed: int = 0
    max_failures: int = 2
    cpus_per_worker: float = 1.0
    torch_threads: int = 0
    placement_strategy: str = "PACK"
    workers: int | str = 1
    resize_interval_s: float = 60.0
    init_from: str = ""
    compile: bool = False
    channels_last: bool = True

    def validate(self) -> None:
        rules = {
            "checkpoint_every_steps": (self.checkpoint_every_steps >= 0, "an integer >= 0"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, "an integer >= 1"),
            "knn_every_epochs": (self.knn_every_epochs >= 0, "an integer >= 0 (0 = only at the end)"),
            "knn_k": (self.knn_k >= 1, "an integer >= 1"),
            "knn_temperature": (self.knn_temperature > 0, "a number > 0"),
            "probe_size": (isinstance(self.probe_size, int) and (self.probe_size == 0 or self.probe_size >= 3),
                           "0 (off) or an integer >= 3"),
            "precision": (self.precision in ("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
            "max_failures": (self.max_failures >= -1, "an integer >= -1 (-1 = unlimited)"),
            "cpus_per_worker": (0 < self.cpus_per_worker <= 256, "a number in (0, 256]"),
            "torch_threads": (self.torch_threads >= 0, "an integer >= 0"),
            "placement_strategy": (self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                                   "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"),
        }
        check_rules("train", self, rules)
        check_rules("train", self, {"resize_interval_s": (self.resize_interval_s >= 0, "a number >= 0"),
                                    "init_from": (isinstance(self.init_from, str), "a path (a string)"),
                                    "probe": (isinstance(self.probe, str), "a path (a string)"),
                                    "compile": (isinstance(self.compile, bool), "true or false"),
                                    "channels_last": (isinstance(self.channels_last, bool), "true or false")})
        self.worker_range()

    def worker_range(self) -> tuple[int, int]:
        """(least, most) training workers: `workers` is N (fixed) or MIN:MAX (elastic)."""
        return parse_workers(self.workers, "train.workers")



@dataclass
class TrackingConfig:
    """Args:
    tensorboard: write every report as TensorBoard scalars under `<run>/tensorboard`
        (`metrics.jsonl` in the run folder is always written; `selfsup viz curves` reads it).
    mlflow_uri: an MLflow tracking URI (`http://host:5000`, `databricks`, ...): each run becomes
        an MLflow run with the config as parameters and every report as metrics. Off when null.
    mlflow_experiment: the MLflow experiment the runs go to.
    """

    tensorboard: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = "selfsup"

    def validate(self) -> None:
        check_rules("tracking", self, {
            "tensorboard": (isinstance(self.tensorboard, bool), "true or false"),
            "mlflow_uri": (self.mlflow_uri is None or (isinstance(self.mlflow_uri, str) and self.mlflow_uri.strip()),
                           "a tracking URI or null"),
            "mlflow_experiment": (isinstance(self.mlflow_experiment, str) and self.mlflow_experiment.strip(),
                                  "a non-empty name"),
        })
        if self.mlflow_uri:
            try:
                import mlflow  # noqa: F401
            except ImportError:
                raise ValueError(f"tracking.mlflow_uri={self.mlflow_uri!r}: mlflow is not installed "
                                 "(pip install 'selfsup[mlflow]')") from None


@dataclass
class RunConfig:
    method: str
    backbone: BackboneConfig
    hparams: Any
    views: dict
    data: IngestConfig
    optim: OptimConfig
    train: TrainConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preset: str = "tiny"
    method_class: type[Method] = field(init=False, repr=False, compare=False)  # from the registry, once

    def __post_init__(self) -> None:
        self.method_class = get_method(self.method)

    def lr_rule(self) -> str:
        """How the base LR scales with the global batch: `optim.lr_scaling`, else the method's rule."""
        return self.optim.lr_scaling or self.method_class.lr_scaling

    def recipe(self) -> ViewRecipe:
        return self.method_class.default_recipe().with_overrides(self.views)

    def to_dict(self) -> dict:
        """The complete config as plain YAML values, built from the sections themselves (what
        checkpoints, Tune trials and MLflow store): `config_from_dict(c.to_dict())` is `c` again."""
        sections = {name: _plain(dataclasses.asdict(getattr(self, name)))
                    for name in ("backbone", "hparams", "data", "optim", "train", "tracking")}
        return {"method": self.method, "preset": self.preset, **sections, "views": _plain(self.views)}


def _plain(value):
    """Tuples as lists, recursively: YAML's safe dumper writes no tuples."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "views":
            out[key] = _merge(out[key], value)
        elif key == "views" and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_set(config: dict, key: str, value: Any) -> None:
    """`backbone.kwargs.depth=4` -> config["backbone"]["kwargs"]["depth"] = 4; `views.<view>.<field>`
    keeps the view key whole."""
    section, _, rest = key.partition(".")
    if section not in SECTIONS and section not in ("method", "preset"):
        raise ValueError(f"--set {key}: unknown section {section!r} (allowed: {', '.join(SECTIONS)})")
    if not rest:
        config[section] = value
        return
    if section == "views":
        config.setdefault("views", {})[rest] = value
        return
    node = config.setdefault(section, {})
    parts = rest.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def build_section(cls, values: dict, section: str):
    """A section's dataclass from its dict: unknown keys refused, every value checked against its
    field's type (`methods.checks.typed_values`: lists made tuples where the field says so), then
    the section's own `validate()` (its rule table)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(fields))})")
    built = cls(**typed_values(section, cls, values))
    built.validate()
    return built


def build_config(method: str, preset: str | None = None, file: str | None = None,
                 sets: dict | None = None) -> RunConfig:
    """The validated run config (`preset` None: the method's `default_preset`). Raises ValueError
    with a one-line message on any bad input."""
    file_values: dict = {}
    if file:
        try:
            with open(file) as stream:
                file_values = load_yaml(stream) or {}
        except OSError as error:
            raise ValueError(f"--config {file}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"--config {file}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(file_values, dict):
            raise ValueError(f"--config {file}: must be a mapping of sections")
        method = file_values.get("method", method)
        preset = file_values.get("preset", preset)
    sets = dict(sets or {})
    method = sets.pop("method", method)
    preset = sets.pop("preset", preset)
    method_cls = get_method(method)
    preset = preset or method_cls.default_preset
    if preset not in method_cls.presets:
        raise ValueError(f"preset={preset!r}: unknown for {method} (available: {', '.join(method_cls.presets)})")
    raw = _merge({section: {} for section in SECTIONS}, method_cls.presets[preset])
    unknown = sorted(set(file_values) - set(SECTIONS) - {"method", "preset"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown config section (allowed: {', '.join(SECTIONS)})")
    preset_optim = dict(raw["optim"])
    raw = _merge(raw, {k: v for k, v in file_values.items() if k in SECTIONS})
    for key, value in sets.items():
        _apply_set(raw, key, value)
    raw.update(method=method, preset=preset)
    for section in SECTIONS:
        if not isinstance(raw.get(section), dict):
            raise ValueError(f"{section}: must be a mapping, got {raw.get(section)!r}")
    from_file = file_values.get("optim") if isinstance(file_values.get("optim"), dict) else {}
    raw["optim"] = fit_warmup(preset_optim, raw["optim"], {*sets, *(f"optim.{key}" for key in from_file)})
    return config_from_dict(raw)


def fit_warmup(preset_optim: dict, optim: dict, user_keys: set[str]) -> dict:
    """`optim` with a preset's warm-up that outlasts the epochs the user set (and the warm-up they
    did not) scaled to the share of the run it has in the preset, said in one warning line; as it
    is otherwise (a warm-up the user set too is theirs: `validate` refuses the pair)."""
    epochs = optim.get("epochs")
    warmup = optim.get("warmup_epochs", OptimConfig.warmup_epochs)
    if "optim.epochs" not in user_keys or "optim.warmup_epochs" in user_keys:
        return optim
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1 or isinstance(warmup, bool) \
            or not isinstance(warmup, (int, float)) or warmup <= epochs:
        return optim  # fits, or a wrong value the section's checks refuse in one line
    fitted = round(warmup / preset_optim.get("epochs", OptimConfig.epochs) * epochs, 3)
    log.warning(f"optim.warmup_epochs: the preset's {warmup:g} is longer than the {epochs} epochs set; "
                f"warming up for {fitted:g} (the same share of the run)")
    return {**optim, "warmup_epochs": fitted}


def with_sets(raw: dict, sets: dict) -> RunConfig:
    """A validated RunConfig: a complete config dict with `{"section.key": value}` applied
    (what a Tune trial runs)."""
    raw = copy.deepcopy(raw)
    for key, value in sets.items():
        _apply_set(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> RunConfig:
    """A validated RunConfig from a complete config dict (as built above, or stored in a checkpoint)."""
    method_cls = get_method(raw["method"])
    config = RunConfig(
        method=raw["method"],
        preset=raw.get("preset", "tiny"),
        backbone=build_section(BackboneConfig, raw["backbone"], "backbone"),
        hparams=hparams_from_dict(method_cls.Hyperparameters, raw["hparams"]),
        views=raw["views"],
        data=build_section(IngestConfig, raw["data"], "data"),
        optim=build_section(OptimConfig, raw["optim"], "optim"),
        train=build_section(TrainConfig, raw["train"], "train"),
        tracking=build_section(TrackingConfig, raw.get("tracking", {}), "tracking"),
    )
    config.recipe()  # validates the view overrides
    return config


def pinned_config(config: RunConfig) -> RunConfig:
    """`config` with its method's outside inputs checked and recorded (`Method.pinned`): what a run
    that trains (pretrain, tune) starts from. A ValueError is one line naming what did not fit."""
    return dataclasses.replace(config, hparams=config.method_class.pinned(config.hparams, config.recipe()))


def build_method(config: RunConfig) -> Method:
    """The configured method with freshly initialised weights (seeded by `train.seed`)."""
    torch.manual_seed(config.train.seed)
    return config.method_class(config.backbone, config.hparams, config.recipe())
