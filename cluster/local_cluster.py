"""A Ray cluster on local hosts (`local_hosts.py`), started the way the cluster launcher starts
one from a config such as `cluster/aws.yaml` (issue 30): the config's own
`head_start_ray_commands` on the head and `worker_start_ray_commands` on each worker, run as
written, with only what the launcher would provide around them:

- the node's setup done (`setup_commands` installs selfsup into the node's Python: here the
  Python running this, whose `bin` goes first on PATH);
- `file_mounts`' auth token in each host's `~/.ray/auth_token` (one token, made here);
- `RAY_HEAD_IP` for the workers, and the head's `~/ray_bootstrap_config.yaml`, which names the
  node provider: here Ray's `local` provider with the head alone (no cloud to call);
- a node type's `resources` in `RAY_OVERRIDE_RESOURCES`, as the launcher's updater exports them
  for a cloud provider: the head's `{"CPU": 0}` (no training worker or decode task on it), and
  for a worker type that leaves them to detection (`{}`), the CPU count its instance type would
  show (`cpus`: every host here would otherwise detect this machine's cores).

    with LocalHosts(3) as hosts:
        head, worker, laptop = hosts.hosts
        cluster = LocalRayCluster(hosts, "cluster/aws.yaml")
        cluster.start_head(head)                           # CPU 0, as the config's head type says
        cluster.join(worker, cpus=3)                       # a gpu_spot node with 3 vCPUs
        cluster.grant(laptop)                              # the token, on the user's laptop
        dashboard = cluster.tunnel()                       # http://HEAD:PORT, for ray job submit
        cluster.run(laptop, ["ray", "job", "submit", f"--address={dashboard}", ...])
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import yaml

from cluster.local_hosts import Host, LocalHosts

STATUS_TIMEOUT_S = 120
DASHBOARD_PORT = 8265

# The far end of `ssh -L 8265:127.0.0.1:8265 head` (README, "Reach the dashboard"): the dashboard
# listens on the head's loopback only, so a relay on the head carries a connection from its
# address to it. (Ray's Jobs API still checks the token on every request.)
RELAY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def carry(reader, writer):
    target_reader, target_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[3]))
    await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer), return_exceptions=True)

async def main():
    server = await asyncio.start_server(carry, sys.argv[1], int(sys.argv[2]))
    print("relaying", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def node_environment(host: Host) -> dict[str, str]:
    """The environment of a node set up by `setup_commands`: this environment without its Ray
    settings, the host's own HOME (where a token goes), this Python's `bin` first on PATH."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    environ.update(HOME=host.home, PATH=f"{os.path.dirname(sys.executable)}:{environ.get('PATH', '')}",
                   PYTHONUNBUFFERED="1")
    return environ


class ClusterCommandFailed(RuntimeError):
    """A start command of the config exited non-zero (its output is in the message)."""


class LocalRayCluster:
    """The launcher's part for a cluster config on `hosts`. Stops nothing itself: killing the hosts
    (`LocalHosts.close`) ends every node."""

    def __init__(self, hosts: LocalHosts, config_file: str):
        with open(config_file) as stream:
            config = yaml.safe_load(stream)
        self.hosts = hosts
        self.head_commands: list[str] = config["head_start_ray_commands"]
        self.worker_commands: list[str] = config["worker_start_ray_commands"]
        self.node_types: dict[str, dict] = config["available_node_types"]
        self.head_type: str = config["head_node_type"]
        self.head: Host | None = None

    def environment(self, host: Host, token: bool = True) -> dict[str, str]:
        """The environment a command on `host` runs with (`node_environment`), with the head's
        address, and without the token when not `token`."""
        environ = node_environment(host)
        if self.head:
            environ["RAY_HEAD_IP"] = self.head.address
        if not token:
            environ["HOME"] = os.path.join(host.folder, "no-token-home")
            os.makedirs(environ["HOME"], exist_ok=True)
        return environ

    def run(self, host: Host, argv: list[str], token: bool = True, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """`argv` on `host` to its end, as a shell on that node would run it (with the token's
        RAY_AUTH_MODE set, as README's setup exports it, unless `token` is False)."""
        environ = self.environment(host, token)
        if token:
            environ["RAY_AUTH_MODE"] = "token"
        done = subprocess.run(self.hosts.command(host, argv), env=environ, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise ClusterCommandFailed(f"{host.address}: {' '.join(argv)} exited {done.returncode}: "
                                       f"{(done.stdout + done.stderr)[-2000:]}")
        return done

    def _start_commands(self, host: Host, commands: list[str], node_type: str, cpus: int | None) -> None:
        resources = dict(self.node_types[node_type].get("resources") or {})
        if cpus is not None:
            resources.setdefault("CPU", cpus)  # what detection would find on the node type's instance
        environment = self.environment(host)
        if resources:
            environment["RAY_OVERRIDE_RESOURCES"] = json.dumps(resources)
        log = os.path.join(host.folder, "start.log")
        for command in commands:
            with open(log, "a") as stream:  # `ray start` leaves daemons holding its output open
                stream.write(f"$ {command}\n")
                stream.flush()
                done = subprocess.run(self.hosts.command(host, ["bash", "-c", command]), env=environment,
                                      stdout=stream, stderr=subprocess.STDOUT, timeout=STATUS_TIMEOUT_S)
            if done.returncode != 0:
                with open(log) as stream:
                    raise ClusterCommandFailed(f"{host.address}: `{command}` exited {done.returncode}: "
                                               f"{stream.read()[-2000:]}")

    def start_head(self, head: Host) -> None:
        """The token and the bootstrap config, then the config's head commands on `head`."""
        from ray.autoscaler._private.util import prepare_config

        self.head = head
        os.makedirs(os.path.join(head.home, ".ray"), exist_ok=True)
        subprocess.run(["ray", "get-auth-token", "--generate"], env=self.environment(head), capture_output=True,
                       check=True)  # writes the head's ~/.ray/auth_token
        bootstrap = prepare_config({"cluster_name": "local-hosts", "auth": {"ssh_user": "root"},
                                    "provider": {"type": "local", "head_ip": head.address, "worker_ips": []}})
        with open(os.path.join(head.home, "ray_bootstrap_config.yaml"), "w") as stream:
            yaml.safe_dump(bootstrap, stream)
        self._start_commands(head, self.head_commands, self.head_type, cpus=None)

    def grant(self, host: Host) -> None:
        """The cluster's token in `host`'s `~/.ray/auth_token` (a node's file_mounts; on the
        user's laptop, where README's setup made it)."""
        assert self.head, "start_head first"
        os.makedirs(os.path.join(host.home, ".ray"), exist_ok=True)
        shutil.copy(os.path.join(self.head.home, ".ray", "auth_token"), os.path.join(host.home, ".ray", "auth_token"))

    def join(self, worker: Host, node_type: str = "gpu_spot", cpus: int | None = None) -> None:
        """The token, then the config's worker commands on `worker`, a node of `node_type` whose
        instance has `cpus` vCPUs (None: Ray detects this machine's)."""
        self.grant(worker)
        self._start_commands(worker, self.worker_commands, node_type, cpus)

    def tunnel(self, port: int = 18265) -> str:
        """The dashboard's address for a host outside the cluster (the laptop), through the
        stand-in of an SSH tunnel to the head; returns it as `http://ADDRESS:PORT`."""
        assert self.head, "start_head first"
        relay = self.hosts.run(self.head, [sys.executable, "-c", RELAY, self.head.address, str(port),
                                           str(DASHBOARD_PORT)], stdout=subprocess.PIPE, text=True)
        if relay.stdout.readline().strip() != "relaying":
            raise ClusterCommandFailed(f"{self.head.address}: the dashboard relay did not start")
        return f"http://{self.head.address}:{port}"

    def wait_for_nodes(self, count: int, timeout: float = STATUS_TIMEOUT_S) -> list[dict]:
        """The alive nodes (`ray.nodes()` records, read on the head), once there are `count`."""
        script = ("import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
                  "print(json.dumps([n for n in ray.nodes() if n['Alive']]))")
        deadline = time.monotonic() + timeout
        while True:
            done = self.run(self.head, [sys.executable, "-c", script], check=False)
            # The JSON line, not a line Ray's driver may print after it ("(autoscaler +0s) Resized to ...").
            listed = [line for line in done.stdout.splitlines() if line.startswith("[")]
            nodes = json.loads(listed[-1]) if done.returncode == 0 and listed else []
            if len(nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {count} nodes alive after {timeout:.0f} s: {done.stderr[-1500:]}")
            time.sleep(1)
