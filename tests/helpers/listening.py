"""The TCP sockets a process tree listens on, read from /proc (Linux; Ray no longer brings psutil),
a command run to its end while they are watched, and whether a process still runs."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import time


def descendants(pid: int) -> list[int]:
    """`pid` and every process started under it (Ray's GCS, raylet, dashboard, workers, actors)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    parent = int(stream.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *struct.unpack("<4I", raw))), int(port, 16)


def listening_sockets(pids: list[int]) -> set[tuple[str, str, int]]:
    """`{(process name, address, port)}` of the TCP sockets in LISTEN state held by `pids`."""
    owners: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except OSError:  # the process ended, or an fd closed while we read
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as stream:
            next(stream)
            for line in stream:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in owners:  # 0A = LISTEN
                    pid = owners[fields[9]]
                    try:
                        with open(f"/proc/{pid}/comm") as comm:
                            name = comm.read().strip()
                    except OSError:
                        name = str(pid)
                    found.add((name, *_address(fields[1])))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def run_watching_sockets(command: list[str], cwd: str, env: dict, out_dir, timeout: float
                         ) -> tuple[subprocess.CompletedProcess, set[tuple[str, str, int]]]:
    """Runs `command` to its end (its output kept in files under `out_dir`, so no pipe can fill
    and stall it) and returns it with the listening sockets its process tree held meanwhile."""
    stdout_path, stderr_path = os.path.join(out_dir, "stdout"), os.path.join(out_dir, "stderr")
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
        seen: set = set()
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            seen |= listening_sockets(descendants(process.pid))
            time.sleep(0.5)
        if process.poll() is None:
            process.kill()
        process.wait()
    with open(stdout_path) as stdout, open(stderr_path) as stderr:
        return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read()), seen


def running(pid: int) -> str:
    """`pid`'s state and command line while it runs (not gone, nor a zombie); "" otherwise."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            state = stream.read().rsplit(")", 1)[1].split()[0]  # after the name, which may hold spaces
        with open(f"/proc/{pid}/cmdline") as stream:
            command = stream.read().replace("\0", " ")
    except OSError:
        return ""
    return "" if state in "ZX" else f"{state} {command}"
