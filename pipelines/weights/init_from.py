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

import torch

from methods.weights import WeightsError, fit_weights, read_weights
from pipelines.config import build_method
from pipelines.images.shards import DataError


class InitFromError(DataError):
    """Weights that cannot start the run's backbone; the message names the file and the first misfit."""


def initial_weights(config) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """`config.train.init_from`'s weights fitted to the run's backbone (`methods.weights.fit_weights`), or
    None when the run starts from random init."""
    if not config.train.init_from:
        return None
    backbone, path = build_method(config).backbone, config.train.init_from
    try:
        return fit_weights(read_weights(path, "--init-from"), backbone, f"--init-from {path}",
                           f"the run's {config.backbone.name} backbone",
                           "pick the preset or backbone.* settings these weights were trained with")
    except WeightsError as error:
        raise InitFromError(str(error)) from None


def method_from_weights(config):
    """`config`'s method with `config.train.init_from`'s weights in its backbone: an encoder from a
    timm or `selfsup export` folder, for the commands that only run one (`selfsup curate`)."""
    method = build_method(config)
    weights, _ = initial_weights(config)
    method.init_encoder(weights)  # as a run starts from them (DINO: student and teacher)
    return method
