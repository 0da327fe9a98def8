"""SimCLR's global-batch semantics: 2 workers x B must equal 1 worker x 2B, loss and gradients.

Real processes and gloo collectives, as on a cluster. The backbone is a ViT and the head has no
BatchNorm, so no per-worker batch statistics differ between the two set-ups.
"""

import pytest
import torch
import torch.distributed as dist

from methods.backbone import BackboneConfig
from methods.simclr import NTXentLoss, SimCLR, SimCLRHyperparameters, simclr_recipe
from tests.helpers.twoworkers import run_two_workers, same, single_worker

IMAGES = 12  # global batch


def forward_only_gather(tensor):
    """The bug of lightly #1528: other workers' projections arrive without gradient."""
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def simclr_loss(rank, world, broken=False):
    if broken:
        import methods.simclr

        methods.simclr.gather_with_grad = forward_only_gather
    torch.manual_seed(0)
    backbone = BackboneConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4,
                              kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    hparams = SimCLRHyperparameters(temperature=0.2, proj_hidden=32, proj_out=16, head_batch_norm=False)
    method = SimCLR(backbone, hparams, simclr_recipe(16))
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(IMAGES, 3, 16, 16, generator=generator) for _ in range(2)]
    per = IMAGES // world
    loss, _ = method([v[rank * per : (rank + 1) * per] for v in views])
    return loss, method


@pytest.fixture(scope="module")
def one_worker():
    return single_worker(simclr_loss)


@pytest.mark.slow  # spawns its own processes (a worker group or a simulated cluster)
def test_two_workers_equal_one_worker_on_the_same_views(tmp_path, one_worker):
    assert same(run_two_workers(simclr_loss, tmp_path, "simclr"), one_worker) == []


@pytest.mark.slow  # spawns its own processes (a worker group or a simulated cluster)
def test_a_forward_only_gather_would_be_caught(tmp_path, one_worker):
    broken = run_two_workers(simclr_loss, tmp_path, "broken", True)
    assert same(broken, one_worker)  # same loss value, but some gradients differ


def test_ntxent_matches_a_direct_formula():
    generator = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / 0.5
    total = 0.0
    for i in range(10):
        positive = (i + 5) % 10
        others = torch.cat([similarity[i, :i], similarity[i, i + 1 :]])
        total += -(similarity[i, positive] - torch.logsumexp(others, 0))
    assert torch.allclose(NTXentLoss(0.5)(z1, z2), total / 10, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
