"""Weights from where users keep them: a timm model folder (`model.safetensors` or
`pytorch_model.bin` beside `config.json`, which is also what `selfsup export` writes) or a single
`.safetensors` / `.pth` / `.bin` file, read without running code and fitted to a module exactly
(every key, every shape; only a classifier head may be left out). `--init-from` (the pipeline's
pipelines/weights/init_from.py) and distillation's teacher (methods/distill.py) both read them
here, so both refuse the same misfits with the same line.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
MODEL_CONFIG = "config.json"  # timm's (and `selfsup export`'s) description of a model folder


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit; the message is one line naming the option, the
    file and the first misfit."""


def weights_file(path: str, option: str) -> str:
    """The weights file at `path` (a file, or the first of WEIGHT_FILES in a folder); `option`
    names where the path came from in a refusal (`--init-from`, `hparams.teacher_weights`)."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise WeightsError(f"{option} {path}: no {' or '.join(WEIGHT_FILES[:2])} in this folder "
                           "(expected a `selfsup export` or timm model folder)")
    if not os.path.isfile(path):
        raise WeightsError(f"{option} {path}: no such file or folder")
    return path


def read_weights(path: str, option: str) -> dict[str, torch.Tensor]:
    """A state dict from `path`, loaded without running code (safetensors, or torch's weights-only
    unpickler); a `{"state_dict"|"model": ...}` wrapper is opened."""
    file = weights_file(path, option)
    try:
        if file.endswith(".safetensors"):
            import safetensors.torch

            weights = safetensors.torch.load_file(file)
        else:
            weights = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, pickled code, not a weights file
        raise WeightsError(f"{option} {file}: not readable as weights ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model"):
        if isinstance(weights, dict) and isinstance(weights.get(key), dict):
            weights = weights[key]
    if not (isinstance(weights, dict) and weights and all(torch.is_tensor(v) for v in weights.values())):
        raise WeightsError(f"{option} {file}: holds no state dict of tensors")
    return weights


def model_config(path: str) -> dict:
    """The `config.json` of a model folder (`architecture`, `model_args`, `pretrained_cfg`, and
    `selfsup` for an export); {} for a single file or a folder without one."""
    file = os.path.join(path, MODEL_CONFIG)
    if not (os.path.isdir(path) and os.path.isfile(file)):
        return {}
    with open(file) as stream:
        return json.load(stream)


def fit_weights(weights: dict[str, torch.Tensor], module: nn.Module, where: str, what: str,
                hint: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the module's state dict taken from `weights`, the classifier keys left out); refuses any
    missing, unexpected or differently shaped tensor in one line naming the first of each:
    `{where}: does not fit {what}: ...; {hint}`."""
    own = module.state_dict()
    ignored = sorted(k for k in weights if k not in own and k.startswith(CLASSIFIER_PREFIXES))
    unexpected = sorted(k for k in weights if k not in own and k not in ignored)
    missing = sorted(k for k in own if k not in weights)
    mismatched = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shapes differ (first: {k} {tuple(weights[k].shape)} here, "
                        f"{tuple(own[k].shape)} in {what})")
    if missing:
        problems.append(f"{len(missing)} tensors missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if problems:
        raise WeightsError(f"{where}: does not fit {what}: {'; '.join(problems)}; {hint}")
    return {k: weights[k].to(own[k].dtype) for k in own}, ignored


def file_sha256(path: str) -> str:
    """The SHA-256 of the file's bytes (hex): what a run records of weights it depends on."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
