"""Export a checkpoint's encoder as a timm model folder: `model.safetensors` + `config.json`.

The folder is what timm itself writes for the Hugging Face hub (`timm.models.save_for_hf`), so
timm loads it with its own calls and no selfsup code:

    model = timm.create_model("local-dir:DIR", pretrained=True)            # timm >= 1.0.16
    model = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"),
                              **MODEL_ARGS)                                   # any timm 1.x

`model(images)` then gives exactly the features selfsup evaluates (`Method.features`), and
`timm.data.resolve_data_config({}, model=model)` the preprocessing (size, mean, std) it trained
with. The export checks both loading routes against the checkpoint before it returns.

One architecture timm cannot express: a ResNet with selfsup's small-image stem (3x3 stride-1
conv, no max-pool; `backbone.small_images`). Its folder loads with the standard timm model and
two lines that swap the stem (`SMALL_STEM_RECIPE`, printed by the export with its paths).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from methods.backbone import small_image_stem
from pipelines.config import build_method
from pipelines.images.shards import DataError
from pipelines.weights.checkpoint import load_checkpoint, load_state
from pipelines.weights.timm_model import timm_model

EXPORT_INFO = "selfsup"  # the config.json key where the export records where it came from
SMALL_STEM_RECIPE = (  # str.format(arch=..., folder=...)
    'model = timm.create_model("{arch}", **json.load(open("{folder}/config.json"))["model_args"]); '
    "model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False); "
    "model.maxpool = torch.nn.Identity(); "
    'model.load_state_dict(safetensors.torch.load_file("{folder}/model.safetensors"))'
)
FEATURE_TOLERANCE = 1e-4  # max |timm features - checkpoint features| accepted by the self-check


def load_line(arch: str, folder: str, stem: bool) -> str:
    """The Python line, imports included, that loads an export `folder` (absolute) of `arch`:
    timm's own loader, or the small-image stem's recipe."""
    if stem:
        return "import json, safetensors.torch, timm, torch; " + SMALL_STEM_RECIPE.format(arch=arch, folder=folder)
    return f'import timm; model = timm.create_model("local-dir:{folder}", pretrained=True)'


class ExportError(DataError):
    """An export that would not load in timm as the checkpoint's encoder."""


def readable_by_umask(folder: str) -> None:
    """safetensors writes its files with mode 0600; an export is for sharing, so its files get the
    mode any new file gets here (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def load_exported(folder: str) -> nn.Module:
    """The exported encoder through timm's own loader (or the small-stem recipe), in eval mode."""
    import safetensors.torch
    import timm

    with open(os.path.join(folder, "config.json")) as stream:
        exported = json.load(stream)
    info = exported.get(EXPORT_INFO, {})
    if info.get("small_images_stem"):
        model = small_image_stem(timm.create_model(exported["architecture"], pretrained=False, **exported["model_args"]))
        model.load_state_dict(safetensors.torch.load_file(os.path.join(folder, "model.safetensors")))
    else:
        model = timm.create_model(
            exported["architecture"], pretrained=True,
            # the head's size too: timm drops a classifier whose size differs from the cfg's (1000)
            pretrained_cfg_overlay=dict(file=os.path.join(folder, "model.safetensors"),
                                        num_classes=exported["model_args"].get("num_classes", 0)),
            **exported["model_args"],
        )
    return model.eval()


def export_encoder(checkpoint: str, out: str, overwrite: bool = False, seed: int = 0, onnx: bool = False) -> dict:
    """Write `checkpoint`'s encoder (DINO's teacher, MAE's encoder, SimCLR's backbone without its
    projection head) to `out` as a timm model folder, then load it back through timm and check it
    gives the checkpoint's features on random images. With `onnx`, also `encoder.onnx` (see
    `export_onnx`). Returns what was written and checked."""
    if onnx:
        _require_onnx()
    from timm.models import save_for_hf

    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out}: not empty (pass --overwrite to replace its files)")
    state = load_state(checkpoint)
    method, config = load_checkpoint(checkpoint, state)
    method.eval()
    model, args, stem = _timm_encoder(method, config, checkpoint)
    progress = state.get("progress", {})
    info = {
        "method": config.method,
        "checkpoint": os.path.abspath(checkpoint),
        "step": progress.get("step"),
        "epoch": progress.get("epoch"),
        "small_images_stem": stem,
        "feature_dim": int(model.num_features),
    }
    os.makedirs(out, exist_ok=True)
    save_for_hf(model.eval(), out, model_config={"model_args": args, EXPORT_INFO: info}, safe_serialization=True)
    readable_by_umask(out)
    error = _check_reload(method, out, seed)
    folder = os.path.abspath(out)
    load = load_line(config.backbone.name, folder, stem)
    result = {"out": out, "architecture": config.backbone.name, "model_args": args, "feature_dim": info["feature_dim"],
              "max_feature_difference": error, "method": config.method, "checkpoint": checkpoint, "load": load}
    if onnx:
        result["onnx"] = export_onnx(load_exported(out), os.path.join(out, ONNX_FILE), method.eval_size,
                                     config.recipe(), seed)
    return result


def _timm_encoder(method, config, checkpoint: str) -> tuple[nn.Module, dict, bool]:
    """(a bare timm model holding the method's encoder weights, its `pretrained_cfg` saying how
    evaluation feeds it (the training view size, the whole canvas, the recipe's normalisation);
    its arguments; whether it has the small-image stem)."""
    model, args, stem = timm_model(method, config)
    missing, unexpected = model.load_state_dict(method.encoder().state_dict(), strict=False)
    if missing or unexpected:
        raise ExportError(f"checkpoint {checkpoint}: encoder does not match timm {config.backbone.name} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    set_evaluation_cfg(model, method.eval_size, config.recipe(), 0)
    return model, args, stem


def set_evaluation_cfg(model: nn.Module, size: int, recipe, num_classes: int) -> None:
    """`model.pretrained_cfg` saying how evaluation feeds it: the training view size, the whole
    canvas, the recipe's normalisation; no download location."""
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "input_size": (3, size, size),
        "test_input_size": (3, size, size),  # timm's architecture default (ResNets: 288) is not what it trained at
        "crop_pct": 1.0,  # evaluation resizes the whole (square) canvas, no centre crop
        "interpolation": "bilinear",
        "mean": tuple(recipe.mean),
        "std": tuple(recipe.std),
        "num_classes": num_classes,
    }
    for key in ("hf_hub_id", "url", "file", "tag", "license", "origin_url", "paper_ids", "notes", "test_crop_pct"):
        model.pretrained_cfg.pop(key, None)


def export_classifier(classifier, config, num_classes: int, out: str, info: dict, overwrite: bool = False,
                      seed: int = 0) -> dict:
    """Write a fine-tuned `classifier` (`train.classifier.Classifier` of a run of `config`) to
    `out` as a timm model folder, backbone and head, loaded back through timm and checked to give
    its class scores. `info` is recorded under `config.json`'s `selfsup` key."""
    from timm.models import save_for_hf

    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out}: not empty (pass --overwrite to replace its files)")
    _, args, stem = timm_model(build_method(config), config, num_classes)
    model = classifier.model.eval()
    set_evaluation_cfg(model, classifier.eval_size, config.recipe(), num_classes)
    os.makedirs(out, exist_ok=True)
    save_for_hf(model, out, model_config={"model_args": args, EXPORT_INFO: {**info, "small_images_stem": stem}},
                safe_serialization=True)
    readable_by_umask(out)
    error = _check_reload(classifier, out, seed)
    folder = os.path.abspath(out)
    load = load_line(config.backbone.name, folder, stem)
    return {"out": out, "architecture": config.backbone.name, "model_args": args, "max_score_difference": error,
            "load": load}


def _check_reload(method, out: str, seed: int) -> float:
    """The largest difference between the method's features (a classifier's: its class scores)
    and those of the folder `out` loaded through timm, on random images; refused above
    FEATURE_TOLERANCE."""
    size = method.eval_size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = method.features(images)
        got = load_exported(out)(images)
    error = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if error > FEATURE_TOLERANCE:
        raise ExportError(f"--out {out}: timm's model gives features {tuple(got.shape)} differing from the "
                          f"checkpoint's {tuple(expected.shape)} by {error:.2e} (> {FEATURE_TOLERANCE})")
    return error


ONNX_FILE = "encoder.onnx"


def _require_onnx() -> None:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("--format onnx: needs onnx, onnxscript and onnxruntime: "
                          "pip install 'selfsup[onnx]'") from None


def export_onnx(model: nn.Module, path: str, size: int, recipe, seed: int = 0) -> dict:
    """`model` (the exported encoder) as ONNX at `path`: input `images (batch, 3, size, size)`
    float32, normalised with the recipe's mean and std; output `features (batch, d)`. Run with
    onnxruntime on a batch of another size than the one traced and compared with PyTorch's
    features; refused beyond FEATURE_TOLERANCE."""
    import contextlib
    import io

    import onnxruntime

    traced = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each pass
        torch.onnx.export(model, (traced,), path, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}}, dynamo=True)
    images = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        expected = model(images)
    error = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if error > FEATURE_TOLERANCE:
        raise ExportError(f"--format onnx: onnxruntime's features of {path} differ from PyTorch's by {error:.2e} "
                          f"(> {FEATURE_TOLERANCE})")
    return {"path": os.path.abspath(path), "input": f"images (batch, 3, {size}, {size}) float32, normalised with "
            f"mean {tuple(round(m, 4) for m in recipe.mean)} and std {tuple(round(s, 4) for s in recipe.std)}",
            "max_feature_difference": error}

