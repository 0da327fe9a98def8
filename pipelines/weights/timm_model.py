"""A checkpoint's encoder as a plain timm model: the arguments that rebuild it with `timm.create_model`
(with or without a classifier head), and the one architecture change timm cannot express (the
small-image stem). `selfsup export` writes such models; fine-tuning trains one with a head."""

from __future__ import annotations

from torch import nn

from methods.backbone import small_image_stem


def timm_model_args(method, config, num_classes: int = 0) -> dict:
    """The `timm.create_model` arguments that rebuild the encoder so that its `forward` gives the
    method's evaluation features (the method's pooling), followed by a head of `num_classes`
    outputs (0: none, the features themselves)."""
    args = dict(config.backbone.kwargs)
    for key in ("img_size", "patch_size"):
        if getattr(config.backbone, key) is not None:
            args[key] = getattr(config.backbone, key)
    if "channels" in args:
        args["channels"] = list(args["channels"])
    args.update(method.encoder_model_args())
    args["num_classes"] = num_classes
    return args


def bare_model(config, **args) -> nn.Module:
    """`config`'s backbone architecture from timm with `args`, randomly initialised, stem unchanged."""
    import timm

    return timm.create_model(config.backbone.name, pretrained=False, **args)


def small_stem(config) -> bool:
    """Whether `config`'s backbone is a ResNet with selfsup's small-image stem."""
    from timm.models.resnet import ResNet

    return bool(config.backbone.small_images) and isinstance(bare_model(config), ResNet)


def timm_model(method, config, num_classes: int = 0) -> tuple[nn.Module, dict, bool]:
    """(the encoder architecture as a timm model with a head of `num_classes`, its
    `timm.create_model` arguments, whether it has the small-image stem); weights random."""
    args, stem = timm_model_args(method, config, num_classes), small_stem(config)
    model = bare_model(config, **args)
    return (small_image_stem(model) if stem else model), args, stem
