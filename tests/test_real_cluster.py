"""A real Ray cluster on this machine (issue 30): hosts in network namespaces (cluster/local_hosts.py),
a head and a worker started by `cluster/aws.yaml`'s own start commands (cluster/local_cluster.py),
token auth on, and a third host, the user's laptop, outside the cluster. (A job submitted from
the laptop: benchmarks/cluster/cross_host_job.py, for now.)"""

import json
import os
import sys

import pytest

from cluster.local_hosts import LocalHosts, namespace_pids, unavailable_reason
from tests.helpers.listening import running

REASON = unavailable_reason()
if REASON and os.environ.get("CI") == "true":  # CI runs as root: there these tests must run
    raise RuntimeError(f"CI=true but {REASON}")
pytestmark = [pytest.mark.skipif(bool(REASON), reason=f"no local hosts here: {REASON}"), pytest.mark.slow]

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster", "aws.yaml")

SPREAD = """
import json, socket, ray
ray.init(address="{head}:6379", logging_level="ERROR")

@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def where():
    return ray.util.get_node_ip_address()

print(json.dumps(sorted(ray.get([where.remote() for _ in range(4)]))))
"""


@pytest.fixture(scope="module")
def cluster():
    """Three hosts: a head and a worker started by the config's commands, and a laptop. On
    teardown, nothing of theirs may be left: no namespace, link, folder or process."""
    from cluster.local_cluster import LocalRayCluster

    with LocalHosts(3) as hosts:
        head, worker, laptop = hosts.hosts
        ray_cluster = LocalRayCluster(hosts, CONFIG)
        ray_cluster.start_head(head)
        ray_cluster.join(worker)
        ray_cluster.grant(laptop)
        nodes = ray_cluster.wait_for_nodes(2)
        print(f"nodes at {sorted(node['NodeManagerAddress'] for node in nodes)}")
        yield ray_cluster, hosts, nodes
        pids = [pid for host in hosts.hosts for pid in namespace_pids(host.name)]
    assert hosts.leftovers() == []
    assert [running(pid) for pid in pids if running(pid)] == [], "processes of the hosts left"


def test_the_configs_own_start_commands_make_a_two_host_cluster(cluster):
    ray_cluster, hosts, nodes = cluster
    head, worker, _ = hosts.hosts
    assert sorted(node["NodeManagerAddress"] for node in nodes) == sorted([head.address, worker.address])
    script = SPREAD.format(head=head.address)
    done = ray_cluster.run(head, [sys.executable, "-c", script])
    assert set(json.loads(done.stdout.strip().splitlines()[-1])) == {head.address, worker.address}


def test_a_client_without_the_token_is_refused(cluster):
    """From the laptop (not a node: it reads the cluster's state, as `ray status` does; it runs
    work through the Jobs API), with the cluster's token and without it."""
    ray_cluster, hosts, _ = cluster
    head, worker, laptop = hosts.hosts
    status = ["ray", "status", f"--address={head.address}:6379"]
    refused = ray_cluster.run(laptop, status, token=False, check=False, timeout=180)
    said = (refused.stdout + refused.stderr).strip()
    print(f"without the token: exit {refused.returncode}: {said.splitlines()[-1] if said else ''}")
    assert refused.returncode != 0 and "auth" in said.lower(), said[-2000:]
    admitted = ray_cluster.run(laptop, status)
    assert "4.0 CPU" in admitted.stdout or "0.0/4.0 CPU" in admitted.stdout, admitted.stdout[-2000:]
