"""Checks the launch files in cluster/ with the rules Ray and KubeRay apply to them.

Ray cluster-launcher YAMLs (aws.yaml, gcp.yaml) go through Ray's own validator, the one `ray up` runs:
``validate_config(prepare_config(cfg))`` from ``ray.autoscaler._private.util``. ``prepare_config`` is
offline: it merges the provider's ``defaults.yaml`` shipped in the wheel, merges the setup commands and
fills per-node-type min/max workers. Everything that needs the cloud (IAM roles, key pairs, subnets,
``describe_instance_types``) lives in the provider's ``bootstrap_config``, which these tests never call.
The ``offline`` fixture makes any socket use an error, so that stays true.

KubeRay manifests (kuberay-raycluster.yaml, kuberay-rayjob.yaml) are checked against the fields KubeRay's
CRDs (ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml) require, and then fed to
``_derive_autoscaling_config_from_ray_cr``: the function the Ray autoscaler runs inside a KubeRay head pod
to turn a RayCluster into its config, which ends in the same ``validate_config``.

What ``ray job submit --working-dir .`` uploads is built by the job client's own upload code (Ray's default
excludes, .gitignore, .rayignore) on a copy of the checkout with data folders in it; the zip is caught where the
client would send it.
"""

from __future__ import annotations

import copy
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import ResourceDemandScheduler
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
from ray.core.generated.common_pb2 import Bundle, PlacementStrategy
from ray.core.generated.gcs_pb2 import PlacementGroupTableData
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
from ray.job_submission import JobSubmissionClient

from mammo_ray import cli

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = {"aws": "s3", "gcp": "gs"}  # launcher file stem -> storage URI scheme
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
# Command lists that must be written out: prepare_config fills a missing top-level key from the provider's
# defaults.yaml (a shallow merge), whose setup_commands install a nightly Ray wheel where `ray` is missing
# and whose start commands bind the dashboard to 0.0.0.0.
EXPLICIT_COMMAND_LISTS = [
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
]
# A Train worker holds its CPUs for a whole trial; Ray Data only gets what is left on the node. With at
# least 4 CPUs per GPU, one worker per GPU can take 2 CPUs and still leave whole CPUs for Data.
MIN_CPUS_PER_GPU = 4
# The CPU-only worker type of each file (node type or worker group), which adds CPUs for Ray Data without GPUs,
# and its 1-GPU type, where a single GPU Train worker belongs.
CPU_TYPES = {"aws": "cpu", "gcp": "cpu", "kuberay-raycluster.yaml": "cpu", "kuberay-rayjob.yaml": "cpu"}
GPU_1X_TYPES = {"aws": "gpu_1x", "gcp": "gpu_1x", "kuberay-raycluster.yaml": "gpu-1x", "kuberay-rayjob.yaml": "gpu-1x"}
MIN_CPU_TYPE_CPUS = 16
PLACEHOLDER = re.compile(r"REPLACE_ME_[A-Z_]+")


def _ray_version() -> str:
    """Ray version the project is built against: the lower bound of the ray requirement in pyproject."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_requirement,) = [d for d in dependencies if re.match(r"ray(\[|>|=|$)", d)]
    return re.search(r">=\s*([0-9][0-9.]*)", ray_requirement).group(1)


RAY_VERSION = _ray_version()
IMAGE = re.compile(rf"^rayproject/ray(-ml)?:{re.escape(RAY_VERSION)}-py311-cu12\d$")


def _load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _load_all(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc is not None]


def _ray_doc(name: str) -> dict[str, Any]:
    (doc,) = [d for d in _load_all(name) if d.get("apiVersion", "").startswith("ray.io/")]
    return doc


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _as_ray_cluster(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster that KubeRay creates for `doc` (a RayCluster already, or the one inside a RayJob)."""
    metadata = {"name": doc["metadata"]["name"], "namespace": doc["metadata"].get("namespace", "default")}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": metadata, "spec": _cluster_spec(doc)}


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay treats the first container of a group's pod template as the Ray container."""
    return group["template"]["spec"]["containers"][0]


def _gpu_count(container: dict[str, Any], section: str = "limits") -> int:
    return int(container.get("resources", {}).get(section, {}).get("nvidia.com/gpu", 0))


def _shell_text(config: dict[str, Any], key: str) -> str:
    return "\n".join(config.get(key, []))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails any attempt to open a network connection or resolve a host name."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- Ray cluster launcher -------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", sorted(LAUNCHERS))
def test_launcher_passes_ray_validator(stem: str, offline: None) -> None:
    validate_config(prepare_config(_load(f"{stem}.yaml")))


@pytest.mark.parametrize("stem", sorted(LAUNCHERS))
def test_launcher_node_types(stem: str) -> None:
    config = prepare_config(_load(f"{stem}.yaml"))
    assert config["provider"]["type"] == stem
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "the head must declare 0 GPUs, or GPU trials could land on it"
    assert head["resources"]["CPU"] >= 8, "the head runs the Tune driver and Ray Data tasks"

    gpus_per_worker_type = {}
    cpu_types = {}
    for name, node_type in node_types.items():
        if name == config["head_node_type"]:
            continue
        resources = node_type["resources"]
        # Every worker type says how many GPUs it has: the autoscaler plans with these numbers, and `ray up`
        # starts Ray with them (RAY_OVERRIDE_RESOURCES), so a CPU type's 0 keeps GPU trials off it.
        assert "GPU" in resources, f"{name}: worker types must declare their GPUs, 0 on a CPU-only type"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        if resources["GPU"] == 0:
            cpu_types[name] = node_type
            continue
        assert resources["CPU"] >= MIN_CPUS_PER_GPU * resources["GPU"], f"{name}: too few CPUs for Ray Data"
        gpus_per_worker_type[name] = resources["GPU"]
    assert sorted(gpus_per_worker_type.values()) == [1, 8], "expected one 1-GPU and one 8-GPU node type"
    assert list(cpu_types) == [CPU_TYPES[stem]], "expected one CPU-only worker type for Ray Data"
    (cpu_type,) = cpu_types.values()
    assert cpu_type["resources"]["CPU"] >= MIN_CPU_TYPE_CPUS, "a CPU node is worth starting only with many CPUs"
    assert cpu_type["min_workers"] == 0, "CPU nodes start on demand, like the GPU nodes"
    assert cpu_type["max_workers"] >= 1
    # The global cap leaves room for every type's maximum, so CPU nodes never take the place of a GPU node.
    workers_max = sum(t["max_workers"] for name, t in node_types.items() if name != config["head_node_type"])
    assert workers_max <= config["max_workers"]


@pytest.mark.parametrize("stem", sorted(LAUNCHERS))
def test_every_launcher_worker_type_can_reach_the_bucket(stem: str) -> None:
    """Ray Data tasks and Tune's trial actors on a CPU node read and write the bucket, as GPU nodes do."""
    config = _load(f"{stem}.yaml")
    credentials = {"aws": "IamInstanceProfile", "gcp": "serviceAccounts"}[stem]
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    given = {name: node_type["node_config"].get(credentials) for name, node_type in workers.items()}
    assert all(given.values()), given
    assert len({repr(value) for value in given.values()}) == 1, given


@pytest.mark.parametrize("stem", sorted(LAUNCHERS))
def test_launcher_commands(stem: str) -> None:
    raw = _load(f"{stem}.yaml")
    missing = [key for key in EXPLICIT_COMMAND_LISTS if key not in raw]
    assert not missing, f"Ray would fill these from its defaults.yaml: {missing}"

    config = prepare_config(raw)
    head_start = _shell_text(config, "head_start_ray_commands")
    worker_start = _shell_text(config, "worker_start_ray_commands")
    # DESIGN: the dashboard binds to 127.0.0.1; users reach it with `ray dashboard <yaml>` (SSH forward).
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    for text in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in text
    # Ray must see every CPU of a GPU node; the space file's cpus_per_worker leaves some for Ray Data.
    assert "--num-cpus" not in worker_start
    assert "mammo_ray" in _shell_text(config, "setup_commands")
    assert f"ray[data,train,tune,default]=={RAY_VERSION}" in _shell_text(config, "setup_commands")
    assert IMAGE.match(config["docker"]["image"]), config["docker"]["image"]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("name", [f"{stem}.yaml" for stem in sorted(LAUNCHERS)] + KUBERAY)
def test_every_cluster_labels_its_head_as_one_an_autoscaler_grows(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 records no autoscaling config, so without this label `tune` would cap a sweep to what the head
    alone can hold and refuse a GPU space before the first GPU node starts (cli.cluster_is_fixed)."""
    from ray._private.label_utils import parse_node_labels_string, validate_node_label_syntax

    if name in KUBERAY:
        head = _cluster_spec(_ray_doc(name))["headGroupSpec"]
        assert "labels" not in head["rayStartParams"], "KubeRay >= 1.5 refuses rayStartParams.labels"
        labels = head.get("labels", {})
    else:
        start = _shell_text(prepare_config(_load(name)), "head_start_ray_commands")
        given = re.findall(r"--labels=(\S+)", start)
        assert len(given) == 1, start
        labels = parse_node_labels_string(given[0])
    validate_node_label_syntax(labels)
    head_node = {"Alive": True, "Labels": labels}
    assert labels.get(cli.GROWS_LABEL) == "true"
    monkeypatch.setattr(cli, "_STARTED_HERE", False)  # joined, as `ray job submit` and `--address auto` are
    assert not cli.cluster_is_fixed([head_node])


@pytest.mark.parametrize(("stem", "scheme"), sorted(LAUNCHERS.items()))
def test_launcher_storage_is_a_bucket(stem: str, scheme: str) -> None:
    assert _load(f"{stem}.yaml")["metadata"]["storage_uri"].startswith(f"{scheme}://")


def _readme_section(title: str) -> str:
    """The text of the `## <title>` section of cluster/README.md."""
    text = (CLUSTER / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_aws_pass_role_step_comes_before_the_first_sweep() -> None:
    """The head launches GPU nodes with an instance profile, which needs iam:PassRole that `ray up` does not grant.

    Without it every GPU node launch fails and the sweep waits, so the step belongs in the launch checklist and
    next to the profile in aws.yaml, not only in the credentials notes.
    """
    config = _load("aws.yaml")
    profiles = [t["node_config"].get("IamInstanceProfile") for t in config["available_node_types"].values()]
    assert any(profiles), "aws.yaml no longer gives the workers an instance profile; drop this test"
    assert "iam:PassRole" in (CLUSTER / "aws.yaml").read_text()
    checklist = _readme_section("Before the first launch")
    assert "iam:PassRole" in checklist
    assert "aws iam put-role-policy" in checklist


def _misspell_top_level_key(config: dict[str, Any]) -> None:
    config["head_start_ray_comands"] = config.pop("head_start_ray_commands")


def _misspell_node_type_key(config: dict[str, Any]) -> None:
    gpu_1x = config["available_node_types"]["gpu_1x"]
    gpu_1x["min_worker"] = gpu_1x.pop("min_workers")


def _fractional_gpu(config: dict[str, Any]) -> None:
    config["available_node_types"]["gpu_1x"]["resources"]["GPU"] = 0.5


def _unknown_head_type(config: dict[str, Any]) -> None:
    config["head_node_type"] = "ray.head.default"


def _min_workers_over_global_max(config: dict[str, Any]) -> None:
    config["available_node_types"]["gpu_1x"]["min_workers"] = config["max_workers"] + 1


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (_misspell_top_level_key, jsonschema.ValidationError, "'head_start_ray_comands' was unexpected"),
        (_misspell_node_type_key, jsonschema.ValidationError, "'min_worker' was unexpected"),
        (_fractional_gpu, jsonschema.ValidationError, "0.5 is not of type 'integer'"),
        (_unknown_head_type, ValueError, "head_node_type"),
        (_min_workers_over_global_max, ValueError, "max_workers"),
    ],
    ids=lambda value: value.__name__.lstrip("_") if callable(value) else None,
)
def test_ray_validator_rejects_broken_copies_of_aws_yaml(
    mutate: Any, error: type[Exception], message: str, offline: None
) -> None:
    config = copy.deepcopy(_load("aws.yaml"))
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        validate_config(prepare_config(config))


# --- KubeRay --------------------------------------------------------------------------------------------


def _kuberay_problems(doc: dict[str, Any]) -> list[str]:
    """Fields KubeRay's CRDs require or that this project relies on, as a list of what is wrong."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    if not doc.get("metadata", {}).get("name"):
        problems.append("metadata.name is required")
    if doc.get("kind") == "RayJob":
        spec = doc.get("spec", {})
        if not spec.get("entrypoint"):
            problems.append("spec.entrypoint is required")
        if "rayClusterSpec" not in spec:
            return [*problems, "spec.rayClusterSpec is required"]
    cluster = _cluster_spec(doc)
    annotations = doc.get("metadata", {}).get("annotations", {})
    overwrite_command = annotations.get("ray.io/overwrite-container-cmd") == "true"

    if cluster.get("rayVersion") != RAY_VERSION:
        problems.append(f"rayVersion must be {RAY_VERSION}")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")

    head = cluster.get("headGroupSpec", {})
    groups = [("headGroupSpec", head)] + [
        (f"workerGroupSpecs[{i}]", group) for i, group in enumerate(cluster.get("workerGroupSpecs", []))
    ]
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec.rayStartParams is required")
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append("the head Service must stay ClusterIP without an Ingress")
    gpu_groups = 0

    for where, group in groups:
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if not containers:
            problems.append(f"{where}.template.spec.containers is required")
            continue
        ray_container = containers[0]  # KubeRay treats the first container as the Ray container
        for field in ("name", "image"):
            if not ray_container.get(field):
                problems.append(f"{where}.template.spec.containers[0].{field} is required")
        if not IMAGE.match(ray_container.get("image", "")):
            problems.append(f"{where}: image {ray_container.get('image')!r} does not match rayVersion")
        if overwrite_command and "$KUBERAY_GEN_RAY_START_CMD" not in " ".join(ray_container.get("args", [])):
            problems.append(f"{where}: with ray.io/overwrite-container-cmd the args must run the start command")
        # Every Ray pod reads or writes the bucket; its credentials come from the pod's service account.
        if not group.get("template", {}).get("spec", {}).get("serviceAccountName"):
            problems.append(f"{where}.template.spec.serviceAccountName is required (bucket credentials)")
        if where == "headGroupSpec":
            if _gpu_count(ray_container) or _gpu_count(ray_container, "requests"):
                problems.append("the head must not request GPUs")
            if head.get("rayStartParams", {}).get("num-gpus") != "0":
                problems.append('headGroupSpec.rayStartParams.num-gpus must be "0"')
            continue
        for field in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
            if field not in group:
                problems.append(f"{where}.{field} is required")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 0):
            problems.append(f"{where}: need minReplicas <= replicas <= maxReplicas")
        gpus = _gpu_count(ray_container)
        if _gpu_count(ray_container, "requests") not in (0, gpus):
            problems.append(f"{where}: nvidia.com/gpu requests must equal limits")
        if gpus >= 1:
            gpu_groups += 1
            continue
        # A CPU-only group (Ray Data's extra CPUs). Without num-gpus "0" Ray would count the GPUs a pod sees on a
        # GPU node whose runtime shows them to pods that requested none, and GPU trials could land there.
        if group.get("rayStartParams", {}).get("num-gpus") != "0":
            problems.append(
                f"{where}: the Ray container must have nvidia.com/gpu in resources.limits, "
                'or a CPU-only group rayStartParams.num-gpus "0"'
            )
        if group.get("minReplicas", 0) != 0:
            problems.append(f"{where}: a CPU-only group needs minReplicas 0 (its pods start on demand)")
    if not gpu_groups:
        problems.append("at least one GPU worker group is required")
    return problems


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_fields(name: str) -> None:
    assert _kuberay_problems(_ray_doc(name)) == []


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_passes_ray_autoscaler(name: str, offline: None) -> None:
    config = _derive_autoscaling_config_from_ray_cr(_as_ray_cluster(_ray_doc(name)))
    node_types = config["available_node_types"]
    assert node_types["headgroup"]["resources"]["GPU"] == 0
    workers = {group: t for group, t in node_types.items() if group != "headgroup"}
    cpu_groups = [group for group, t in workers.items() if not t["resources"].get("GPU")]
    assert cpu_groups == [CPU_TYPES[name]], "expected one CPU-only worker group for Ray Data"
    for group, node_type in workers.items():
        resources = node_type["resources"]
        if group in cpu_groups:
            assert resources.get("GPU") == 0, "a CPU-only group must declare 0 GPUs (num-gpus), not leave it out"
            assert resources["CPU"] >= MIN_CPU_TYPE_CPUS, "a CPU pod is worth starting only with many CPUs"
            assert node_type["min_workers"] == 0
            continue
        assert resources["GPU"] >= 1
        assert resources["CPU"] >= MIN_CPUS_PER_GPU * resources["GPU"], "too few CPUs for Ray Data"
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_volumes_are_declared(name: str) -> None:
    claims = {d["metadata"]["name"] for d in _load_all(name) if d["kind"] == "PersistentVolumeClaim"}
    cluster = _cluster_spec(_ray_doc(name))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in _ray_container(group).get("volumeMounts", []):
            assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or claim in claims, f"PVC {claim} is not in {name}"


def _drop_gpu_limit(doc: dict[str, Any]) -> None:
    _ray_container(_cluster_spec(doc)["workerGroupSpecs"][0])["resources"]["limits"].pop("nvidia.com/gpu")


def _gpu_on_head(doc: dict[str, Any]) -> None:
    _ray_container(_cluster_spec(doc)["headGroupSpec"])["resources"]["limits"]["nvidia.com/gpu"] = "1"


def _drop_min_replicas(doc: dict[str, Any]) -> None:
    del _cluster_spec(doc)["workerGroupSpecs"][0]["minReplicas"]


def _drop_head_ray_start_params(doc: dict[str, Any]) -> None:
    del _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]


def _other_ray_version(doc: dict[str, Any]) -> None:
    _cluster_spec(doc)["rayVersion"] = "2.9.3"


def _start_command_lost(doc: dict[str, Any]) -> None:
    _ray_container(_cluster_spec(doc)["workerGroupSpecs"][0])["args"] = ["sleep infinity"]


def _load_balancer(doc: dict[str, Any]) -> None:
    _cluster_spec(doc)["headGroupSpec"]["serviceType"] = "LoadBalancer"


def _no_service_account(doc: dict[str, Any]) -> None:
    del _cluster_spec(doc)["workerGroupSpecs"][0]["template"]["spec"]["serviceAccountName"]


def _cpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    (group,) = [g for g in _cluster_spec(doc)["workerGroupSpecs"] if g["groupName"] == "cpu"]
    return group


def _cpu_group_counts_gpus(doc: dict[str, Any]) -> None:
    del _cpu_group(doc)["rayStartParams"]["num-gpus"]


def _cpu_group_always_on(doc: dict[str, Any]) -> None:
    _cpu_group(doc)["minReplicas"] = _cpu_group(doc)["replicas"] = 1


def _only_cpu_workers(doc: dict[str, Any]) -> None:
    _cluster_spec(doc)["workerGroupSpecs"] = [_cpu_group(doc)]


@pytest.mark.parametrize("name", KUBERAY)
@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_drop_gpu_limit, "nvidia.com/gpu in resources.limits"),
        (_gpu_on_head, "the head must not request GPUs"),
        (_drop_min_replicas, "workerGroupSpecs[0].minReplicas is required"),
        (_drop_head_ray_start_params, "headGroupSpec.rayStartParams is required"),
        (_other_ray_version, "rayVersion must be"),
        (_start_command_lost, "must run the start command"),
        (_load_balancer, "ClusterIP"),
        (_no_service_account, "workerGroupSpecs[0].template.spec.serviceAccountName is required"),
        (_cpu_group_counts_gpus, 'rayStartParams.num-gpus "0"'),
        (_cpu_group_always_on, "a CPU-only group needs minReplicas 0"),
        (_only_cpu_workers, "at least one GPU worker group is required"),
    ],
    ids=lambda value: value.__name__.lstrip("_") if callable(value) else None,
)
def test_kuberay_checks_catch_broken_copies(name: str, mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(_ray_doc(name))
    mutate(doc)
    problems = _kuberay_problems(doc)
    assert any(expected in problem for problem in problems), problems


# --- What the autoscaler starts for a demand ------------------------------------------------------------

# Ray's v1 autoscaler (what `ray up` runs, and KubeRay's in-tree autoscaler unless v2 is switched on) decides which
# node types to add in ResourceDemandScheduler.get_nodes_to_launch. Its default scorer ranks a GPU node type last
# for a demand without GPUs (AUTOSCALER_CONSERVE_GPU_NODES, on by default), so such a demand starts the CPU type.
# These tests feed it the node types that Ray derives from each file and the demands a sweep makes, offline.
RAY_DATA_TASK = {"CPU": 1}  # a read/decode/augment task, as Ray Data asks for it (zero-valued resources dropped)
TRIAL_ACTOR = {"CPU": 0.1}  # resources.trial_cpus, Tune's placement group for the trial actor
GPU_WORKER = {"GPU": 1, "CPU": 4}  # a Train worker of a GPU space


def _autoscaling_config(name: str) -> dict[str, Any]:
    """The config the autoscaler runs with: `ray up`'s prepared launcher file or KubeRay's derived one."""
    if name in LAUNCHERS:
        return prepare_config(_load(f"{name}.yaml"))
    return _derive_autoscaling_config_from_ray_cr(_as_ray_cluster(_ray_doc(name)))


class _RunningNodes(NodeProvider):
    """The nodes the cluster has, as the autoscaler reads them from its provider: id (= IP) -> node type."""

    def __init__(self, head_type: str, workers: dict[str, str]) -> None:
        super().__init__({}, "mammo-ray")
        self.kinds = {"head": (head_type, NODE_KIND_HEAD)} | {i: (t, NODE_KIND_WORKER) for i, t in workers.items()}

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        return list(self.kinds)

    def node_tags(self, node_id: str) -> dict[str, str]:
        node_type, kind = self.kinds[node_id]
        return {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: node_type}

    def internal_ip(self, node_id: str) -> str:
        return node_id


def _placement_group(bundles: list[dict[str, float]]) -> PlacementGroupTableData:
    """A pending PACK placement group, as Tune (one bundle per trial actor) and Ray Train (one per worker) make."""
    return PlacementGroupTableData(
        strategy=PlacementStrategy.PACK, bundles=[Bundle(unit_resources=bundle) for bundle in bundles]
    )


def _nodes_to_launch(
    name: str,
    *,
    tasks: list[dict[str, float]] = (),
    requested: list[dict[str, float]] = (),
    placement_groups: list[PlacementGroupTableData] = (),
    busy_workers: dict[str, str] | None = None,
) -> dict[str, int]:
    """Node types (and counts) Ray's autoscaler adds for these demands, with the head (and `busy_workers`) full.

    ``tasks``: queued tasks/actors; ``requested``: ``ray.autoscaler.sdk.request_resources`` bundles, the way Ray
    Data's autoscaling coordinator asks for CPUs; ``placement_groups``: pending placement groups.
    """
    config = _autoscaling_config(name)
    node_types = config["available_node_types"]
    head_type = config["head_node_type"]
    provider = _RunningNodes(head_type, busy_workers or {})
    scheduler = ResourceDemandScheduler(
        provider, node_types, config["max_workers"], head_type, config.get("upscaling_speed", 1.0)
    )
    static = {ip: dict(node_types[node_type]["resources"]) for ip, (node_type, _) in provider.kinds.items()}
    to_launch, _ = scheduler.get_nodes_to_launch(
        nodes=list(provider.kinds),
        launching_nodes={},
        resource_demands=list(tasks),
        unused_resources_by_ip={ip: {} for ip in provider.kinds},  # every running node is fully used
        pending_placement_groups=list(placement_groups),
        max_resources_by_ip=static,
        ensure_min_cluster_size=list(requested),
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )
    return to_launch


AUTOSCALED = sorted(LAUNCHERS) + KUBERAY


@pytest.mark.parametrize("name", AUTOSCALED)
@pytest.mark.parametrize(
    "demand",
    [
        {"tasks": [RAY_DATA_TASK] * 8},
        {"tasks": [TRIAL_ACTOR]},
        {"placement_groups": [_placement_group([TRIAL_ACTOR])]},
        # request_resources counts the cluster as idle, so ask for more CPUs than any head has.
        {"requested": [RAY_DATA_TASK] * 40},
    ],
    ids=["data-tasks", "trial-actor", "trial-placement-group", "data-request-resources"],
)
def test_cpu_only_demand_starts_cpu_nodes_not_gpu_nodes(name: str, demand: dict[str, Any], offline: None) -> None:
    to_launch = _nodes_to_launch(name, **demand)
    assert set(to_launch) == {CPU_TYPES[name]}, to_launch


@pytest.mark.parametrize("name", AUTOSCALED)
@pytest.mark.parametrize(
    "demand",
    [
        {"tasks": [GPU_WORKER]},
        {"placement_groups": [_placement_group([GPU_WORKER])]},  # a one-worker Train run
    ],
    ids=["gpu-task", "train-placement-group"],
)
def test_gpu_demand_starts_a_gpu_node(name: str, demand: dict[str, Any], offline: None) -> None:
    assert _nodes_to_launch(name, **demand) == {GPU_1X_TYPES[name]: 1}


@pytest.mark.parametrize("name", AUTOSCALED)
def test_a_trial_and_its_data_start_one_gpu_node_and_cpu_nodes(name: str, offline: None) -> None:
    """A one-worker GPU Train run waiting for its node while Ray Data asks for more CPUs than the cluster has: one
    GPU node for the worker, and CPU nodes, not more GPU nodes, for the CPUs."""
    to_launch = _nodes_to_launch(
        name, placement_groups=[_placement_group([GPU_WORKER])], requested=[RAY_DATA_TASK] * 64
    )
    assert to_launch.pop(GPU_1X_TYPES[name]) == 1
    assert set(to_launch) == {CPU_TYPES[name]}, to_launch


@pytest.mark.parametrize("name", AUTOSCALED)
def test_cpu_demand_past_the_cpu_types_maximum_starts_gpu_nodes(name: str, offline: None) -> None:
    """The documented limit: ranking GPU types last is a preference, not a rule. Once the CPU type is at its
    maximum, Ray's autoscaler starts GPU nodes for CPU-only demand (cluster/README.md, "What runs where")."""
    config = _autoscaling_config(name)
    cpu_type = CPU_TYPES[name]
    busy = {f"cpu-{i}": cpu_type for i in range(config["available_node_types"][cpu_type]["max_workers"])}
    to_launch = _nodes_to_launch(name, tasks=[RAY_DATA_TASK] * 8, busy_workers=busy)
    assert cpu_type not in to_launch
    assert to_launch and all(config["available_node_types"][t]["resources"]["GPU"] >= 1 for t in to_launch)


# KubeRay writes some start parameters with shell quotes in $KUBERAY_GEN_RAY_START_CMD, e.g. the resources JSON it
# builds from a group's `resources` or a custom accelerator: `--resources='{"TPU":4}'` (pod.go). printf stands in
# for `ray start` and prints the arguments it would get.
GENERATED_START = """printf '%s\\n' --num-gpus=1 --resources='{"accelerator_type:A100":1}'"""
START_ARGUMENTS = ["--num-gpus=1", '--resources={"accelerator_type:A100":1}']


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_start_command_keeps_quoted_arguments(name: str) -> None:
    cluster = _cluster_spec(_ray_doc(name))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        args = " ".join(_ray_container(group)["args"])
        start = args.rsplit("&&", 1)[-1].strip()  # what runs once the install is done
        environment = {"PATH": os.environ["PATH"], "KUBERAY_GEN_RAY_START_CMD": GENERATED_START}
        ran = subprocess.run(["/bin/bash", "-c", start], env=environment, capture_output=True, text=True, check=True)
        assert ran.stdout.splitlines() == START_ARGUMENTS, start


def test_rayjob_runs_a_sweep_and_cleans_up() -> None:
    spec = _ray_doc("kuberay-rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:5] == ["python", "-m", "mammo_ray.tune", "--space", "adamw"]
    options = dict(zip(argv[5::2], argv[6::2], strict=True))
    assert options["--storage"].startswith(("s3://", "gs://")), "multi-node runs need shared storage"
    assert options["--name"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    # `--space adamw` is looked up in search_spaces/ of the working directory, so ship the sources.
    assert str(runtime_env.get("working_dir", "")).startswith("https://")


# --- What `ray job submit --working-dir .` uploads -------------------------------------------------------

# Files a user's checkout gains by following the README: prepare's manifests and pixel cache, pretrained
# weights, `train --out_dir runs/...`, sweep results, the venv, git's objects, and a data folder of another name.
USER_FILES = [
    "prepared/train.parquet",
    "prepared/cache/0123abcd/shard-00000-x.bin",
    "weights/convnext_small.fb_in22k.safetensors",
    "runs/one/history.csv",
    "results/adamw-run1/optuna.db",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".git/objects/pack/pack-0123.pack",
    "embed-prepared/valid.parquet",
    "embed-prepared/cache/4567cdef/shard-00001-y.bin",
]
# What the driver and the workers need from the upload: the package and the space files.
NEEDED_FILES = ["mammo_ray/tune.py", "mammo_ray/train.py", "search_spaces/adamw.yaml"]


def _job_upload(working_dir: Path) -> list[str]:
    """Names in the package that `ray job submit --working-dir <working_dir>` uploads, built by Ray itself.

    Runs the job client's own upload path (default excludes, .gitignore, .rayignore, the runtime env's
    ``excludes``) and catches the zip at the HTTP PUT, so nothing is sent anywhere.
    """
    client = object.__new__(JobSubmissionClient)  # no dashboard to connect to
    uploads: list[bytes] = []

    def put(method: str, endpoint: str, data: bytes | None = None, **kwargs: Any) -> SimpleNamespace:
        uploads.append(data)
        return SimpleNamespace(status_code=200)

    client._package_exists = lambda package_uri: False
    client._do_request = put
    client._upload_working_dir_if_needed(parse_runtime_env_args(working_dir=str(working_dir)))
    (package,) = uploads
    return zipfile.ZipFile(io.BytesIO(package)).namelist()


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"},  # Ray then reads only .rayignore
        {"RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": ""},  # Ray then adds no .git/.venv of its own
    ],
    ids=["ray-defaults", "gitignore-off", "default-excludes-off"],
)
def test_job_upload_leaves_out_data_and_environments(
    environment: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None
) -> None:
    checkout = tmp_path / "mammo_ray"
    for name in ("mammo_ray", "search_spaces"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (".gitignore", ".rayignore", "pyproject.toml"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, checkout / name)
    for name in USER_FILES:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_bytes(b"\0" * 64)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)

    uploaded = _job_upload(checkout)
    assert sorted(name for name in USER_FILES if name in uploaded) == []
    assert sorted(name for name in NEEDED_FILES if name not in uploaded) == []


# --- Consistency between the files and the README -------------------------------------------------------


def _cluster_files() -> list[Path]:
    return sorted(path for path in CLUSTER.iterdir() if path.suffix == ".yaml")


def test_every_file_installs_the_same_revision() -> None:
    specs = {path.name: set(re.findall(r"mammo_ray @ git\+\S+?(?=\")", path.read_text())) for path in _cluster_files()}
    assert all(len(found) == 1 for found in specs.values()), specs
    assert len(set.union(*specs.values())) == 1, specs


def _lower_bound(package: str) -> str:
    """The ``>=`` bound of one of pyproject.toml's dependencies."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (bound,) = [
        re.match(rf"{package}>=([0-9][0-9.]*)$", d).group(1) for d in dependencies if d.startswith(f"{package}>=")
    ]
    return bound


@pytest.mark.parametrize("path", _cluster_files(), ids=lambda path: path.name)
def test_torch_is_installed_for_the_cuda_of_the_image(path: Path) -> None:
    """Every node installs torch from PyTorch's wheel index for the image's CUDA (cu128: driver >= 570).

    From PyPI pip would take whatever CUDA build PyPI's newest torch has; a build for a newer CUDA than the
    hosts' driver supports leaves torch.cuda.is_available() False on every GPU node. The bounds are pyproject's,
    so the mammo_ray install that follows keeps these wheels (pip upgrades only what is unsatisfied).
    """
    text = path.read_text()
    image_cudas = set(re.findall(r"rayproject/ray(?:-ml)?:[0-9.]+-py311-(cu\d+)", text))
    assert len(image_cudas) == 1, image_cudas
    wheel_indexes = set(re.findall(r"--index-url https://download\.pytorch\.org/whl/(cu\d+)", text))
    assert wheel_indexes == image_cudas
    for package in ("torch", "torchvision"):
        assert f'"{package}>={_lower_bound(package)}"' in text, package


def test_every_placeholder_is_documented() -> None:
    readme = (CLUSTER / "README.md").read_text()
    placeholders = {match for path in _cluster_files() for match in PLACEHOLDER.findall(path.read_text())}
    assert placeholders, "expected REPLACE_ME_* markers for account-specific values"
    assert sorted(p for p in placeholders if p not in readme) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "ray up cluster/aws.yaml",
        "ray dashboard cluster/aws.yaml",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "python -m mammo_ray.tune --space adamw",
        "ray down cluster/aws.yaml",
        "kubectl apply -f cluster/kuberay-raycluster.yaml",
        "kubectl apply -f cluster/kuberay-rayjob.yaml",
        "--dashboard-host 0.0.0.0",
        "cpus_per_worker",
    ],
)
def test_readme_documents(snippet: str) -> None:
    assert snippet in (CLUSTER / "README.md").read_text()
