"""Hosts on one machine (cluster/local_hosts.py, issue 30): each sees the others at their own
addresses and nothing of their loopbacks or processes, a host's processes can all be killed and
a new host added, and nothing of a session is left after it, nor of a session that died without
tearing down."""

import os
import subprocess
import sys
import time

import pytest

from cluster.local_hosts import PREFIX, LocalHosts, remove_stale, unavailable_reason
from tests.helpers.listening import running

REASON = unavailable_reason()
if REASON and os.environ.get("CI") == "true":  # CI runs as root: there these tests must run
    raise RuntimeError(f"CI=true but {REASON}")
pytestmark = pytest.mark.skipif(bool(REASON), reason=f"no local hosts here: {REASON}")

SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], 5555)) as server:
    print("listening", flush=True)
    while True:
        connection, peer = server.accept()
        connection.sendall(peer[0].encode())
        connection.close()
"""
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 5555), timeout=3) as connection:
        print(connection.recv(100).decode())
except OSError as error:
    print(type(error).__name__)
"""


def started(hosts, host, address):
    server = hosts.run(host, [sys.executable, "-c", SERVER, address], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"
    return server


def reply(hosts, host, address) -> str:
    argv = hosts.command(host, [sys.executable, "-c", CLIENT, address])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()


def test_hosts_reach_each_other_at_their_addresses_and_not_each_others_loopback():
    with LocalHosts(2) as hosts:
        first, second = hosts.hosts
        assert first.address.startswith("10.") and first.address.rsplit(".", 1)[0] == second.address.rsplit(".", 1)[0]
        started(hosts, first, first.address)
        assert reply(hosts, second, first.address) == second.address  # the server saw the second host's address
        started(hosts, first, "127.0.0.1")
        assert reply(hosts, first, "127.0.0.1") == "127.0.0.1"
        assert reply(hosts, second, "127.0.0.1") == "ConnectionRefusedError"  # its own loopback: nothing there


LIST_PROCESSES = """
import os
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    try:
        print(pid, open(f"/proc/{pid}/cmdline").read().replace(chr(0), " ").strip())
    except OSError:
        pass
"""


def processes_seen_from(hosts, host) -> list[str]:
    argv = hosts.command(host, [sys.executable, "-c", LIST_PROCESSES])
    return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines()


def test_a_host_sees_its_own_processes_only_as_ray_stop_would():
    with LocalHosts(2) as hosts:
        first, second = hosts.hosts
        hosts.run(first, ["sleep", "601"])
        hosts.run(second, ["sleep", "602"])
        while not any("sleep 601" in line for line in processes_seen_from(hosts, first)):
            time.sleep(0.05)
        seen = processes_seen_from(hosts, first)
        assert seen[0] == "1 sleep infinity"  # its own pid 1
        assert not any("sleep 602" in line or "pytest" in line for line in seen), seen


def test_each_host_has_a_tmp_ray_of_its_own_and_shares_the_rest():
    with LocalHosts(2) as hosts:
        first, second = hosts.hosts
        shared = os.path.join(hosts.folders, "shared")
        write = f"echo one > /tmp/ray/mine && echo both > {shared}"
        subprocess.run(hosts.command(first, ["sh", "-c", write]), check=True)
        assert open(os.path.join(first.folder, "ray", "mine")).read() == "one\n"
        assert open(shared).read() == "both\n"  # the machine's file system, as shared storage
        second_view = subprocess.run(hosts.command(second, ["ls", "/tmp/ray"]), capture_output=True, text=True)
        assert "mine" not in second_view.stdout and not os.path.exists("/tmp/ray/mine")


def test_a_killed_host_has_no_process_left_and_the_others_keep_theirs():
    with LocalHosts(2) as hosts:
        first, second = hosts.hosts
        # a process that starts a child of its own, as `ray start` leaves daemons behind
        hosts.run(first, ["sh", "-c", "sleep 600 & sleep 600"])
        kept = hosts.run(second, ["sleep", "600"])
        while sum("sleep 600" in line for line in processes_seen_from(hosts, first)) < 2:
            time.sleep(0.05)
        killed = hosts.kill(first)
        assert first.init in killed and hosts.pids(first) == []
        assert [running(pid) for pid in killed if running(pid)] == []
        assert kept.poll() is None and second.init in hosts.pids(second)
        fresh = hosts.add()  # a new machine joins the bridge and reaches the host that stayed
        assert fresh.address not in (first.address, second.address)
        started(hosts, second, second.address)
        assert reply(hosts, fresh, second.address) == fresh.address


def test_nothing_is_left_after_a_session_even_one_that_failed():
    with pytest.raises(ZeroDivisionError):
        with LocalHosts(3) as hosts:
            hosts.run(hosts.hosts[0], ["sleep", "600"])
            1 / 0
    assert hosts.leftovers() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}{os.getpid()}-" not in listed


def test_the_leftovers_of_a_session_that_died_are_removed_by_the_next():
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names the stale session; the process is gone
    stale = f"{PREFIX}{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in remove_stale()
        assert stale not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
