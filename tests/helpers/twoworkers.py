"""Run a loss on 2 real processes with gloo and return what DistributedDataParallel would see:
the loss averaged over workers and each parameter's gradient averaged over workers."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, compute, init_file, out_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loss, module = compute(rank, 2, *args)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= 2
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / 2, "grads": grads}, out_file)
    dist.destroy_process_group()


def run_two_workers(compute, folder, name, *args) -> dict:
    """`compute(rank, world, *args) -> (loss, module)` must be a top-level (picklable) function."""
    out = folder / f"{name}.pt"
    mp.spawn(_worker, args=(compute, str(folder / f"{name}.init"), str(out), args), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def single_worker(compute, *args) -> dict:
    loss, module = compute(0, 1, *args)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in module.named_parameters()
                                             if p.grad is not None}}


def same(a: dict, b: dict, atol=1e-6, rtol=1e-4) -> list[str]:
    """Names of the gradients that differ (empty when the loss and every gradient match)."""
    assert torch.allclose(a["loss"], b["loss"], atol=atol), (a["loss"], b["loss"])
    assert a["grads"].keys() == b["grads"].keys()
    return [n for n in a["grads"] if not torch.allclose(a["grads"][n], b["grads"][n], atol=atol, rtol=rtol)]
