"""`--init-from`: continue pretraining from existing encoder weights.

The most common real use of self-supervised pretraining is domain adaptation: start from weights
trained elsewhere (ImageNet, a previous selfsup run) and keep pretraining on the user's own
images (dinov2 #431). The weights come from a `selfsup export` folder, a timm model folder
(`model.safetensors` or `pytorch_model.bin` beside `config.json`) or a single `.safetensors` /
`.pth` / `.bin` file, and must fit the run's backbone exactly: every key, every shape. Only a
classifier head (`head.*`, `fc.*`, `classifier.*`) is left out, since pretraining has none.
Checked before Ray starts; the workers get the weights through the object store.
"""

from __future__ import annotations

import os

import torch

from pipelines.config import build_method
from pipelines.images.shards import DataError

CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class InitFromError(DataError):
    """Weights that cannot start the run's backbone; the message names the file and the first misfit."""


def weights_file(path: str) -> str:
    """The weights file at `path` (a file, or the first of WEIGHT_FILES in a folder)."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise InitFromError(f"--init-from {path}: no {' or '.join(WEIGHT_FILES[:2])} in this folder "
                            "(expected a `selfsup export` or timm model folder)")
    if not os.path.isfile(path):
        raise InitFromError(f"--init-from {path}: no such file or folder")
    return path


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `path`, loaded without running code (safetensors, or torch's weights-only
    unpickler); a `{"state_dict"|"model": ...}` wrapper is opened."""
    file = weights_file(path)
    try:
        if file.endswith(".safetensors"):
            import safetensors.torch

            weights = safetensors.torch.load_file(file)
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickled code, not a weights file
        raise InitFromError(f"--init-from {file}: not readable as weights ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not (isinstance(weights, dict) and weights and all(torch.is_tensor(v) for v in weights.values())):
        raise InitFromError(f"--init-from {file}: holds no state dict of tensors")
    return weights


def initial_weights(config) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """`config.train.init_from`'s weights fitted to the run's backbone (see `fit_to_backbone`), or
    None when the run starts from random init."""
    if not config.train.init_from:
        return None
    backbone = build_method(config).backbone
    return fit_to_backbone(read_weights(config.train.init_from), backbone, config.train.init_from,
                           config.backbone.name)


def fit_to_backbone(weights: dict[str, torch.Tensor], backbone: torch.nn.Module, where: str,
                    backbone_name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the backbone's state dict taken from `weights`, the classifier keys left out); refuses any
    missing, unexpected or differently shaped tensor, naming the first of each."""
    own = backbone.state_dict()
    ignored = sorted(k for k in weights if k not in own and k.startswith(CLASSIFIER_PREFIXES))
    unexpected = sorted(k for k in weights if k not in own and k not in ignored)
    missing = sorted(k for k in own if k not in weights)
    mismatched = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shapes differ (first: {k} {tuple(weights[k].shape)} here, "
                        f"{tuple(own[k].shape)} in the run's backbone)")
    if missing:
        problems.append(f"{len(missing)} tensors missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if problems:
        raise InitFromError(f"--init-from {where}: does not fit the run's {backbone_name} backbone: "
                            f"{'; '.join(problems)}; pick the preset or backbone.* settings these weights were "
                            "trained with")
    return {k: weights[k].to(own[k].dtype) for k in own}, ignored
