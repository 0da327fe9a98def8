"""Cluster configs validate offline (what they expose, ship and pin: test_cluster_checks.py);
checkpoints never run code on load. (A run that loses a host of a real cluster: test_real_cluster.py.)"""

import copy
import os

import pytest
import torch

from cluster.checks import (
    FOLDER,
    KUBERAY_MANIFESTS,
    LAUNCHER_CONFIGS,
    ConfigError,
    load,
    validate_kuberay,
    validate_launcher,
)



@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_configs_pass_rays_own_schema(name):
    config = load(os.path.join(FOLDER, name))
    prepared = validate_launcher(config, name)
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}  # the head trains nothing
    gpu = prepared["available_node_types"]["gpu_spot"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscales from zero
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["min_workers"] = "zero"
    with pytest.raises(ConfigError, match=f"{name}: not a valid Ray cluster config"):
        validate_launcher(broken, name)


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifests_carry_the_required_fields(name):
    manifest = load(os.path.join(FOLDER, name))
    validate_kuberay(manifest, name)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    for field, value, message in [
        ("enableInTreeAutoscaling", False, "enableInTreeAutoscaling"),
        ("authOptions", {}, "authOptions.mode must be token"),
    ]:
        broken = copy.deepcopy(manifest)
        broken["spec"].get("rayClusterSpec", broken["spec"])[field] = value
        with pytest.raises(ConfigError, match=message):
            validate_kuberay(broken, name)
    no_shm = copy.deepcopy(manifest)
    no_shm_spec = no_shm["spec"].get("rayClusterSpec", no_shm["spec"])
    no_shm_spec["workerGroupSpecs"][0]["template"]["spec"]["volumes"] = []
    with pytest.raises(ConfigError, match="/dev/shm"):
        validate_kuberay(no_shm, name)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SELFSUP_PWNED']}",))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main
    from pipelines.weights.checkpoint import CheckpointRefused, load_state

    marker = tmp_path / "pwned"
    monkeypatch.setenv("SELFSUP_PWNED", str(marker))
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"method": {"weight": torch.zeros(1)}, "payload": _RunsCode()}, folder / "state.pt")
    with pytest.raises(CheckpointRefused, match="refused: it holds pickled objects"):
        load_state(str(folder))
    assert main(["eval", "knn", "--checkpoint", str(folder), "--train", str(tmp_path), "--test", str(tmp_path)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()  # nothing ran
