"""`python -m cluster.checks`: ours pass; each altered config that would expose Ray, ship secrets or
run unpinned code is refused with a line that names it."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from cluster.checks import check_all, check_file, default_files, main
from cluster.commands import ray_start_options, shell_commands
from cluster.shipping import FOLDER, dockerignore_lines, exclude_patterns

ROOT = os.path.dirname(FOLDER)
HEAD = "RAY_AUTH_MODE=token ray start --head --port=6379 --dashboard-host=127.0.0.1"


def read(name):
    with open(os.path.join(FOLDER, name)) as stream:
        return list(yaml.safe_load_all(stream))


def findings_for(tmp_path, name, documents):
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return " | ".join(check_file(str(path)))


def test_ours_pass_and_the_command_says_so(capsys):
    assert check_all() == []
    assert main([]) == 0
    assert "6 configs valid" in capsys.readouterr().out


def test_shell_words_environment_and_ray_start_options():
    commands = shell_commands("export A=1; B=2 env C=3 ray start --head --dashboard-host '0.0.0.0' && echo A=9")
    assert [c.argv[0] for c in commands] == ["ray", "echo"]
    assert commands[0].env == {"A": "1", "B": "2", "C": "3"} and commands[1].env == {"A": "1"}
    assert ray_start_options(commands[0].argv) == {"head": "", "dashboard-host": "0.0.0.0"}
    assert ray_start_options(["ray", "start", "--port=6379", "--block"]) == {"port": "6379", "block": ""}
    assert ray_start_options(["ray", "stop"]) is None
    # a bare assignment is a shell variable: the child sees it only once exported
    assert shell_commands("RAY_AUTH_MODE=token; ray start")[0].env == {}
    assert shell_commands("RAY_AUTH_MODE=token; export RAY_AUTH_MODE; ray start")[0].env == {"RAY_AUTH_MODE": "token"}
    assert shell_commands("ulimit -n 65536;\nray start --head")[1].argv == ["ray", "start", "--head"]


@pytest.mark.parametrize("command, expected", [
    (HEAD.replace("127.0.0.1", "::"), "binds the dashboard to '::'"),
    (HEAD.replace("--dashboard-host=127.0.0.1", '--dashboard-host="0.0.0.0"'), "binds the dashboard to '0.0.0.0'"),
    (HEAD.replace("--dashboard-host=127.0.0.1", "--dashboard-host 203.0.113.7"), "binds the dashboard to '203.0.113.7'"),
    ("echo RAY_AUTH_MODE=token; ray start --head --dashboard-host=127.0.0.1", "RAY_AUTH_MODE=unset"),
    ('echo "RAY_AUTH_MODE=token ray start" && ray start --head', "RAY_AUTH_MODE=unset"),
    (HEAD.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token RAY_AUTH_MODE=disabled"), "RAY_AUTH_MODE=disabled"),
    ("export RAY_AUTH_MODE=token; export RAY_AUTH_MODE=disabled; ray start --head", "RAY_AUTH_MODE=disabled"),
    ("export RAY_AUTH_MODE=token; unset RAY_AUTH_MODE; ray start --head", "RAY_AUTH_MODE=unset"),
    ("ray stop", "no `ray start` found"),
])
def test_altered_ray_start_commands_are_refused(tmp_path, command, expected):
    config = read("aws.yaml")[0]
    config["head_start_ray_commands"] = ["ray stop", command]
    assert expected in findings_for(tmp_path, "aws.yaml", [config])


def _aws_open_group(config):
    config["provider"]["security_group"] = {"GroupName": "open", "IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "1.2.3.0/24"}]}]}


@pytest.mark.parametrize("name, alter, expected", [
    ("aws.yaml", _aws_open_group, "opens ports 8265-8265 to 1.2.3.0/24"),
    ("aws.yaml", lambda c: c["available_node_types"]["gpu_spot"]["node_config"].pop("SecurityGroupIds"),
     "gpu_spot has no SecurityGroupIds"),
    ("aws.yaml", lambda c: c["available_node_types"]["head"]["node_config"].update(
        NetworkInterfaces=[{"DeviceIndex": 0, "AssociatePublicIpAddress": True}]), "gives it a public IP"),
    ("aws.yaml", lambda c: c["provider"].pop("use_internal_ips"), "use_internal_ips must be true"),
    ("gcp.yaml", lambda c: c["available_node_types"]["gpu_spot"]["node_config"]["networkInterfaces"][0].update(
        accessConfigs=[{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]), "gpu_spot: networkInterfaces accessConfigs"),
    ("gcp.yaml", lambda c: c["available_node_types"]["head"]["node_config"].update(
        networkInterfaces=[{"network": "global/networks/default"}]), "default network"),
    ("gcp.yaml", lambda c: c["setup_commands"].insert(0, "python3 -m pip install -q --upgrade pip"),
     "--upgrade takes whatever is newest"),
    ("gcp.yaml", lambda c: c.update(setup_commands=["pip install -e /home/ubuntu/selfsup"]),
     "pip install without -c cluster/constraints.txt"),
    ("gcp.yaml", lambda c: c["available_node_types"]["head"]["node_config"]["disks"][0]["initializeParams"].update(
        sourceImage="projects/deeplearning-platform-release/global/images/family/common-cu124"), "image family moves"),
    ("gcp.yaml", lambda c: c["rsync_exclude"].remove(".env*"), "rsync_exclude would ship .env*"),
    ("aws.yaml", lambda c: c["rsync_exclude"].remove("data"), "rsync_exclude would ship data"),
    ("aws.yaml", lambda c: c["rsync_exclude"].append("extra"), "differs from cluster/exclude.txt in extra"),
])
def test_altered_launcher_configs_are_refused(tmp_path, name, alter, expected):
    config = read(name)[0]
    alter(config)
    assert expected in findings_for(tmp_path, name, [config])


def _head(spec):
    return spec["headGroupSpec"]


def _cluster_spec(documents):
    return documents[0]["spec"].get("rayClusterSpec", documents[0]["spec"])


@pytest.mark.parametrize("alter, expected", [
    (lambda d: _head(_cluster_spec(d))["template"]["spec"].update(hostNetwork=True), "hostNetwork"),
    (lambda d: _head(_cluster_spec(d))["rayStartParams"].update({"dashboard-host": "0.0.0.0"}),
     "dashboard-host '0.0.0.0'"),
    (lambda d: _head(_cluster_spec(d)).update(serviceType="NodePort"), "serviceType NodePort exposes"),
    (lambda d: _head(_cluster_spec(d)).update(headService={"spec": {"type": "LoadBalancer"}}),
     "headService.spec.type LoadBalancer"),
    (lambda d: d.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ray-lb"},
                         "spec": {"type": "LoadBalancer"}}), "Service ray-lb of type LoadBalancer"),
    (lambda d: _head(_cluster_spec(d))["template"]["spec"]["containers"][0].update(
        env=[{"name": "RAY_AUTH_MODE", "value": "disabled"}]), "RAY_AUTH_MODE=disabled"),
    (lambda d: _head(_cluster_spec(d))["template"]["spec"]["containers"][0].update(image="reg/selfsup:latest"),
     "'reg/selfsup:latest' is a tag, not a digest"),
    (lambda d: _head(_cluster_spec(d))["template"]["spec"]["containers"][0].pop("securityContext"),
     "runAsNonRoot must be true"),
    (lambda d: _cluster_spec(d)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"].update(
        readOnlyRootFilesystem=False), "readOnlyRootFilesystem must be true"),
    (lambda d: d.pop(1), "no NetworkPolicy admits"),
    (lambda d: d[1]["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}), "admits peers other than"),
    (lambda d: d[1]["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}], "ports": [{"port": 6379}]}),
     "admits peers other than"),
])

def test_altered_kuberay_manifests_are_refused(tmp_path, alter, expected):
    documents = read("kuberay-raycluster.yaml")
    alter(documents)
    assert expected in findings_for(tmp_path, "kuberay-raycluster.yaml", documents)


def test_runtime_env_and_image_must_pin_and_exclude(tmp_path):
    runtime_env = read("runtime_env.yaml")[0]
    runtime_env["pip"].append("timm>=1.0")
    runtime_env["excludes"].remove("runs")
    findings = findings_for(tmp_path, "runtime_env.yaml", [runtime_env])
    assert "'timm>=1.0' is not pinned" in findings and "excludes would ship runs" in findings
    runtime_env = read("runtime_env.yaml")[0]
    runtime_env["pip"][0] = "timm==0.9.0"
    assert "differs from cluster/constraints.txt" in findings_for(tmp_path, "runtime_env.yaml", [runtime_env])
    (tmp_path / "cluster").mkdir()
    dockerfile = tmp_path / "cluster" / "Dockerfile"
    dockerfile.write_text("FROM rayproject/ray:2.60.0-py311-gpu\nCOPY . /app\nRUN pip install -U -e /app\n")
    findings = " | ".join(check_file(str(dockerfile)))
    assert "is a tag, not a digest" in findings and "--upgrade" in findings and "no .dockerignore" in findings
    (tmp_path / ".dockerignore").write_text(".venv\n")
    assert "differs from cluster/exclude.txt" in " | ".join(check_file(str(dockerfile)))


def test_one_exclude_list_everywhere():
    patterns = exclude_patterns()
    assert read("aws.yaml")[0]["rsync_exclude"] == read("gcp.yaml")[0]["rsync_exclude"] == patterns
    assert read("runtime_env.yaml")[0]["excludes"] == patterns
    with open(os.path.join(ROOT, ".dockerignore")) as stream:
        assert [line.strip() for line in stream if line.strip() and not line.startswith("#")] == \
            dockerignore_lines(patterns)


def test_the_command_checks_the_files_given(tmp_path):
    config = read("gcp.yaml")[0]
    config["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "cluster.checks", str(mine)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "binds the dashboard to '0.0.0.0'" in run.stderr
    assert "RAY_AUTH_MODE=unset" in run.stderr
    ours = subprocess.run([sys.executable, "-m", "cluster.checks", os.path.join(FOLDER, "aws.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert ours.returncode == 0, ours.stderr
    assert main([str(tmp_path / "missing.yaml")]) == 2


def test_pin_images_writes_digests_that_the_check_accepts(tmp_path):
    """The refresh script against stand-ins for docker and gcloud (no registry here)."""
    repo = tmp_path / "repo"
    shutil.copytree(FOLDER, repo / "cluster")
    shutil.copy(os.path.join(ROOT, ".dockerignore"), repo / ".dockerignore")
    tools = tmp_path / "bin"
    tools.mkdir()
    base, pushed = "a" * 64, "b" * 64
    (tools / "docker").write_text(
        "#!/bin/sh\n"
        f'case "$1 $2" in "buildx imagetools") echo sha256:{base};; "inspect --format") echo "reg/selfsup@sha256:{pushed}";; esac\n')
    (tools / "gcloud").write_text('#!/bin/sh\necho "image-v20261101-$4"\n')
    for tool in ("docker", "gcloud"):
        (tools / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(repo / "cluster" / "pin_images.sh"), "reg/selfsup"], capture_output=True,
                         text=True, env=env, cwd=repo)
    assert run.returncode == 0, run.stderr
    assert f"FROM rayproject/ray:2.60.0-py311-gpu@sha256:{base}\n" in (repo / "cluster" / "Dockerfile").read_text()
    manifest = (repo / "cluster" / "kuberay-raycluster.yaml").read_text()
    assert f"image: reg/selfsup@sha256:{pushed}" in manifest and "REPLACE-registry" not in manifest
    gcp = (repo / "cluster" / "gcp.yaml").read_text()
    assert "images/image-v20261101-common-cu124-ubuntu-2204-py310  # family: common-cu124" in gcp
    assert "REPLACE-with-an-image-name" not in gcp
    assert check_all(default_files(str(repo / "cluster"))) == []


def test_the_way_in_is_documented():
    with open(os.path.join(FOLDER, "README.md")) as stream:
        text = stream.read()
    for expected in ("--tunnel-through-iap", "35.235.240.0/20", "ProxyJump", "ray dashboard", "use_internal_ips",
                     "Cloud NAT", "NAT gateway", "kubectl port-forward", "SELFSUP_RAY_LISTEN"):
        assert expected in text, expected


def test_a_network_policy_may_admit_the_operator_on_the_dashboard_port_only(tmp_path):
    documents = read("kuberay-raycluster.yaml")
    documents[1]["spec"]["ingress"].append({"from": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kuberay-operator"}}}], "ports": [{"port": 8265, "protocol": "TCP"}]})
    assert findings_for(tmp_path, "kuberay-raycluster.yaml", documents) == ""


def test_no_exclude_pattern_drops_the_products_own_code(tmp_path):
    """A package named like an exclude pattern (`pipelines/data/` against `data`) would be left
    out of every job upload, node and image: the check names it; ours has none."""
    from cluster.shipping import excluded_by, product_findings

    assert product_findings(exclude_patterns()) == []
    (tmp_path / "pipelines" / "data").mkdir(parents=True)
    (tmp_path / "pipelines" / "data" / "ingest.py").write_text("")
    (tmp_path / "pipelines" / "dataset.py").write_text("")  # a name is matched whole
    assert product_findings(exclude_patterns(), str(tmp_path)) == [
        "cluster/exclude.txt: 'data' drops pipelines/data/ingest.py, the product's own code (rename the folder, "
        "or anchor the pattern)"]
    assert excluded_by("a/b/x.pem", "*.pem") and excluded_by("a/runs/x", "**/runs") and not excluded_by("a/x.py", "*.pem")
