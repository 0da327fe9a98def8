"""SimCLR's global-batch semantics: 2 workers x B must equal 1 worker x 2B, loss and gradients.

Real processes and gloo collectives, as on a cluster. The backbone is a ViT and the head has no
BatchNorm, so no per-worker batch statistics differ between the two set-ups.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods.backbone import BackboneConfig
from methods.simclr import SimCLR, SimCLRHyperparameters
from pipelines.views import simclr_recipe

HALF = 6  # images per worker


def make_method():
    torch.manual_seed(0)
    backbone = BackboneConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4,
                              kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    hparams = SimCLRHyperparameters(temperature=0.2, proj_hidden=32, proj_out=16, head_batch_norm=False)
    return SimCLR(backbone, hparams, simclr_recipe(16))


def make_views():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2 * HALF, 3, 16, 16, generator=generator) for _ in range(2)]


def grads_of(method):
    return {name: p.grad.detach().clone() for name, p in method.named_parameters() if p.grad is not None}


def forward_only_gather(tensor):
    """The bug of lightly #1528: other workers' projections arrive without gradient."""
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach())
    parts[dist.get_rank()] = tensor
    return torch.cat(parts)


def worker(rank, init_file, out_file, broken):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if broken:
        import methods.simclr

        methods.simclr.gather_with_grad = forward_only_gather
    method = make_method()
    views = [v[rank * HALF : (rank + 1) * HALF] for v in make_views()]
    loss, _ = method(views)
    loss.backward()
    grads = grads_of(method)
    for grad in grads.values():  # what DistributedDataParallel does: average over workers
        dist.all_reduce(grad)
        grad /= 2
    dist.all_reduce(loss_sum := loss.detach().clone())
    if rank == 0:
        torch.save({"loss": loss_sum / 2, "grads": grads}, out_file)
    dist.destroy_process_group()


def run_two_workers(tmp_path, broken=False):
    out = tmp_path / f"two_workers_{broken}.pt"
    mp.spawn(worker, args=(str(tmp_path / f"init_{broken}"), str(out), broken), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_worker():
    method = make_method()
    loss, _ = method(make_views())
    loss.backward()
    return loss.detach(), grads_of(method)


def test_two_workers_equal_one_worker_on_the_same_views(tmp_path, one_worker):
    loss, grads = one_worker
    distributed = run_two_workers(tmp_path)
    assert torch.allclose(distributed["loss"], loss, atol=1e-6)
    assert grads.keys() == distributed["grads"].keys()
    for name, grad in grads.items():
        assert torch.allclose(distributed["grads"][name], grad, atol=1e-6, rtol=1e-4), name


def test_a_forward_only_gather_would_be_caught(tmp_path, one_worker):
    loss, grads = one_worker
    broken = run_two_workers(tmp_path, broken=True)
    assert torch.allclose(broken["loss"], loss, atol=1e-6)  # same loss value...
    differs = [n for n, g in grads.items() if not torch.allclose(broken["grads"][n], g, atol=1e-6, rtol=1e-4)]
    assert differs  # ...but wrong gradients


def test_ntxent_matches_a_direct_formula():
    from methods.simclr import NTXentLoss

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
