"""A spot cluster simulated on one machine (`ray.cluster_utils.Cluster`), to rehearse what a
preemption or an autoscaler does to a run: used by the fault-tolerance tests and the elastic
benchmark. Not for production.

    with SpotCluster(head_cpus=1, nodes=3, node_cpus=2) as cluster:
        run = cluster.start(lambda: pretrain(config, data, storage=..., name=...))
        cluster.wait_for(lambda: ..., "a checkpoint")
        cluster.preempt_a_worker_node()   # the node of one training worker, without warning
        cluster.add_node()                # the autoscaler brings one back
        result = run.join()
"""

from __future__ import annotations

import os
import socket
import threading
import time


class RunThread(threading.Thread):
    """A call run in a thread; `join()` returns its result or raises its error."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self._call, self.result, self.error = call, None, None

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as error:  # noqa: BLE001  (re-raised in join)
            self.error = error

    def join(self, timeout: float | None = None):
        super().join(timeout)
        if self.is_alive():
            raise TimeoutError(f"the run did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class SpotCluster:
    """A head of `head_cpus` CPUs plus `nodes` nodes of `node_cpus` CPUs, joined by this process.

    Every actor of the job is pinned (RAY_ADDRESS) to this cluster, so Ray's own state-API calls
    do not wander to another Ray on the same machine (e.g. a test session's)."""

    def __init__(self, head_cpus: int = 0, nodes: int = 2, node_cpus: int = 2):
        self.head_cpus, self.node_count, self.node_cpus = head_cpus, nodes, node_cpus
        self.nodes: list = []
        self.preempted: list[str] = []

    def __enter__(self) -> SpotCluster:
        import ray
        from ray.cluster_utils import Cluster

        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        with socket.socket() as probe:  # a free dashboard port: another Ray may hold 8265
            probe.bind(("127.0.0.1", 0))
            dashboard_port = probe.getsockname()[1]
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.head_cpus, "include_dashboard": True, "dashboard_port": dashboard_port})
        self.nodes = [self.cluster.add_node(num_cpus=self.node_cpus) for _ in range(self.node_count)]
        ray.init(address=self.cluster.address, logging_level="WARNING",
                 runtime_env={"env_vars": {"RAY_ADDRESS": self.cluster.address}})
        self.cluster.wait_for_nodes()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()

    def start(self, call) -> RunThread:
        self._run = RunThread(call)
        self._run.start()
        return self._run

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        """Poll `condition` until it holds; fail if the run ends or `timeout` passes first."""
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline or not self._run.is_alive():
                raise RuntimeError(f"timed out waiting for {what}" + (f" ({self._run.error!r})" if self._run.error else ""))
            time.sleep(0.2)

    def training_workers(self, alive_only: bool = True) -> list:
        """Ray's records (`ActorState`: `node_id`, `pid`, ...) of the Ray Train workers: the live
        ones, or every one the job ever had."""
        from ray.util.state import list_actors

        filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive_only else [])
        return list_actors(address=self.cluster.gcs_address, filters=filters)

    def training_nodes(self, alive_only: bool = True) -> list[str]:
        """Node ids of the Ray Train workers (live ones, or every one the job ever had)."""
        return sorted(worker.node_id for worker in self.training_workers(alive_only))

    def preempt_a_worker_node(self, graceful: bool = False) -> str:
        """Remove a node that holds a training worker; returns its id. Without `graceful` the node
        just dies (Ray notices through missed health checks); with it, the node is drained
        first, as after a spot notice."""
        busy = set(self.training_nodes())
        node = next(n for n in self.nodes if n.node_id in busy)
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.nodes.remove(node)
        self.preempted.append(node.node_id)
        return node.node_id

    def add_node(self) -> str:
        node = self.cluster.add_node(num_cpus=self.node_cpus)
        self.nodes.append(node)
        return node.node_id
