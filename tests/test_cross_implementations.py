"""Each method's loss against an independent implementation, lightly 1.6 (a test-only dependency):
on identical inputs, the same loss and the same gradients within float tolerance. Where the two
scale or configure a loss differently on purpose, the test sets both sides to one configuration
or states the exact relation, and says why."""

from __future__ import annotations

import pytest
import torch

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is in the `test` extra")
from lightly.models import utils as lightly_utils  # noqa: E402

from methods.byol import BYOLLoss  # noqa: E402
from methods.dino import DINOLoss  # noqa: E402
from methods.regularizers import koleo_loss  # noqa: E402
from methods.simclr import NTXentLoss  # noqa: E402
from pipelines.config import build_method  # noqa: E402
from tests.helpers.runs import tiny_config  # noqa: E402

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def leaves(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).requires_grad_() for shape in shapes]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_nt_xent_equals_lightly(temperature):
    z1, z2 = leaves((16, 32), (16, 32))
    ours = NTXentLoss(temperature)(z1, z2)
    theirs = lightly_loss.NTXentLoss(temperature=temperature)(z1, z2)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    for mine, other in zip(grads(ours, [z1, z2]), grads(theirs, [z1, z2])):
        torch.testing.assert_close(mine, other, **TOLERANCE)
    # the comparison can fail: pairing image i with image i+1 is another loss
    assert not torch.allclose(NTXentLoss(temperature)(z1, z2.roll(1, dims=0)), theirs, rtol=1e-3)


def test_byol_loss_is_lightlys_symmetric_negative_cosine_scaled():
    """BYOL's paper loss is ||p/|p| - z/|z|||^2 = 2 - 2 cos, summed over both directions (ours, in
    [0, 8]); lightly's BYOL example averages the negative cosines of both directions. So ours
    = 4 + 4 x theirs exactly, and its gradients are 4 x theirs: the same optimum, a 4x LR."""
    p1, p2, z1, z2 = leaves((16, 32), (16, 32), (16, 32), (16, 32))
    ours = BYOLLoss()(p1, p2, z1, z2)
    cosine = lightly_loss.NegativeCosineSimilarity()
    theirs = 0.5 * (cosine(p1, z2.detach()) + cosine(p2, z1.detach()))
    torch.testing.assert_close(ours, 4 + 4 * theirs, **TOLERANCE)
    for mine, other in zip(grads(ours, [p1, p2]), grads(theirs, [p1, p2])):
        torch.testing.assert_close(mine, 4 * other, **TOLERANCE)
    fresh = BYOLLoss()(p1, p2, z1, z2)  # the target gets no gradient (lightly's example detaches it too)
    assert torch.autograd.grad(fresh, [z1], allow_unused=True)[0] is None


def test_dino_loss_and_center_equal_lightly_over_two_steps():
    """Two global and two local views; teacher temperature 0.04 on both sides (lightly's warm-up
    schedule is bypassed by passing the temperature, as our method does each step)."""
    k, n = 64, 8
    ours = DINOLoss(k, student_temp=0.1, center_momentum=0.9, global_views=2)
    theirs = lightly_loss.DINOLoss(output_dim=k, warmup_teacher_temp=0.04, teacher_temp=0.04, student_temp=0.1,
                                   center_momentum=0.9)
    for step in range(2):  # the second step uses the center the first one updated
        student, teacher = leaves((4 * n, k), (2 * n, k), seed=step)
        mine, _ = ours(student, teacher, teacher_temp=0.04)
        ours.update_center()
        other = theirs(list(teacher.split(n)), list(student.split(n)), teacher_temp=0.04)
        torch.testing.assert_close(mine, other, **TOLERANCE)
        torch.testing.assert_close(grads(mine, [student])[0], grads(other, [student])[0], **TOLERANCE)
        torch.testing.assert_close(ours.center, theirs.center.reshape(1, k), **TOLERANCE)
    assert ours.center.abs().sum() > 0


def test_koleo_equals_lightlys():
    """DINOv2's KoLeo term, which our DINO adds at hparams.koleo_weight > 0."""
    (features,) = leaves((16, 32))
    mine, other = koleo_loss(features), lightly_loss.KoLeoLoss()(features)
    torch.testing.assert_close(mine, other, **TOLERANCE)
    torch.testing.assert_close(grads(mine, [features])[0], grads(other, [features])[0], **TOLERANCE)


def test_mae_patches_and_masked_loss_equal_lightlys():
    """lightly's MAE example regresses raw pixels; ours defaults to the official MAE's per-patch
    normalised targets (`norm_pix_loss`), so both sides run without it here."""
    method = build_method(tiny_config("mae", **{"hparams.norm_pix_loss": False}))
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    patches = method.patchify(images)
    torch.testing.assert_close(patches, lightly_utils.patchify(images, method.patch))
    torch.testing.assert_close(method.unpatchify(patches), images)
    torch.manual_seed(1)
    latent, mask, ids_restore = method.forward_encoder(images, 0.75)
    pred = method.forward_decoder(latent, ids_restore).detach().requires_grad_()
    ours = method.forward_loss(images, pred, mask)
    masked = mask.bool()
    theirs = torch.nn.functional.mse_loss(pred[masked], lightly_utils.patchify(images, method.patch)[masked])
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    torch.testing.assert_close(grads(ours, [pred])[0], grads(theirs, [pred])[0], **TOLERANCE)
    assert int(masked.sum()) == 4 * round(mask.shape[1] * 0.75)  # the same share hidden in every image
