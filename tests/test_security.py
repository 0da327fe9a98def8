"""What a local run offers the network: nothing outside loopback."""

import sys

import pytest

from pipelines.train.local_ray import RAY_SWITCH, keep_local_ray_on_loopback, loopback_only
from tests.helpers.listening import is_loopback


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
def test_local_pretrain_listens_on_loopback_only(own_ray_pretrain):
    """Every socket the run's process tree listened on while it ran (conftest's `own_ray_pretrain`)."""
    done, seen = own_ray_pretrain
    assert done.returncode == 0, done.stderr[-2000:]
    names = {name for name, _, _ in seen}
    # the run's servers were seen (so the test can fail): GCS, raylet, dashboard, a worker's gRPC port
    assert {"gcs_server", "raylet"} <= names and len(seen) >= 6, seen
    exposed = sorted((name, address, port) for name, address, port in seen if not is_loopback(address))
    assert not exposed, f"listening outside loopback: {exposed}"
