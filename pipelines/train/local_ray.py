"""Where a Ray that selfsup starts on this machine listens: loopback only, unless asked otherwise.

Ray's servers run code for whoever reaches them (the GCS, the raylet, every worker's gRPC port,
the dashboard and its agent). A laptop on a café network or a shared workstation should not offer
them, and a local run never needs another machine to reach them. Ray 2.60 binds them to the node's
IP or to all interfaces, and `ray.init(_node_ip_address="127.0.0.1")` is turned back into the
machine's address on Linux. What Ray gives for it is the switch it uses on macOS and Windows, where
local clusters are the only kind: with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` the node's address is
127.0.0.1 and every server binds to loopback (measured: tests/test_security.py lists the listening
sockets of a local `selfsup pretrain`). Ray reads it when it is imported, and its processes
inherit it, so it is set before the first `import ray`.

A run that joins a cluster (`RAY_ADDRESS`, as under `ray job submit`) is left as it is. To offer a
local Ray to other machines on purpose: `SELFSUP_RAY_LISTEN=all`. How many idle worker processes
such a Ray keeps: `warm_workers_config`; how Ray Train runs on it: `use_local_train_settings`.
"""

from __future__ import annotations

import os
import sys

RAY_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LISTEN_ENV = "SELFSUP_RAY_LISTEN"  # "loopback" (default) or "all"
LOOPBACK_HOSTS = ("127.0.0.1:", "localhost:")
# Idle worker processes a local Ray keeps (Ray's default: one per CPU). A run holds more
# processes than CPUs (fractional decode tasks, the Train and Data actors), and on a small machine
# Ray kills the idle ones between passes and trials, so the next starts and imports them again
# (what keeping them saves: docs/BENCHMARKS.md, "The suite under CI's 40 minutes again").
WARM_WORKERS = 8
# Ray Train's settings for runs on a local Ray (environment variables the driver hands to each run's
# controller): the controller polls its workers every 0.5 s, not 2 s, so a finished run or trial is
# seen sooner; and no preemption watcher, one more actor process a run, where no node is ever
# drained. What they save: docs/BENCHMARKS.md, "Each run's Ray processes".
LOCAL_TRAIN_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def keep_local_ray_on_loopback(environ=os.environ) -> bool:
    """Before Ray is imported: make a local Ray listen on loopback only. True when it will."""
    if environ.get("RAY_ADDRESS") or environ.get(LISTEN_ENV, "loopback").lower() == "all":
        return False
    if "ray" in sys.modules and environ.get(RAY_SWITCH) != "0":
        return False  # too late for this process; its caller imported Ray first
    environ.setdefault(RAY_SWITCH, "0")
    return environ[RAY_SWITCH] == "0"


def loopback_only() -> bool:
    """True when this process's Ray listens on loopback only: one that selfsup started (a worker
    of it has RAY_ADDRESS pinned to its loopback address, see `pin_ray_address`)."""
    address = os.environ.get("RAY_ADDRESS", "")
    return os.environ.get(RAY_SWITCH) == "0" and (not address or address.startswith(LOOPBACK_HOSTS))


def pin_ray_address() -> None:
    """Ray's `worker_process_setup_hook` for a Ray that selfsup starts: every worker process (the
    Train controller and its placement-group cleaner, Tune's trials, Ray Data's actors) learns the
    address of the Ray it belongs to.

    Ray Train and Ray Data call Ray's state API from inside their actors without an address, and
    Ray then looks for a Ray on the machine: with a second one running (another selfsup command,
    a notebook's Ray), the call fails with "Found multiple active Ray instances". The placement-
    group cleaner's thread dies of it, so a Tune trial that is stopped leaks its placement group
    and the next trial waits for CPUs forever (issue 18). RAY_ADDRESS is what those calls read.
    """
    import ray

    if not os.environ.get("RAY_ADDRESS"):  # unset, or empty as a caller may leave it to mean "start one"
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def warm_workers_config(num_cpus: int | None) -> dict:
    """Ray's `_system_config` for a Ray that selfsup starts on this machine (`num_cpus`: its CPUs,
    or the machine's): idle workers kept up to WARM_WORKERS, or one per CPU where that is more."""
    return {"num_workers_soft_limit": max(WARM_WORKERS, num_cpus or os.cpu_count() or 1)}


def use_local_train_settings(environ=os.environ) -> None:
    """Before a local Ray starts (its processes inherit them, Tune's trials too):
    LOCAL_TRAIN_SETTINGS, where the user has not set them."""
    for key, value in LOCAL_TRAIN_SETTINGS.items():
        environ.setdefault(key, value)
