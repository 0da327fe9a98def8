"""PyTorch's process group on loopback, for runs whose Ray listens on loopback only (local_ray.py).

Ray Train connects the workers' process group through PyTorch's TCPStore, whose server binds the
wildcard address (`::`, all interfaces) and has no switch to bind another; gloo and NCCL then
listen on the interface of the host name's address. So, measured in tests/test_security.py, even a
one-worker local run listened on `::` for the whole run. Here rank 0 hosts the store on a socket we
bind to 127.0.0.1 ourselves (TCPStore's `master_listen_fd`), and gloo/NCCL are pointed at the
loopback interface (`GLOO_SOCKET_IFNAME`, `NCCL_SOCKET_IFNAME`). Everything else is Ray's own
`_TorchBackend` (device setup, shutdown).
"""

from __future__ import annotations

import datetime
import os
import socket

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

from methods.versions import require
from pipelines.train.local_ray import loopback_only

require("ray", "binds PyTorch's process group to loopback (Ray Train's _TorchBackend)")

_store = None  # rank 0's TCPStore server, alive as long as the process group


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), names[0])


def _host_store(world_size: int, timeout_s: float) -> int:
    """On rank 0: a TCPStore server on 127.0.0.1; its port."""
    global _store
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    _store = dist.TCPStore("127.0.0.1", port, world_size, True, datetime.timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=listener.detach())
    return port


def _join(rank: int, world_size: int, port: int, backend: str, timeout_s: float) -> None:
    interface = loopback_interface()
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    os.environ["NCCL_SOCKET_IFNAME"] = interface
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _store if rank == 0 else dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        world = len(worker_group)
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        worker_group.execute(_set_torch_distributed_env_vars)
        port = worker_group.execute_single(0, _host_store, world, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, _join, rank, world, port, backend, backend_config.timeout_s)
                 for rank in range(world)])


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return LoopbackTorchBackend


def torch_config() -> TorchConfig:
    """The TorchConfig for this process's runs: on loopback when its Ray is, else Ray's own."""
    return LoopbackTorchConfig() if loopback_only() else TorchConfig()
