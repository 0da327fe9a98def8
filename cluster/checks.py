"""Offline checks of cluster configs: Ray's own autoscaler schema for the cluster-launcher YAMLs,
the required fields of the KubeRay manifests, and what each would expose, ship or leave unpinned.

    python -m cluster.checks                      # every config in cluster/
    python -m cluster.checks my-cluster.yaml      # your own edits (launcher YAML or KubeRay manifest)

Ray's APIs run code for whoever reaches them: the dashboard and job ports submit jobs, the client
and GCS ports execute tasks. So a config must keep them on the private network (no public node
IPs; an SSH/IAP tunnel or `kubectl port-forward` to reach them), turn token auth on, ship none of
the checkout's secrets or data, and run the same pinned code on every node.

Commands are read as a shell reads them (`cluster/commands.py`); what ships and what is pinned is
`cluster/shipping.py`'s. Exit 1 with one line per finding.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import sys

import yaml

from cluster.commands import is_loopback_host, ray_start_findings, shell_commands
from cluster.shipping import (
    CONSTRAINTS_FILE,
    DIGEST,
    FOLDER,
    ROOT,
    dockerfile_findings,
    dockerignore_lines,
    exclude_findings,
    exclude_patterns,
    product_findings,
    read_constraints,
    runtime_env_findings,
)
from methods.versions import UntestedVersion, require

LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml")
KUBERAY_MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")
RUNTIME_ENV = "runtime_env.yaml"
DOCKERFILE = "Dockerfile"
WORLD = ("0.0.0.0/0", "::/0")


class ConfigError(ValueError):
    """A config that would not launch."""


def load(path: str) -> dict:
    """The first YAML document of a file (a manifest may carry more: see `load_all`)."""
    return load_all(path)[0]


def load_all(path: str) -> list[dict]:
    with open(path) as stream:
        return [d for d in yaml.safe_load_all(stream) if d is not None]


# --- cluster-launcher configs -----------------------------------------------------------------
def validate_launcher(config: dict, where: str) -> dict:
    """Ray's own validation of a cluster-launcher config (defaults filled as `ray up` fills them,
    then the JSON schema in `ray/autoscaler/ray-schema.json` and Ray's consistency checks)."""
    require("ray", "validates cluster-launcher configs (ray.autoscaler._private.util)")
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as error:  # jsonschema.ValidationError, ValueError, KeyError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{where}: not a valid Ray cluster config: {message}") from None
    return prepared


def _is_public_cidr(cidr: str) -> bool:
    try:
        network = ipaddress.ip_network(str(cidr).strip(), strict=False)
    except ValueError:
        return False
    return not (network.is_private or network.is_loopback or network.is_link_local)


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


def launcher_network_findings(config: dict, where: str) -> list[str]:
    """Public node IPs, inline firewall rules open to public addresses, the default network."""
    found = []
    provider = config.get("provider") or {}
    if provider.get("use_internal_ips") is not True:
        found.append(f"{where}: provider.use_internal_ips must be true: nodes get no public IP (reach the head "
                     "through IAP or a bastion, cluster/README.md)")
    for index, rule in enumerate((provider.get("security_group") or {}).get("IpPermissions") or []):
        ranges = [r.get("CidrIp", "") for r in rule.get("IpRanges") or []]
        ranges += [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges") or []]
        for cidr in ranges:
            if _is_public_cidr(cidr) and (cidr in WORLD or rule.get("FromPort") != 22):
                found.append(f"{where}: provider.security_group.IpPermissions[{index}] opens ports "
                             f"{rule.get('FromPort')}-{rule.get('ToPort')} to {cidr}")
    for name, node_type in (config.get("available_node_types") or {}).items():
        node = node_type.get("node_config") or {}
        if provider.get("type") == "aws":
            if not node.get("SecurityGroupIds"):
                found.append(f"{where}: {name} has no SecurityGroupIds, so Ray creates a group with SSH open "
                             "to 0.0.0.0/0")
            for interface in node.get("NetworkInterfaces") or []:
                if interface.get("AssociatePublicIpAddress"):
                    found.append(f"{where}: {name}: NetworkInterfaces AssociatePublicIpAddress gives it a public IP")
        if provider.get("type") == "gcp":
            interfaces = node.get("networkInterfaces") or []
            if not interfaces or any(i.get("network", "").endswith("/default") or "subnetwork" not in i
                                     for i in interfaces):
                found.append(f"{where}: {name} is on the default network, whose firewall allows SSH from "
                             "anywhere; use your own subnetwork")
            if any(i.get("accessConfigs") for i in interfaces):
                found.append(f"{where}: {name}: networkInterfaces accessConfigs give it a public IP")
    found += [f"{where}: {path} opens {world}" for path, text in _strings(config) for world in WORLD
              if world in text and "IpPermissions" not in path]
    return found


def launcher_findings(config: dict, where: str) -> list[str]:
    found = launcher_network_findings(config, where)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        found += ray_start_findings(config.get(key) or [], where, key)
    found += pinning_findings_for_setup(config, where)
    found += exclude_findings(config.get("rsync_exclude"), f"{where}: rsync_exclude")
    return found


def pinning_findings_for_setup(config: dict, where: str) -> list[str]:
    """Node setup installs the checkout's pinned requirements, never the newest of anything."""
    found = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for index, line in enumerate(config.get(key) or []):
            for command in shell_commands(line):
                argv = command.argv
                if "pip" not in " ".join(argv[:3]) or "install" not in argv:
                    continue
                if {"-U", "--upgrade"} & set(argv):
                    found.append(f"{where}: {key}[{index}]: pip install --upgrade takes whatever is newest")
                if not ({"-c", "--constraint", "-r", "--requirement"} & set(argv)
                        or any(a.startswith(("--constraint=", "--requirement=")) for a in argv)):
                    found.append(f"{where}: {key}[{index}]: pip install without -c {CONSTRAINTS_FILE}: two nodes "
                                 "can install different versions")
    for path, text in _strings(config):
        if path.endswith("sourceImage") and "/family/" in text:
            found.append(f"{where}: {path}: an image family moves; name one image (cluster/README.md, pinning)")
    return found


# --- KubeRay manifests --------------------------------------------------------------------------
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


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("headGroupSpec", spec.get("headGroupSpec") or {})] + [
        (f"workerGroupSpecs[{g.get('groupName') or i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]


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


def kuberay_findings(manifest: dict, where: str, others: list[dict] = ()) -> list[str]:
    """Exposure, privileges and pinning of a RayCluster / RayJob (and the documents beside it)."""
    found = []
    spec = _cluster_spec(manifest, where)
    head = spec.get("headGroupSpec") or {}
    service = head.get("serviceType", "ClusterIP")
    if service != "ClusterIP":
        found.append(f"{where}: headGroupSpec.serviceType {service} exposes the head outside the cluster")
    head_service_type = (((head.get("headService") or {}).get("spec") or {}).get("type")) or "ClusterIP"
    if head_service_type != "ClusterIP":
        found.append(f"{where}: headGroupSpec.headService.spec.type {head_service_type} exposes the head")
    if head.get("enableIngress"):
        found.append(f"{where}: headGroupSpec.enableIngress exposes the dashboard")
    for path, group in _groups(spec):
        pod = (group.get("template") or {}).get("spec") or {}
        host = str((group.get("rayStartParams") or {}).get("dashboard-host", "127.0.0.1"))
        if not is_loopback_host(host):
            found.append(f"{where}: {path}.rayStartParams dashboard-host {host!r} binds the dashboard beyond the pod")
        if pod.get("hostNetwork"):
            found.append(f"{where}: {path}: hostNetwork puts Ray's ports on the node's own network")
        pod_context = pod.get("securityContext") or {}
        for container in pod.get("containers") or []:
            name = f"{path} container {container.get('name')}"
            for variable in container.get("env") or []:
                if variable.get("name") == "RAY_AUTH_MODE" and variable.get("value") != "token":
                    found.append(f"{where}: {name}: env RAY_AUTH_MODE={variable.get('value')} turns token auth off")
            context = {**pod_context, **(container.get("securityContext") or {})}
            if context.get("runAsNonRoot") is not True:
                found.append(f"{where}: {name}: securityContext.runAsNonRoot must be true")
            if context.get("allowPrivilegeEscalation") is not False or context.get("privileged"):
                found.append(f"{where}: {name}: securityContext must set allowPrivilegeEscalation: false")
            if context.get("readOnlyRootFilesystem") is not True:
                found.append(f"{where}: {name}: securityContext.readOnlyRootFilesystem must be true")
            if not DIGEST.search(str(container.get("image", ""))):
                found.append(f"{where}: {name}: image {container.get('image')!r} is a tag, not a digest "
                             "(image@sha256:…, cluster/pin_images.sh)")
    for other in others:
        if other.get("kind") == "Service" and ((other.get("spec") or {}).get("type") or "ClusterIP") != "ClusterIP":
            found.append(f"{where}: Service {(other.get('metadata') or {}).get('name')} of type "
                         f"{other['spec']['type']} exposes Ray outside the cluster")
    if manifest.get("kind") == "RayCluster":
        found += network_policy_findings(manifest, others, where)
    return found


def network_policy_findings(manifest: dict, others: list[dict], where: str) -> list[str]:
    """A NetworkPolicy beside the RayCluster that admits traffic to its pods only from its pods."""
    name = (manifest.get("metadata") or {}).get("name")
    selector = {"ray.io/cluster": name}
    for policy in (d for d in others if d.get("kind") == "NetworkPolicy"):
        spec = policy.get("spec") or {}
        selected = (spec.get("podSelector") or {}).get("matchLabels") == selector
        if not selected or "Ingress" not in spec.get("policyTypes", []):
            continue
        rules = spec.get("ingress") or []

        def own_pods(peer):
            return set(peer) == {"podSelector"} and peer["podSelector"].get("matchLabels") == selector

        def dashboard_only(rule):  # e.g. the KubeRay operator's namespace, for RayJob status
            ports = rule.get("ports") or []
            return bool(ports) and all(str(port.get("port")) == "8265" for port in ports)

        if rules and all(dashboard_only(rule) or (rule.get("from") and all(map(own_pods, rule["from"])))
                         for rule in rules):
            return []
        return [f"{where}: NetworkPolicy {(policy.get('metadata') or {}).get('name')} admits peers other than "
                f"the cluster's own pods (beyond the dashboard port 8265)"]
    return [f"{where}: no NetworkPolicy admits Ray's ports only from the cluster's own pods "
            f"(podSelector {selector}, policyTypes [Ingress])"]


# --- entry points -------------------------------------------------------------------------------
def check_file(path: str) -> list[str]:
    """Validate one config (launcher YAML, KubeRay manifest, runtime env or Dockerfile) and return
    its findings; ConfigError when it would not launch at all."""
    name = os.path.basename(path)
    if name == DOCKERFILE or name.endswith(".Dockerfile"):
        with open(path) as stream:
            found = dockerfile_findings(stream.read(), path)
        if is_installed_copy(path):
            return found  # no build context beside an installed package (main says so)
        ignore = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), ".dockerignore")
        if not os.path.exists(ignore):
            return found + [f"{path}: no .dockerignore beside the build context: `COPY .` ships everything"]
        with open(ignore) as stream:
            lines = [line.strip() for line in stream if line.strip() and not line.startswith("#")]
        if lines != dockerignore_lines(exclude_patterns()):
            found.append(f"{ignore}: differs from cluster/exclude.txt (each pattern, then its **/ twin)")
        return found
    documents = load_all(path)
    if not documents:
        raise ConfigError(f"{path}: empty")
    first = documents[0]
    if first.get("provider"):
        validate_launcher(first, path)
        return launcher_findings(first, path)
    if str(first.get("apiVersion", "")).startswith("ray.io/"):
        validate_kuberay(first, path)
        return kuberay_findings(first, path, documents[1:])
    if "excludes" in first or "pip" in first or "working_dir" in first:
        constraints_path = os.path.join(ROOT, CONSTRAINTS_FILE)
        constraints = read_constraints(constraints_path) if os.path.exists(constraints_path) else {}
        return runtime_env_findings(first, path, constraints)
    raise ConfigError(f"{path}: not a Ray cluster-launcher config, a KubeRay manifest, a runtime env or a Dockerfile")


def is_installed_copy(path: str) -> bool:
    """One of our own configs read from a wheel install's site-packages, not from a checkout (our
    Dockerfile's build context, where the .dockerignore lives)."""
    in_package = os.path.dirname(os.path.abspath(path)) == FOLDER
    return in_package and not os.path.exists(os.path.join(ROOT, "pyproject.toml"))


def default_files(folder: str = FOLDER) -> list[str]:
    return [os.path.join(folder, name) for name in (*LAUNCHER_CONFIGS, *KUBERAY_MANIFESTS, RUNTIME_ENV, DOCKERFILE)]


def check_all(files: list[str] | None = None) -> list[str]:
    """Validate every config in `files` (default: the ones in cluster/); the findings (empty = safe)."""
    findings = product_findings(exclude_patterns())
    for path in files or default_files():
        findings += check_file(path)
    return findings


def main(argv: list[str] | None = None) -> int:
    files = list(sys.argv[1:] if argv is None else argv) or default_files()
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        print(f"cluster.checks: error: {missing[0]}: no such file", file=sys.stderr)
        return 2
    try:
        findings = check_all(files)
    except (ConfigError, yaml.YAMLError) as error:
        print(f"cluster.checks: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    except UntestedVersion as error:
        print(f"cluster.checks: error: {error}", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"cluster.checks: {finding}", file=sys.stderr)
    if not findings:
        print(f"cluster.checks: {len(files)} configs valid: nothing exposed, shipped or unpinned")
        if any(is_installed_copy(f) and os.path.basename(f) == DOCKERFILE for f in files):
            print("cluster.checks: note: run from an installed package, so .dockerignore was not compared "
                  "(it belongs to the checkout the image is built from; run the checks there too)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
