"""The deployment files, validated offline: `ray up` YAMLs against Ray's schema, Serve configs against
Serve's schema and our app builder, KubeRay manifests' pod templates against Kubernetes' schemas, and the
RayService's embedded Serve configs against their sources in cluster/configs."""

from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from cluster import manifests
from cluster.config import REPO_ROOT, AppConfig

K8S = REPO_ROOT / "k8s"
RAY_UP_YAMLS = sorted((REPO_ROOT / "cluster" / "ray-up").glob("*.yaml"))
ON_PREM_YAMLS = ["on-prem.yaml", "on-prem-cpu.yaml"]
AUTH_TOKEN = "~/.ray/auth_token"  # the user's Ray token, mounted on every node of the on-prem clusters
SERVE_CONFIGS = sorted((REPO_ROOT / "cluster" / "configs").glob("*.yaml"))
KUBERNETES_VERSION = "1.30.0"
OVERLAYS = ["gpu", "cpu-demo"]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(overlay: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in docs if doc["kind"] == kind]
    return doc


def rayservice() -> dict[str, Any]:
    return find(load_all(K8S / "base" / "rayservice.yaml"), "RayService")


def demo_patch_serve_config() -> str:
    ops: list[dict[str, Any]] = yaml.safe_load(manifests.DEMO_PATCH.read_text())  # a JSON 6902 patch
    (value,) = [op["value"] for op in ops if op["path"] == "/spec/serveConfigV2"]
    assert isinstance(value, str)
    return value


# --- ray up --------------------------------------------------------------------------------------------


def test_there_are_cloud_and_on_prem_cluster_yamls() -> None:
    assert {path.name for path in RAY_UP_YAMLS} >= {"aws-gpu.yaml", "on-prem.yaml"}


@pytest.mark.parametrize("path", RAY_UP_YAMLS, ids=lambda path: path.name)
def test_cluster_yaml_passes_rays_schema(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    for local_path in config.get("file_mounts", {}).values():  # synced relative to the repository root
        assert local_path == AUTH_TOKEN or (REPO_ROOT / local_path).exists(), local_path
    setup = [*config.get("setup_commands", [])]
    for node_type in config.get("available_node_types", {}).values():
        setup += node_type.get("worker_setup_commands", [])
    assert any("pip install" in command and "~/moespec" in command for command in setup)


def test_cloud_cluster_has_cpu_head_and_autoscaling_gpu_workers() -> None:
    config = yaml.safe_load((REPO_ROOT / "cluster" / "ray-up" / "aws-gpu.yaml").read_text())
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: spec for name, spec in node_types.items() if name != config["head_node_type"]}
    assert workers and all(0 <= spec["min_workers"] <= spec["max_workers"] for spec in workers.values())
    assert sum(spec["min_workers"] for spec in workers.values()) >= 1
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_on_prem_cluster_uses_local_provider_with_addresses() -> None:
    config = yaml.safe_load((REPO_ROOT / "cluster" / "ray-up" / "on-prem.yaml").read_text())
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert "available_node_types" not in config  # the local provider refuses it
    assert any(f'"ray[serve]=={ray.__version__}"' in command for command in config["setup_commands"])


def on_prem(name: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "cluster" / "ray-up" / name).read_text())
    return config


@pytest.mark.parametrize("name", ON_PREM_YAMLS)
def test_on_prem_clusters_share_one_token_and_run_ray_with_token_auth(name: str) -> None:
    """Ray 2.60's `ray start --head` turns token authentication on where ~/.ray/auth_token exists, and the
    Serve CLI sends the token only with RAY_AUTH_MODE=token: every node gets the same token, and both the
    start commands and `ray exec` (login shells that read ~/.bashrc) run with RAY_AUTH_MODE=token."""
    config = on_prem(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == AUTH_TOKEN
    env_line, source_line = config["setup_commands"][1:3]
    assert "RAY_AUTH_MODE=token" in env_line and env_line.endswith("> ~/.moespec-env")
    assert source_line.endswith(">> ~/.bashrc") and "grep -q moespec-env ~/.bashrc ||" in source_line
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:  # quiet where the user may not raise the limit
            assert command.startswith('ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; ray start')


def test_cpu_on_prem_cluster_installs_the_cpu_torch_and_differs_only_there() -> None:
    gpu, cpu = on_prem("on-prem.yaml"), on_prem("on-prem-cpu.yaml")
    torch_install, project_install = cpu["setup_commands"][3:]
    assert '"torch==2.13.0+cpu"' in torch_install  # only a CPU wheel index has it: no silent CUDA build
    constraints = "~/moespec/scripts/constraints-cpu.txt"
    assert f"-c {constraints}" in project_install and constraints in cpu["file_mounts"]
    assert "torch==2.13.0" in (REPO_ROOT / cpu["file_mounts"][constraints]).read_text()
    assert cpu["provider"]["worker_ips"] == []  # the demo runs on one machine
    for key in set(gpu) | set(cpu):  # the rest is on-prem.yaml's, so that fixes reach both
        if key not in ("cluster_name", "provider", "setup_commands", "file_mounts"):
            assert cpu.get(key) == gpu.get(key), key
    assert {**cpu["file_mounts"]} == {**gpu["file_mounts"], constraints: "./scripts/constraints-cpu.txt"}
    assert cpu["setup_commands"][:3] == gpu["setup_commands"][:3]


# --- Serve configs -------------------------------------------------------------------------------------


def all_serve_configs() -> list[Any]:
    configs = [pytest.param(yaml.safe_load(path.read_text()), id=path.name) for path in SERVE_CONFIGS]
    configs.append(pytest.param(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]), id="rayservice"))
    configs.append(pytest.param(yaml.safe_load(demo_patch_serve_config()), id="cpu-demo-overlay"))
    return configs


@pytest.mark.parametrize("config", all_serve_configs())
def test_serve_config_validates_and_builds_the_app(config: dict[str, Any]) -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    was_initialized = ray.is_initialized()
    for app in config["applications"]:
        module_name, _, attribute = app["import_path"].partition(":")
        build = getattr(importlib.import_module(module_name), attribute)
        AppConfig.from_args(app.get("args"))
        assert isinstance(build(app.get("args")), Application)
    assert ray.is_initialized() == was_initialized  # building binds deployments; it starts nothing


def test_gpu_serve_config_uses_gpus_and_expert_parallel_ranks() -> None:
    config = yaml.safe_load((REPO_ROOT / "cluster" / "configs" / "gpu.yaml").read_text())
    app = AppConfig.from_args(config["applications"][0]["args"])
    assert app.model.target.startswith("/models/") and app.model.draft is not None
    assert app.model.dtype == "bfloat16" and app.expert_parallel.num_ranks >= 2
    assert app.engine.backend == "vllm"  # the production path: the draft runs inside each vLLM engine
    assert app.resources.target_num_gpus >= 1 and app.engine.max_spec_tokens >= 1


def test_one_batch_limit_and_derived_settings_computed_once() -> None:
    """model.max_seqs is the one batch limit; the removed engine.max_batch_size is refused, naming the fix.
    The engine, its caches and the router derive from the config in one place (cluster.engine_builder)."""
    from cluster.engine_builder import cache_config, engine_config

    with pytest.raises(ValueError, match="set model.max_seqs"):
        AppConfig.from_args({"engine": {"max_batch_size": 8}})
    with pytest.raises(ValueError, match="draft_proposals must be one of"):
        AppConfig.from_args({"engine": {"draft_proposals": "full"}})
    config = AppConfig.from_args(
        {"model": {"max_seqs": 8, "max_seq_len": 2048}, "engine": {"max_waiting": 5}}
    )
    assert cache_config(config).max_seqs == 8 and cache_config(config).max_seq_len == 2048  # no padding
    assert engine_config(config).max_batch_size == 8
    assert config.max_outstanding == 13 and engine_config(config).max_waiting == config.max_outstanding


def test_replicas_are_serves_num_replicas_or_autoscaling_config_validated() -> None:
    """One app scales by its Router deployment (each replica with its own drafter and target): the options
    reach Serve under their Serve names, and mistakes are refused naming the field."""
    from cluster.app import build_app, resource_demand

    router = build_app({"replicas": {"num_replicas": 2}})._bound_deployment
    assert router.name == "Router" and router.num_replicas == 2
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    router = build_app({"replicas": {"autoscaling_config": auto}})._bound_deployment
    assert router._deployment_config.autoscaling_config.max_replicas == 4
    demand = resource_demand(AppConfig.from_args({"replicas": {"num_replicas": 2}}))
    assert demand["2 x MoETarget host"]["CPU"] == 2.0 and demand["2 x Router"]["CPU"] == 1.0
    for bad, message in [
        ({"num_replicas": 0}, "num_replicas must be >= 1"),
        ({"num_replicas": 2, "autoscaling_config": auto}, "both set; set one"),
        ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling_config is invalid"),
        ({"autoscaling_config": {"max_replica": 2}}, r"unknown fields \['max_replica'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            AppConfig.from_args({"replicas": bad})
    vllm = build_app({"engine": {"backend": "vllm"}, "replicas": {"num_replicas": 2}})._bound_deployment
    assert vllm.name == "VllmServer" and vllm.num_replicas == 2  # one setting for both backends
    vllm = build_app(
        {"engine": {"backend": "vllm"}, "replicas": {"autoscaling_config": auto}}
    )._bound_deployment
    assert vllm._deployment_config.autoscaling_config.max_replicas == 4
    with pytest.raises(ValueError, match="vllm.num_replicas is no longer a setting: .*replicas.num_replicas"):
        AppConfig.from_args({"engine": {"backend": "vllm"}, "vllm": {"num_replicas": 2}})


def gpus_per_app(app: AppConfig) -> float:
    """GPUs one application needs: every vLLM replica's ranks, or the native ranks plus the drafter's."""
    ranks = app.expert_parallel.num_ranks * app.resources.target_num_gpus
    if app.engine.backend == "vllm":
        return ranks * app.replicas.num_starting
    return ranks + app.resources.drafter_num_gpus


def replica_cpus(app: Any) -> float:
    """Logical CPUs of the Serve replicas of an application and of every application bound into it."""
    deployment = app._bound_deployment
    # Serve reserves one CPU per replica unless ray_actor_options says otherwise.
    own = float((deployment.ray_actor_options or {}).get("num_cpus", 1.0)) * (deployment.num_replicas or 1)
    bound = [*deployment.init_args, *deployment.init_kwargs.values()]
    return own + sum(replica_cpus(arg) for arg in bound if hasattr(arg, "_bound_deployment"))


def policy_actor_cpus(monkeypatch: pytest.MonkeyPatch) -> float:
    """The CPUs the central policy actor asks for, read from where it is created."""
    from types import SimpleNamespace

    from cluster import policy_actor

    options: dict[str, Any] = {}

    def remote(**actor_options: Any) -> Any:
        options.update(actor_options)
        return lambda cls: SimpleNamespace(options=lambda **_: SimpleNamespace(remote=lambda *args: None))

    with monkeypatch.context() as patch:
        patch.setattr(policy_actor.ray, "remote", remote)
        policy_actor.policy_actor_handle("name", 1, lambda: None)  # type: ignore[arg-type,return-value]
    return float(options["num_cpus"])


def test_cpu_demo_fits_a_two_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The smallest machine the demo is offered for: over 2 logical CPUs, Serve never places every
    replica and the app goes to DEPLOY_FAILED (seen with 2.2 CPUs)."""
    from cluster.app import build_app

    args = manifests.load_yaml(manifests.DEMO_SERVE_CONFIG)["applications"][0]["args"]
    config = AppConfig.from_args(args)
    assert config.expert_parallel.num_ranks == 1  # else the ranks, not the replica's actor, hold the CPUs
    res = config.resources
    target_host = 0.0 if config.engine.loop == "beside_target" else res.target_num_cpus  # else the replica's
    host_actors = target_host + (res.drafter_num_cpus if config.model.draft else 0.0)
    total = replica_cpus(build_app(args)) + host_actors + policy_actor_cpus(monkeypatch)
    assert total <= 2.0, f"the CPU demo asks for {total:.2f} CPUs"


# --- Kubernetes ----------------------------------------------------------------------------------------


def kuberay_resources() -> list[Any]:
    return [
        pytest.param(rayservice(), id="base-rayservice"),
        pytest.param(find(load_all(K8S / "dev" / "raycluster.yaml"), "RayCluster"), id="dev-raycluster"),
    ]


def cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = resource["spec"]
    return spec["rayClusterConfig"] if resource["kind"] == "RayService" else spec


def pod_templates(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(resource)
    return [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]


def check_kuberay_structure(resource: dict[str, Any]) -> None:
    """The fields KubeRay's CRDs require, and what our manifests promise on top."""
    assert resource["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", resource["metadata"]["name"])
    if resource["kind"] == "RayService":
        assert isinstance(resource["spec"]["serveConfigV2"], str)
    spec = cluster_spec(resource)
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    assert len(groups) >= 2
    for group in groups:
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for template in pod_templates(resource):
        ray_container = template["spec"]["containers"][0]  # KubeRay: the Ray container comes first
        assert ray_container["image"].startswith("moespec:")
        resources = ray_container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys()
        assert resources["requests"] == resources["limits"]
        assert "readinessProbe" in ray_container and "livenessProbe" in ray_container


def validate_pod_template(template: dict[str, Any]) -> None:
    import kubernetes_validate

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "template", **template.get("metadata", {})},
        "spec": template["spec"],
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("resource", kuberay_resources())
def test_kuberay_resource_structure_and_pod_templates(resource: dict[str, Any]) -> None:
    check_kuberay_structure(resource)
    for template in pod_templates(resource):
        validate_pod_template(template)


def test_gpu_workers_hold_one_replica_set_of_the_gpu_serve_config() -> None:
    worker = rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    resources = worker["template"]["spec"]["containers"][0]["resources"]
    num_gpus = int(resources["limits"]["nvidia.com/gpu"])
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    app = AppConfig.from_args(
        yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]
    )
    assert gpus_per_app(app) <= num_gpus


def test_built_in_kinds_pass_kubernetes_schemas() -> None:
    import kubernetes_validate

    paths = [K8S / "overlays" / "gpu" / "models-pvc.yaml", K8S / "overlays" / "gpu" / "fetch-models-job.yaml"]
    for path in paths:
        for doc in load_all(path):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_overlay_builds_valid_manifests(overlay: str) -> None:
    import kubernetes_validate

    docs = kustomize(overlay)
    service = find(docs, "RayService")
    check_kuberay_structure(service)
    for template in pod_templates(service):
        validate_pod_template(template)
        assert template["spec"]["containers"][0]["image"] == f"moespec:{overlay.split('-')[0]}"
    for doc in docs:
        if not doc["apiVersion"].startswith("ray.io/"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    worker_limits = pod_templates(service)[1]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in worker_limits) == (overlay == "gpu")
    source = manifests.GPU_SERVE_CONFIG if overlay == "gpu" else manifests.DEMO_SERVE_CONFIG
    expected = manifests.for_kubernetes(manifests.load_yaml(source))
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == expected


def test_dockerfile_and_images_use_the_ray_version_of_the_manifests() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "pip install" in dockerfile and "COPY" in dockerfile


# --- The RayService's Serve configs are the ones in cluster/configs --------------------------------------


def test_generated_manifests_are_up_to_date() -> None:
    assert manifests.stale_files() == [], "run `python -m cluster.manifests`"


def test_rayservice_serve_config_equals_the_gpu_serve_config() -> None:
    source = manifests.load_yaml(manifests.GPU_SERVE_CONFIG)
    assert manifests.for_kubernetes(source) == source  # already Kubernetes-ready: no change at all
    assert yaml.safe_load(rayservice()["spec"]["serveConfigV2"]) == source


def test_cpu_demo_serve_config_differs_from_its_source_only_in_networking() -> None:
    source = manifests.load_yaml(manifests.DEMO_SERVE_CONFIG)
    embedded = yaml.safe_load(demo_patch_serve_config())
    assert embedded["applications"] == source["applications"]
    assert embedded["http_options"] == {**source["http_options"], "host": "0.0.0.0"}
    assert embedded["proxy_location"] == "EveryNode"


def test_a_divergent_serve_config_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changed = manifests.load_yaml(manifests.GPU_SERVE_CONFIG)
    changed["applications"][0]["args"]["model"]["target"] = "/models/another-moe"
    edited = tmp_path / "gpu.yaml"
    edited.write_text(yaml.safe_dump(changed))
    monkeypatch.setattr(manifests, "GPU_SERVE_CONFIG", edited)
    assert manifests.stale_files() == [manifests.RAYSERVICE]
    assert "/models/another-moe" in manifests.rendered()[manifests.RAYSERVICE]
