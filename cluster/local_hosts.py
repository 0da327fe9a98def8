"""Separate hosts on one Linux machine, to run a real Ray cluster where there is one computer
(issue 30). Each host is a network namespace with its loopback up and one veth leg on a bridge
that joins them, at an address of a private /24 drawn per run; a PID namespace of its own (with
its own /proc), so `ray stop` in a host stops that host's Ray, not the machine's; a host name of
its own that resolves to its address, as a cloud VM's does (gloo and NCCL listen on it); and a
folder of its own (`Host.folder`: a home for HOME, and its /tmp/ray, where Ray keeps a node's
sessions and sockets). The rest of the file system is shared, the stand-in for the storage every
node of a real cluster mounts. Needs root (`ip netns`, `unshare`, `nsenter`, as CI has); nothing
outside the hosts' own addresses is ever contacted.

    with LocalHosts(3) as hosts:            # e.g. a head, a worker, a "laptop"
        head, worker, laptop = hosts.hosts
        hosts.run(head, ["ray", "start", "--head", f"--node-ip-address={head.address}", ...])
        hosts.kill(worker)                  # every process of that host, as if it lost power
        fresh = hosts.add()                 # a new host joins (the autoscaler's new machine)
        ...                                 # on exit: processes killed, namespaces and links gone

Every name starts with `PREFIX` and the creating process's id, so a second session on the
machine never touches this one's, and the leftovers of a session that died without tearing down
(SIGKILL) are removed by the next one (`remove_stale`).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

PREFIX = "sfs"  # namespaces sfs<pid>-<i>, bridge sfs<pid>b, veths sfs<pid>v<i> (link names: 15 characters at most)
IP = "ip"
ETC_NETNS = "/etc/netns"  # `ip netns exec NAME` mounts the files of ETC_NETNS/NAME over /etc's


class HostsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or no `ip` with netns support)."""


@dataclass(frozen=True)
class Host:
    """One host: its network namespace, its address on the hosts' bridge, the pid (as this
    machine sees it) of the process that is pid 1 of its PID namespace, and its own folder
    (`home`, and `ray`, which the host sees as /tmp/ray)."""

    name: str
    address: str
    init: int
    folder: str

    @property
    def home(self) -> str:
        return os.path.join(self.folder, "home")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, check=check)


def unavailable_reason() -> str | None:
    """Why hosts cannot be made on this machine, in one line; None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns)"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.CalledProcessError) as error:
        return f"`ip netns` does not work here: {error}"
    missing = [tool for tool in ("unshare", "nsenter") if not shutil.which(tool)]
    return f"{' and '.join(missing)} not found (util-linux)" if missing else None


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _links() -> list[str]:
    return [line.split(":")[1].strip().split("@")[0]
            for line in _ip("-o", "link", "show").stdout.splitlines() if ":" in line]


def _owner(name: str) -> int | None:
    """The pid in a name of ours (sfs<pid>-..., sfs<pid>b, sfs<pid>v<i>), None for other names."""
    if not name.startswith(PREFIX):
        return None
    digits = ""
    for char in name[len(PREFIX):]:
        if not char.isdigit():
            break
        digits += char
    return int(digits) if digits else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(namespace: str) -> list[int]:
    """Every process in `namespace` (`ip netns pids`)."""
    done = _ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []


def _child_of(pid: int, timeout: float = 10.0) -> int:
    """The first child of process `pid`, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as stream:
                children = stream.read().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise HostsUnavailable(f"process {pid} started no child in {timeout:.0f} s (unshare --pid --fork)")


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as stream:
            return stream.read().replace("\0", " ").strip()
    except OSError:
        return ""


def _exited(pid: int) -> bool:
    """Gone or a zombie (a PID namespace's pid 1 stays a while after SIGKILL, reaping the rest)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def _kill_all(namespace: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of `namespace` until none is left (a process may fork meanwhile) and
    each has exited; returns their pids."""
    deadline, killed = time.monotonic() + timeout, set()
    while pids := namespace_pids(namespace):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed.update(pids)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{namespace}: processes {pids} survive SIGKILL")
        time.sleep(0.05)
    while not all(_exited(pid) for pid in killed):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{namespace}: processes {sorted(killed)} did not exit after SIGKILL")
        time.sleep(0.05)
    return sorted(killed)


def _remove(namespaces: list[str], links: list[str]) -> None:
    for namespace in namespaces:
        _kill_all(namespace)
        _ip("netns", "delete", namespace, check=False)  # its veth legs go with it
        shutil.rmtree(os.path.join(ETC_NETNS, namespace), ignore_errors=True)
    for link in links:
        _ip("link", "delete", link, check=False)


def remove_stale() -> list[str]:
    """Removes the namespaces and links of sessions whose process is gone; returns their names."""
    etc = os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else []
    namespaces = [n for n in sorted(set(_namespaces() + etc)) if (pid := _owner(n)) is not None and not _alive(pid)]
    links = [n for n in _links() if (pid := _owner(n)) is not None and not _alive(pid)]
    _remove(namespaces, links)
    folders = [os.path.join(tempfile.gettempdir(), n) for n in os.listdir(tempfile.gettempdir())
               if (pid := _owner(n)) is not None and not _alive(pid)]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return namespaces + links + folders


def _free_subnet(rng: random.Random) -> str:
    """A 10.X.Y.0/24 that no address on this machine's own interfaces is in (`10.X.Y.` is returned)."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for _ in range(100):
        base = f"10.{rng.randrange(64, 250)}.{rng.randrange(1, 250)}."
        if f" {base}" not in used:
            return base
    raise HostsUnavailable("no free 10.x.y.0/24 found for the hosts")


class LocalHosts:
    """`count` hosts on one bridge, torn down on exit (also on an error or Ctrl-C in the block).

    `hosts[i].address` is `10.X.Y.(i+1)` of a /24 drawn at random (`seed` for a fixed draw) among
    those this machine does not use."""

    def __init__(self, count: int, seed: int | None = None):
        if not 1 <= count <= 200:
            raise ValueError(f"count={count}: must be 1 to 200 hosts")
        self.count, self.rng = count, random.Random(seed)
        tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{tag}b"
        self.hosts: list[Host] = []  # every host added, also the killed ones
        self._tag, self._base, self._added = tag, "", 0
        self._namespaces: list[str] = []
        self._holders: list[subprocess.Popen] = []
        self.folders = ""  # the hosts' own folders, one each (made on entry, removed on exit)

    def __enter__(self) -> LocalHosts:
        reason = unavailable_reason()
        if reason:
            raise HostsUnavailable(reason)
        remove_stale()
        self._base = _free_subnet(self.rng)
        self.folders = tempfile.mkdtemp(prefix=f"{self._tag}-")
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for _ in range(self.count):
                self.add()
        except BaseException:
            self.close()
            raise
        return self

    def add(self) -> Host:
        """A new host on the bridge, at the next free address (also after `kill`: the new
        machine an autoscaler or an operator brings)."""
        index = self._added
        if index >= 250:
            raise ValueError("250 hosts on one bridge at most")
        self._added += 1
        name, outside = f"{self._tag}-{index}", f"{self._tag}v{index}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", outside, "master", self.bridge, "up")
        address = f"{self._base}{index + 1}"
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        # A default route onto the bridge, as a machine on a network has: Ray finds a node's own
        # address from the route to a public one (no packet is sent; a packet sent anyway stops
        # at the bridge, which has no address and no uplink).
        _ip("-n", name, "route", "add", "default", "dev", "eth0")
        folder = os.path.join(self.folders, name)
        os.makedirs(os.path.join(folder, "home"))
        os.makedirs(os.path.join(folder, "ray"))
        # pid 1 of the host's own PID namespace (with its own /proc, and its folder's `ray` as
        # /tmp/ray, in a mount namespace of its own); when it dies, the kernel kills every
        # process of the namespace. --kill-child: it dies with its `unshare` parent.
        # Its own host name, which resolves to its address (gloo and NCCL listen on the host name's
        # address): `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts.
        os.makedirs(os.path.join(ETC_NETNS, name), exist_ok=True)
        with open(os.path.join(ETC_NETNS, name, "hosts"), "w") as stream:
            stream.write(f"127.0.0.1 localhost\n::1 localhost\n{address} {name}\n")
        start = 'hostname "$1" && mkdir -p /tmp/ray && mount --bind "$0" /tmp/ray && exec sleep infinity'
        holder = subprocess.Popen([IP, "netns", "exec", name, "unshare", "--pid", "--fork", "--mount-proc", "--uts",
                                   "--kill-child", "sh", "-c", start, os.path.join(folder, "ray"), name],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._holders.append(holder)
        init = _child_of(holder.pid)
        deadline = time.monotonic() + 10
        while _command_line(init) != "sleep infinity":  # the host is set up once it has exec'd
            if holder.poll() is not None or time.monotonic() > deadline:
                raise HostsUnavailable(f"{name}: its pid 1 did not start ({start})")
            time.sleep(0.01)
        host = Host(name, address, init, folder)
        self.hosts.append(host)
        return host

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kills every process of every host, deletes the namespaces, their veths and the bridge."""
        # The veths explicitly: a deleted namespace's veth pair goes only when the kernel gets to it.
        _remove(self._namespaces, [f"{self._tag}v{index}" for index in range(self._added)] + [self.bridge])
        for holder in self._holders:
            holder.wait()
        self._namespaces, self._holders = [], []
        if self.folders:
            shutil.rmtree(self.folders, ignore_errors=True)

    def command(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` as it runs inside `host`: its network, PID, mount (/proc, /etc/hosts, /tmp/ray) and
        UTS (host name) namespaces."""
        return ["nsenter", f"--target={host.init}", "--net", "--pid", "--mount", "--uts", "--", *argv]

    def run(self, host: Host, argv: list[str], **popen) -> subprocess.Popen:
        """Starts `argv` inside `host` (`subprocess.Popen` keyword arguments pass through)."""
        return subprocess.Popen(self.command(host, argv), **popen)

    def pids(self, host: Host) -> list[int]:
        """Every process running in `host`."""
        return namespace_pids(host.name)

    def kill(self, host: Host) -> list[int]:
        """SIGKILLs every process of `host`, its pid 1 too (a host that loses power: it runs
        nothing afterwards; `add` brings a new one); returns their pids."""
        return _kill_all(host.name)

    def leftovers(self) -> list[str]:
        """This session's namespaces, links and folders still on the machine (none after `close`)."""
        tag = self._tag
        etc = os.listdir(ETC_NETNS) if os.path.isdir(ETC_NETNS) else []
        return [n for n in _namespaces() + _links() + os.listdir(tempfile.gettempdir()) + etc
                if n.startswith(tag) and n[len(tag):len(tag) + 1] in ("-", "b", "v")]
