import pytest
import torch

from methods.backbone import BackboneConfig
from methods.mae import MAE, MAEHyperparameters, mae_recipe
from pipelines.config import build_config
from tests.helpers.twoworkers import run_two_workers, same, single_worker


def make_mae(norm_pix=True, seed=0):
    torch.manual_seed(seed)
    backbone = BackboneConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4,
                              kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    hparams = MAEHyperparameters(decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix)
    return MAE(backbone, hparams, mae_recipe(16))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 0.9])
def test_masking_keeps_round_L_times_one_minus_r_tokens_different_per_sample(ratio):
    x = torch.randn(8, 64, 5)
    visible, mask, ids_restore = MAE.random_masking(x, ratio)
    keep = round(64 * (1 - ratio))
    assert visible.shape == (8, keep, 5)
    assert (mask.sum(1) == 64 - keep).all()
    assert len({tuple(m.tolist()) for m in mask}) == 8  # every sample its own patches
    # the visible tokens are exactly the unmasked ones
    for row in range(8):
        assert torch.equal(visible[row].sort(0).values, x[row][mask[row] == 0].sort(0).values)
    assert torch.equal(torch.gather(torch.argsort(ids_restore, 1), 1, ids_restore), torch.arange(64).expand(8, -1))


def test_predictions_on_visible_patches_do_not_change_the_loss():
    method = make_mae()
    imgs = torch.randn(4, 3, 16, 16)
    _, mask, _ = method.random_masking(torch.zeros(4, 16, 1), 0.75)
    pred = torch.randn(4, 16, 48)
    changed = pred.clone()
    changed[mask == 0] = 1e3  # only visible patches
    assert method.forward_loss(imgs, pred, mask) == method.forward_loss(imgs, changed, mask)
    changed[mask == 1] += 1  # a masked patch does change it
    assert method.forward_loss(imgs, pred, mask) != method.forward_loss(imgs, changed, mask)


def test_norm_pix_targets_have_zero_mean_unit_variance_per_patch():
    targets = make_mae().targets(torch.rand(3, 3, 16, 16) * 5 + 2)
    assert torch.allclose(targets.mean(-1), torch.zeros(3, 16), atol=1e-5)
    assert torch.allclose(targets.var(-1), torch.ones(3, 16), atol=1e-3)
    raw = make_mae(norm_pix=False)
    imgs = torch.rand(1, 3, 16, 16)
    assert torch.equal(raw.targets(imgs), raw.patchify(imgs))
    assert torch.equal(raw.unpatchify(raw.patchify(imgs)), imgs)


def mae_loss(rank, world):
    method = make_mae()
    generator = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(8, 3, 16, 16, generator=generator), torch.rand(8, 16, generator=generator)
    per = 8 // world
    part = slice(rank * per, (rank + 1) * per)
    loss, _ = method([imgs[part]], noise=noise[part])  # the same masks as one worker would draw
    return loss, method


@pytest.mark.slow  # spawns its own processes (a worker group or a simulated cluster)
def test_two_workers_equal_one_worker(tmp_path):
    assert same(run_two_workers(mae_loss, tmp_path, "mae"), single_worker(mae_loss)) == []


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_mask_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=rf"hparams.mask_ratio={ratio}: must be in \(0, 1\)"):
        build_config("mae", "tiny", sets={"hparams.mask_ratio": ratio})


def test_features_pool_cls_or_mean_without_masking():
    method = make_mae()
    images = torch.randn(2, 3, 16, 16)
    tokens = method.backbone.forward_features(images)
    assert torch.equal(method.features(images), tokens[:, 0])
    method.hparams.feature_pool = "mean"
    assert torch.allclose(method.features(images), tokens[:, 1:].mean(1))


def test_reference_init_is_the_mae_codes_and_timm_init_is_kept_on_request():
    import math

    from pipelines.config import build_method
    from tests.helpers.runs import tiny_config

    reference = build_method(tiny_config("mae"))
    timm_init = build_method(tiny_config("mae", **{"hparams.init": "timm"}))
    for method in (reference, timm_init):
        qkv = method.backbone.blocks[0].attn.qkv
        qkv_weight, qkv_bias = qkv.weight.detach(), qkv.bias
        xavier_std = math.sqrt(2 / sum(qkv_weight.shape))  # uniform(-b, b), b = sqrt(6 / (fan_in + fan_out))
        patch = method.backbone.patch_embed.proj.weight.detach().flatten(1)
        cls_token = method.backbone.cls_token.detach()
        if method is reference:
            assert float(qkv_weight.std()) == pytest.approx(xavier_std, rel=0.05) and not qkv_bias.any()
            assert float(patch.std()) == pytest.approx(math.sqrt(2 / sum(patch.shape)), rel=0.1)
            assert float(cls_token.std()) == pytest.approx(0.02, rel=0.3)
        else:  # timm's truncated normal, std 0.02, and its near-zero class token
            assert float(qkv_weight.std()) == pytest.approx(0.02, rel=0.1) and float(qkv_weight.std()) < xavier_std / 3
            assert float(cls_token.abs().max()) < 1e-4
        assert float(method.mask_token.detach().std()) == pytest.approx(0.02, rel=0.3)
