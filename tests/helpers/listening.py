"""The TCP sockets a process tree listens on, read from /proc (Linux; Ray no longer brings psutil)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct


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
