"""`--init-from`: continued pretraining from an export, a timm model folder or a weights file."""

import dataclasses
import os

import pytest
import timm
import torch

from pipelines.cli import main
from pipelines.config import build_method
from pipelines.weights.checkpoint import load_state
from pipelines.weights.init_from import InitFromError, initial_weights
from tests.helpers.cli import said_lines
from tests.helpers.runs import tiny_config

IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def with_init(config, path):
    return dataclasses.replace(config, train=dataclasses.replace(config.train, init_from=str(path)))


def perturbed(method):
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.05)
    return method.eval()


def test_a_timm_model_folder_starts_the_backbone_and_its_classifier_is_left_out(tmp_path):
    from timm.models import save_for_hf

    config = tiny_config("simclr", **{"backbone.small_images": False})  # the stem timm builds as is
    donor = perturbed(timm.create_model("resnet18", channels=[8, 16, 32, 64], stem_width=8, num_classes=10))
    save_for_hf(donor, str(tmp_path / "timm"), safe_serialization=True)
    weights, ignored = initial_weights(with_init(config, tmp_path / "timm"))
    assert ignored == ["fc.bias", "fc.weight"]
    method = build_method(config)
    method.init_encoder(weights)
    method.eval()
    donor.reset_classifier(0)
    with torch.no_grad():
        assert torch.allclose(method.features(IMAGES), donor(IMAGES), atol=1e-5)


def test_dino_starts_student_and_teacher_from_the_weights(tmp_path):
    import safetensors.torch

    config = tiny_config("dino")
    donor = perturbed(build_method(config))
    safetensors.torch.save_file(donor.encoder().state_dict(), str(tmp_path / "encoder.safetensors"))
    method = build_method(config)
    method.init_encoder(initial_weights(with_init(config, tmp_path / "encoder.safetensors"))[0])
    method.eval()
    with torch.no_grad():
        expected = donor.encoder()(IMAGES)
        assert torch.allclose(method.backbone(IMAGES), expected, atol=1e-5)
        assert torch.allclose(method.teacher_backbone(IMAGES), expected, atol=1e-5)


def test_weights_that_do_not_fit_are_refused_naming_the_first_misfit(tmp_path):
    config = tiny_config("simclr")
    wider = build_method(tiny_config("simclr", **{"backbone.kwargs.channels": [8, 16, 32, 128]}))
    torch.save(wider.backbone.state_dict(), tmp_path / "wider.pth")
    with pytest.raises(InitFromError, match=r"does not fit the run's resnet18 backbone: \d+ shapes differ \(first: "):
        initial_weights(with_init(config, tmp_path / "wider.pth"))
    torch.save({"not": "weights", "code": print}, tmp_path / "pickled.pth")  # a pickle that names a function
    with pytest.raises(InitFromError, match="not readable as weights"):
        initial_weights(with_init(config, tmp_path / "pickled.pth"))
    with pytest.raises(InitFromError, match="no such file or folder"):
        initial_weights(with_init(config, tmp_path / "absent"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InitFromError, match="no model.safetensors or pytorch_model.bin"):
        initial_weights(with_init(config, tmp_path / "empty"))


def test_cli_refuses_misfitting_weights_in_one_line_before_ray(digits, tmp_path, capsys, monkeypatch):
    from pipelines import cli

    out, _ = digits
    torch.save(build_method(tiny_config("mae")).backbone.state_dict(), tmp_path / "vit.pth")
    monkeypatch.setattr(cli, "start_ray", lambda *args, **kwargs: pytest.fail("Ray was started"))
    code = main(["pretrain", "--method", "simclr", "--data", f"{out}/train", "--init-from", str(tmp_path / "vit.pth")])
    [error] = said_lines(capsys.readouterr().err)
    assert code == 2 and error.startswith(f"selfsup pretrain: error: --init-from {tmp_path / 'vit.pth'}: does not fit")
    # A search refuses them once, before Ray, not in each of its trials.
    code = main(["tune", "--method", "simclr", "--data", f"{out}/train", "--set", f"train.init_from={tmp_path / 'vit.pth'}"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith(f"selfsup tune: error: --init-from {tmp_path / 'vit.pth'}: does not fit")


def test_pretraining_continues_from_an_export(digits, one_epoch_run, tmp_path, capsys):
    """Export a trained encoder, pretrain a new run from it at a learning rate too small to move
    it: the new run's encoder is the exported one (and a random init would not be)."""
    from pipelines.train.pretrain import pretrain

    out, _ = digits
    _, first = one_epoch_run
    assert main(["export", "--checkpoint", first["checkpoint"], "--out", str(tmp_path / "export")]) == 0
    config = with_init(tiny_config(**{"optim.epochs": 1, "optim.base_lr": 1e-9, "train.knn_every_epochs": 0}),
                       tmp_path / "export")
    second = pretrain(config, f"{out}/train", storage=str(tmp_path / "runs"), name="continued")
    exported = build_method(config)
    exported.load_state_dict(load_state(first["checkpoint"])["method"])
    continued = build_method(config)
    continued.load_state_dict(load_state(second["checkpoint"])["method"])
    fresh = build_method(config)
    for name, parameter in exported.backbone.named_parameters():
        assert torch.allclose(dict(continued.backbone.named_parameters())[name], parameter, atol=1e-5), name
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in
                   zip(fresh.backbone.parameters(), exported.backbone.parameters()))
