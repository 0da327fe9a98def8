"""What a local run offers the network: nothing outside loopback."""

import os
import subprocess
import sys
import time

import pytest

from pipelines.train.local_ray import RAY_SWITCH, keep_local_ray_on_loopback, loopback_only
from tests.helpers.cli import selfsup_command
from tests.helpers.listening import descendants, is_loopback, listening_sockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loopback_policy_is_set_before_ray_and_skips_clusters(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a fresh `selfsup` process
    assert keep_local_ray_on_loopback({}) is True
    environ = {}
    keep_local_ray_on_loopback(environ)
    assert environ == {RAY_SWITCH: "0"}
    assert keep_local_ray_on_loopback({"RAY_ADDRESS": "10.0.0.5:6379"}) is False  # joins a cluster
    environ = {"SELFSUP_RAY_LISTEN": "all"}
    assert keep_local_ray_on_loopback(environ) is False and RAY_SWITCH not in environ  # asked for
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")


def test_workers_pinned_to_a_loopback_ray_keep_the_process_group_on_loopback(monkeypatch):
    """A worker of a Ray that selfsup started has RAY_ADDRESS pinned to it (local_ray.pin_ray_address);
    that address is on loopback, so its process group stays there too. A cluster's address is not."""
    monkeypatch.setenv(RAY_SWITCH, "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert loopback_only()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:41234")
    assert loopback_only()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert not loopback_only()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_pretrain_listens_on_loopback_only(digits, tmp_path):
    out, _ = digits
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    command = selfsup_command("pretrain", "--method", "simclr", "--preset", "tiny", "--data", f"{out}/train", "--storage", str(tmp_path),
                              "--name", "listen", "--num-cpus", "2",
                              sets={"optim.epochs": 1, "optim.batch_size": 256, "data.canvas_size": 16,
                                    "views.view.size": 16, "backbone.kwargs.channels": [8, 16, 32, 64],
                                    "backbone.kwargs.stem_width": 8, "train.knn_every_epochs": 0})
    process = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    seen: set = set()
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        seen |= listening_sockets(descendants(process.pid))
        time.sleep(0.5)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]
    names = {name for name, _, _ in seen}
    # the run's servers were seen (so the test can fail): GCS, raylet, dashboard, a worker's gRPC port
    assert {"gcs_server", "raylet"} <= names and len(seen) >= 6, seen
    exposed = sorted((name, address, port) for name, address, port in seen if not is_loopback(address))
    assert not exposed, f"listening outside loopback: {exposed}"
