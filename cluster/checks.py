"""Offline checks of the cluster configs in this folder: Ray's own autoscaler schema for the
cluster-launcher YAMLs, the required fields of the KubeRay manifests, and that nothing exposes
Ray's ports (dashboard, client, GCS, jobs) or SSH to the internet.

    python -m cluster.checks            # every config here; exit 1 on the first problem

Ray's APIs run code for whoever reaches them: the dashboard and job ports submit jobs, the client
and GCS ports execute tasks. So a config must keep them on the private network (SSH tunnel or
`kubectl port-forward` to reach them) and turn token auth on.
"""

from __future__ import annotations

import copy
import os
import sys

import yaml

FOLDER = os.path.dirname(os.path.abspath(__file__))
LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml")
KUBERAY_MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
PUBLIC_RANGES = ("0.0.0.0/0", "::/0")


class ConfigError(ValueError):
    """A config that would not launch, or would launch exposed."""


def load(path: str) -> dict:
    with open(path) as stream:
        return yaml.safe_load(stream)


def validate_launcher(config: dict, where: str) -> dict:
    """Ray's own validation of a cluster-launcher config (defaults filled as `ray up` fills them,
    then the JSON schema in `ray/autoscaler/ray-schema.json` and Ray's consistency checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as error:  # jsonschema.ValidationError, ValueError, KeyError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{where}: not a valid Ray cluster config: {message}") from None
    return prepared


def _cluster_spec(manifest: dict, where: str) -> dict:
    if manifest.get("apiVersion") != "ray.io/v1":
        raise ConfigError(f"{where}: apiVersion must be ray.io/v1")
    if manifest.get("kind") == "RayCluster":
        return manifest.get("spec") or {}
    if manifest.get("kind") == "RayJob":
        spec = manifest.get("spec") or {}
        if not spec.get("entrypoint"):
            raise ConfigError(f"{where}: a RayJob needs spec.entrypoint")
        return spec.get("rayClusterSpec") or {}
    raise ConfigError(f"{where}: kind must be RayCluster or RayJob")


def _containers(group: dict) -> list[dict]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def validate_kuberay(manifest: dict, where: str) -> None:
    """The fields KubeRay needs and the ones selfsup relies on: a head with no CPUs for work, the
    in-tree autoscaler, a GPU worker group with bounds, a memory-backed /dev/shm for the object
    store, token auth."""
    spec = _cluster_spec(manifest, where)
    head = spec.get("headGroupSpec") or {}
    if not _containers(head) or not all(c.get("image") for c in _containers(head)):
        raise ConfigError(f"{where}: headGroupSpec.template.spec.containers needs a container with an image")
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        raise ConfigError(f"{where}: the head must run no training (rayStartParams num-cpus: \"0\")")
    if spec.get("enableInTreeAutoscaling") is not True:
        raise ConfigError(f"{where}: enableInTreeAutoscaling must be true")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        raise ConfigError(f"{where}: authOptions.mode must be token")
    groups = spec.get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
                                           for c in _containers(g))]
    if not gpu_groups:
        raise ConfigError(f"{where}: needs a worker group whose containers have nvidia.com/gpu limits")
    for group in groups:
        name = group.get("groupName") or "?"
        if not (isinstance(group.get("minReplicas"), int) and isinstance(group.get("maxReplicas"), int)
                and group["minReplicas"] <= group["maxReplicas"]):
            raise ConfigError(f"{where}: worker group {name}: needs minReplicas <= maxReplicas")
        volumes = ((group.get("template") or {}).get("spec") or {}).get("volumes") or []
        memory_volumes = {v["name"] for v in volumes if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        mounted = {m.get("name") for c in _containers(group) for m in c.get("volumeMounts") or []
                   if m.get("mountPath") == "/dev/shm"}
        if not memory_volumes & mounted:
            raise ConfigError(f"{where}: worker group {name}: /dev/shm must be a mounted emptyDir with medium Memory")


def _strings(node, path=""):
    """Every string in a YAML tree with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def public_exposures(config: dict, where: str) -> list[str]:
    """What in a config would open Ray (or SSH) to the internet, or run without token auth."""
    found = [f"{where}: {path} opens {r}" for path, text in _strings(config) for r in PUBLIC_RANGES if r in text]
    commands = " ".join(config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []))
    if "dashboard-host=0.0.0.0" in commands.replace(" ", "="):
        found.append(f"{where}: head_start_ray_commands bind the dashboard to 0.0.0.0")
    if config.get("provider"):  # a cluster-launcher config
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            if "RAY_AUTH_MODE=token" not in " ".join(config.get(key, [])):
                found.append(f"{where}: {key}: ray start runs without RAY_AUTH_MODE=token")
        for name, node_type in (config.get("available_node_types") or {}).items():
            node = node_type.get("node_config") or {}
            if config["provider"].get("type") == "aws" and not node.get("SecurityGroupIds"):
                found.append(f"{where}: {name} has no SecurityGroupIds, so Ray creates a group with SSH open "
                             "to 0.0.0.0/0")
            if config["provider"].get("type") == "gcp":
                interfaces = node.get("networkInterfaces") or []
                if not interfaces or any(i.get("network", "").endswith("/default") or "subnetwork" not in i
                                         for i in interfaces):
                    found.append(f"{where}: {name} is on the default network, whose firewall allows SSH from "
                                 "anywhere; use your own subnetwork")
    else:  # a KubeRay manifest
        spec = _cluster_spec(config, where)
        service = (spec.get("headGroupSpec") or {}).get("serviceType", "ClusterIP")
        if service != "ClusterIP":
            found.append(f"{where}: headGroupSpec.serviceType {service} exposes the head outside the cluster")
        if (spec.get("headGroupSpec") or {}).get("enableIngress"):
            found.append(f"{where}: headGroupSpec.enableIngress exposes the dashboard")
    return found


def check_all(folder: str = FOLDER) -> list[str]:
    """Validate every config in `folder`; the list of exposure findings (empty = safe)."""
    findings = []
    for name in LAUNCHER_CONFIGS:
        path = os.path.join(folder, name)
        config = load(path)
        validate_launcher(config, path)
        findings += public_exposures(config, path)
    for name in KUBERAY_MANIFESTS:
        path = os.path.join(folder, name)
        manifest = load(path)
        validate_kuberay(manifest, path)
        findings += public_exposures(manifest, path)
    return findings


def main() -> int:
    try:
        findings = check_all()
    except ConfigError as error:
        print(f"cluster.checks: error: {error}", file=sys.stderr)
        return 1
    for finding in findings:
        print(f"cluster.checks: exposed: {finding}", file=sys.stderr)
    if not findings:
        print(f"cluster.checks: {len(LAUNCHER_CONFIGS) + len(KUBERAY_MANIFESTS)} configs valid, none exposed")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
