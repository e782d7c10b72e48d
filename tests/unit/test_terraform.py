"""Terraform for the GPU node pools (infra/terraform/{gke,eks}) and the NVIDIA GPU operator values
(infra/gpu-operator): parsed offline with python-hcl2 and PyYAML, no provider, no cloud, no network.

Checks the contract the serving and training manifests rely on: GPU pools scale from zero, carry the
`nvidia.com/gpu=present:NoSchedule` taint and the `onevision/pool=gpu` label (EKS also tells the
cluster autoscaler so through node-template tags), provider versions are pinned, no credential is
committed, and the GPU operator's daemonsets tolerate the taint the pools declare."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "infra/terraform"
GPU_OPERATOR = ROOT / "infra/gpu-operator"
MODULES = ("gke", "eks")

GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}
GPU_LABELS = {"onevision/pool": "gpu", "nvidia.com/gpu.present": "true"}
K8S_EFFECT = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule", "NO_EXECUTE": "NoExecute"}
CA_TEMPLATE = "k8s.io/cluster-autoscaler/node-template/"

OPTIONS = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


# ---------------------------------------------------------------------------------------------- parsing
def load_module(name: str) -> dict[str, list[Any]]:
    """All .tf files of one module, merged by top-level block type (hcl2 gives each a list)."""
    files = sorted((TERRAFORM / name).glob("*.tf"))
    assert files, f"no .tf files in infra/terraform/{name}"
    merged: dict[str, list[Any]] = {}
    for path in files:
        with path.open() as f:
            for kind, entries in hcl2.load(f, serialization_options=OPTIONS).items():
                merged.setdefault(kind, []).extend(entries)
    return merged


@pytest.fixture(scope="module", params=MODULES)
def module(request: pytest.FixtureRequest) -> tuple[str, dict[str, list[Any]]]:
    return request.param, load_module(request.param)


def resources(mod: dict[str, list[Any]], rtype: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in mod.get("resource", []):
        for name, body in entry.get(rtype, {}).items():
            assert name not in found, f"duplicate {rtype}.{name}"
            found[name] = body
    return found


def locals_of(mod: dict[str, list[Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for entry in mod.get("locals", []):
        merged.update(entry)
    return merged


def variables(mod: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for entry in mod.get("variable", []):
        merged.update(entry)
    return merged


def resolve(mod: dict[str, list[Any]], value: Any) -> Any:
    """`${local.x}` -> the literal value of local x (the only indirection the modules use for maps)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\$\{local\.(\w+)\}", value)
        if match:
            return resolve(mod, locals_of(mod)[match.group(1)])
    return value


def block(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The single nested block `name` (hcl2 lists blocks, even when there is one)."""
    blocks = body.get(name)
    assert isinstance(blocks, list) and len(blocks) == 1, f"expected exactly one {name} block, got {blocks!r}"
    return blocks[0]


def gpu_pool(name: str, mod: dict[str, list[Any]]) -> dict[str, Any]:
    rtype = {"gke": "google_container_node_pool", "eks": "aws_eks_node_group"}[name]
    pools = resources(mod, rtype)
    assert "gpu" in pools, f"{rtype}.gpu missing in infra/terraform/{name}"
    return pools["gpu"]


def gpu_taints_and_labels(name: str, mod: dict[str, list[Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pool = gpu_pool(name, mod)
    holder = block(pool, "node_config") if name == "gke" else pool
    labels = resolve(mod, holder.get("labels"))
    assert isinstance(labels, dict), f"{name}: labels must be a literal map (or a local holding one), got {labels!r}"
    return holder.get("taint", []), labels


# ---------------------------------------------------------------------------------------------- GPU pools
def test_every_module_parses_and_has_the_usual_files(module: tuple[str, dict[str, list[Any]]]) -> None:
    name, mod = module
    present = {p.name for p in (TERRAFORM / name).glob("*.tf")}
    assert {"versions.tf", "variables.tf", "main.tf", "outputs.tf"} <= present
    assert mod.get("output"), f"{name}: no outputs"


def test_gpu_pools_scale_from_zero(module: tuple[str, dict[str, list[Any]]]) -> None:
    name, mod = module
    pool = gpu_pool(name, mod)
    if name == "gke":
        autoscaling = block(pool, "autoscaling")
        assert autoscaling["min_node_count"] == 0
        assert autoscaling["max_node_count"] == "${var.max_nodes}"
        assert pool.get("initial_node_count") == 0
        assert "node_count" not in pool  # a fixed size would fight the autoscaler
    else:
        scaling = block(pool, "scaling_config")
        assert scaling["min_size"] == 0 and scaling["desired_size"] == 0
        assert scaling["max_size"] == "${var.max_size}"
        # the autoscaler owns desired_size after creation; a later apply must not reset it to 0
        assert "${scaling_config[0].desired_size}" in block(pool, "lifecycle")["ignore_changes"]


def test_gpu_pools_carry_the_gpu_taint_and_pool_label(module: tuple[str, dict[str, list[Any]]]) -> None:
    name, mod = module
    taints, labels = gpu_taints_and_labels(name, mod)
    assert [{k: t.get(k) for k in GPU_TAINT} for t in taints] == [GPU_TAINT]
    assert {k: labels.get(k) for k in GPU_LABELS} == GPU_LABELS


def test_gke_gpu_pool_leaves_the_driver_to_the_gpu_operator() -> None:
    mod = load_module("gke")
    node_config = block(gpu_pool("gke", mod), "node_config")
    accelerator = block(node_config, "guest_accelerator")
    assert accelerator["type"] == "${var.gpu_type}" and accelerator["count"] == "${var.gpu_count}"
    assert block(accelerator, "gpu_driver_installation_config")["gpu_driver_version"] == "INSTALLATION_DISABLED"
    assert "GPU operator" in (TERRAFORM / "gke/main.tf").read_text()  # the comment saying why
    assert node_config["image_type"] == "UBUNTU_CONTAINERD"  # the operator's driver container needs Ubuntu on GKE
    assert resolve(mod, node_config["labels"])["gke-no-default-nvidia-gpu-device-plugin"] == "true"
    assert node_config["machine_type"] == "${var.machine_type}"
    var = variables(mod)
    assert var["gpu_type"]["default"] == "nvidia-h100-80gb"
    assert var["machine_type"]["default"] == "a3-highgpu-8g"
    assert var["gpu_count"]["default"] == 8
    assert {"project", "region", "cluster_name", "gpu_type", "gpu_count", "machine_type", "max_nodes"} <= set(var)


def test_gke_has_an_untainted_cpu_system_pool() -> None:
    mod = load_module("gke")
    pools = resources(mod, "google_container_node_pool")
    assert set(pools) == {"gpu", "system"}
    system = block(pools["system"], "node_config")
    assert "guest_accelerator" not in system and "taint" not in system
    assert resolve(mod, system["labels"]) == {"onevision/pool": "system"}
    assert block(pools["system"], "autoscaling")["min_node_count"] == "${var.system_min_nodes}"


def test_eks_gpu_node_group_inputs_and_ami() -> None:
    mod = load_module("eks")
    pool = gpu_pool("eks", mod)
    assert pool["ami_type"] == "AL2023_x86_64_NVIDIA"
    assert pool["instance_types"] == "${var.instance_types}"
    assert pool["cluster_name"] == "${var.cluster_name}"
    assert pool["subnet_ids"] == "${var.subnet_ids}"
    assert pool["node_role_arn"] == "${var.node_role_arn}"  # passed in, never created with keys here
    var = variables(mod)
    assert var["instance_types"]["default"] == ["p5.48xlarge"]
    for required in ("cluster_name", "subnet_ids", "node_role_arn"):
        assert "default" not in var[required], f"{required} must be supplied, not defaulted"
    assert not resources(mod, "aws_iam_access_key") and not resources(mod, "aws_iam_user")


def test_eks_has_the_cluster_autoscaler_node_template_tags() -> None:
    mod = load_module("eks")
    tags = locals_of(mod)["cluster_autoscaler_tags"]
    taints, labels = gpu_taints_and_labels("eks", mod)

    # one label tag per node label, same value: the autoscaler's node template matches the real node
    for key, value in labels.items():
        assert tags.get(f"{CA_TEMPLATE}label/{key}") == value, key
    # the taint, in Kubernetes spelling: value:Effect
    for taint in taints:
        assert tags[f"{CA_TEMPLATE}taint/{taint['key']}"] == f"{taint['value']}:{K8S_EFFECT[taint['effect']]}"
    assert tags[f"{CA_TEMPLATE}taint/nvidia.com/gpu"] == "present:NoSchedule"
    assert tags[f"{CA_TEMPLATE}resources/nvidia.com/gpu"] == "${tostring(var.gpus_per_node)}"
    assert variables(mod)["gpus_per_node"]["default"] == 8  # p5.48xlarge: 8x H100
    # auto-discovery tags
    assert tags["k8s.io/cluster-autoscaler/enabled"] == "true"
    assert tags["k8s.io/cluster-autoscaler/${var.cluster_name}"] == "owned"

    # on the node group ...
    assert "local.cluster_autoscaler_tags" in gpu_pool("eks", mod)["tags"]
    # ... and on its Auto Scaling group, where the autoscaler actually reads them
    (asg_tag,) = resources(mod, "aws_autoscaling_group_tag").values()
    assert asg_tag["for_each"] == "${local.cluster_autoscaler_tags}"
    assert "aws_eks_node_group.gpu.resources[0].autoscaling_groups[0].name" in asg_tag["autoscaling_group_name"]
    assert block(asg_tag, "tag")["key"] == "${each.key}" and block(asg_tag, "tag")["value"] == "${each.value}"


# ---------------------------------------------------------------------------------------------- providers
PINNED = re.compile(r"^\s*(~>\s*\d+\.\d+(\.\d+)?|=?\s*\d+\.\d+\.\d+|.*<\s*\d+(\.\d+)*.*)\s*$")


def test_provider_and_terraform_versions_are_pinned(module: tuple[str, dict[str, list[Any]]]) -> None:
    name, mod = module
    (settings,) = mod["terraform"]
    assert PINNED.match(settings["required_version"]), settings["required_version"]
    providers: dict[str, Any] = {}
    for entry in settings["required_providers"]:
        providers.update(entry)
    expected = {"gke": {"google": "hashicorp/google"}, "eks": {"aws": "hashicorp/aws"}}[name]
    assert {k: v["source"] for k, v in providers.items()} == expected
    for provider, spec in providers.items():
        # an upper bound (~> X.Y, < N) or an exact version: a new major never arrives on `init`
        assert PINNED.match(spec["version"]), f"{name}: {provider} version {spec['version']!r} is not pinned"


FORBIDDEN_PROVIDER_ARGS = {"credentials", "access_token", "access_key", "secret_key", "token",
                           "shared_credentials_files", "shared_config_files"}


def test_providers_take_credentials_from_the_environment(module: tuple[str, dict[str, list[Any]]]) -> None:
    name, mod = module
    for entry in mod.get("provider", []):
        for provider, body in entry.items():
            assert not FORBIDDEN_PROVIDER_ARGS & set(body), f"{name}: provider {provider} sets credentials"


# ---------------------------------------------------------------------------------------------- secrets
CREDENTIAL = re.compile(
    r"(?:A3T[A-Z0-9]|AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}"  # AWS access key ids
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"  # PEM private keys
    r"|\"type\"\s*:\s*\"service_account\"|\"private_key(?:_id)?\"\s*:"  # GCP service-account key JSON
    r"|AIza[0-9A-Za-z_\-]{35}"  # Google API keys
    r"|gh[pousr]_[A-Za-z0-9]{36}|xox[baprs]-[A-Za-z0-9-]{10,}"  # GitHub / Slack tokens
    r"|(?i:\b(?:password|passwd|secret|secret_?key|secret_?access_?key|access_?key(?:_?id)?|api_?key"
    r"|token|client_?secret|private_?key)\b[\"']?\s*[:=]\s*[\"'][^\"'$<{\s][^\"']{5,}[\"'])"  # key = "literal"
)


@pytest.mark.parametrize("sample", [
    "AKIA" + "Q" * 16,
    "-----BEGIN RSA " + "PRIVATE KEY-----",
    '  secret_key = "' + "wJalrXUtnFEMI/K7MDENG" + '"',
    '  "password": "' + "hunter2hunter2" + '"',
    '{"type": "service' + '_account", "project_id": "x"}',
])
def test_the_credential_scanner_catches_samples(sample: str) -> None:
    assert CREDENTIAL.search(sample)


@pytest.mark.parametrize("sample", [
    'node_role_arn = var.node_role_arn',
    'secret_key = var.secret_key',
    'password: "${DB_PASSWORD}"',
    '--from-literal=password=...',
])
def test_the_credential_scanner_lets_references_through(sample: str) -> None:
    assert not CREDENTIAL.search(sample)


def infra_files() -> list[Path]:
    files = [p for base in (TERRAFORM, GPU_OPERATOR) for p in base.rglob("*")
             if p.is_file() and ".terraform" not in p.parts]
    assert files
    return sorted(files)


def test_no_credential_looking_literal_in_terraform_or_gpu_operator_files() -> None:
    hits = []
    for path in infra_files():
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if CREDENTIAL.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert hits == []


def test_no_state_or_variable_files_are_kept() -> None:
    # state holds secrets in clear text; *.tfvars hold per-environment inputs: neither belongs in git
    leftovers = [p for p in infra_files() if re.search(r"\.tfstate|\.tfvars(\.json)?$|\.tfplan$", p.name)]
    assert leftovers == []
    ignored = (TERRAFORM / ".gitignore").read_text().split()
    assert {".terraform/", "*.tfstate", "*.tfvars"} <= set(ignored)


# ---------------------------------------------------------------------------------------------- GPU operator
def load_values(name: str = "values.yaml") -> dict[str, Any]:
    data = yaml.safe_load((GPU_OPERATOR / name).read_text())
    assert isinstance(data, dict)
    return data


def tolerates(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    effect = K8S_EFFECT[taint["effect"]]
    for t in tolerations or []:
        if t.get("effect") not in (None, "", effect):
            continue
        operator = t.get("operator", "Equal")
        if operator == "Exists" and t.get("key") in (None, "", taint["key"]):
            return True
        if operator == "Equal" and t.get("key") == taint["key"] and t.get("value") == taint["value"]:
            return True
    return False


def test_gpu_operator_values_parse_and_enable_the_stack() -> None:
    values = load_values()
    assert values["driver"]["enabled"] is True
    assert values["toolkit"]["enabled"] is True
    assert values["devicePlugin"]["enabled"] is True
    assert values["dcgmExporter"]["enabled"] is True
    assert values["dcgmExporter"]["serviceMonitor"]["enabled"] is True
    assert values["mig"]["strategy"] in ("single", "none")  # both keep the resource name nvidia.com/gpu
    assert values["node-feature-discovery"]["worker"]["nodeSelector"] == {"onevision/pool": "gpu"}


def test_gpu_operator_daemonsets_tolerate_the_taint_the_pools_declare() -> None:
    values = load_values()
    for name in MODULES:
        taints, _ = gpu_taints_and_labels(name, load_module(name))
        for taint in taints:
            assert tolerates(values["daemonsets"]["tolerations"], taint), (name, taint)
            assert tolerates(values["node-feature-discovery"]["worker"]["tolerations"], taint), (name, taint)
            # the operator controller itself stays off GPU nodes (they could not scale to zero)
            assert not tolerates(values.get("operator", {}).get("tolerations", []), taint)


def test_gpu_operator_install_command_is_pinned() -> None:
    header = (GPU_OPERATOR / "values.yaml").read_text()
    commands = re.findall(r"helm install --wait gpu-operator nvidia/gpu-operator .*", header)
    assert commands, "install command missing from the values.yaml header"
    for command in commands:
        assert "-n gpu-operator --create-namespace" in command and "-f values.yaml" in command
        assert re.search(r"--version v\d+\.\d+\.\d+\b", command), command
    versions = set(re.findall(r"--version (v\S+)", (GPU_OPERATOR / "values-eks.yaml").read_text() + header
                              + (TERRAFORM / "README.md").read_text()))
    assert len(versions) == 1, f"one chart version everywhere, got {versions}"


def test_eks_overlay_leaves_driver_and_toolkit_to_the_ami() -> None:
    overlay = load_values("values-eks.yaml")
    assert overlay == {"driver": {"enabled": False}, "toolkit": {"enabled": False}}


def test_gke_resource_quota_admits_the_operator_priority_class() -> None:
    quota = load_values("gke-resourcequota.yaml")
    assert quota["kind"] == "ResourceQuota" and quota["metadata"]["namespace"] == "gpu-operator"
    (expr,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expr["scopeName"] == "PriorityClass" and expr["operator"] == "In"
    assert load_values()["daemonsets"]["priorityClassName"] in expr["values"]


# ---------------------------------------------------------------------------------------------- formatting
@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform binary not installed")
def test_terraform_fmt_is_clean() -> None:
    env = {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
    done = subprocess.run(["terraform", "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)],
                          check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
