"""The cluster configs in cluster/: validated without a cloud or a Kubernetes cluster.

- the `ray up` launcher YAML against the JSON schema Ray ships, and through Ray's own
  config preparation (what `ray up` does before it calls the cloud);
- the KubeRay manifests parsed, with the fields KubeRay requires (ray.io/v1 Go types)
  checked, and their content checked against the repository: the job's entrypoint and
  config exist and fit the cluster's GPUs, the Serve config passes Ray Serve's schema and
  cnnray's app arguments, volumes and claims resolve;
- the container recipe: every file it copies exists and survives its .dockerignore;
- cluster/local.sh: syntax and its answers when no head runs (tests/deploy/test_jobs.py starts one).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws-gpu.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


# --- ray up launcher config -----------------------------------------------------------


def test_launcher_config_matches_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(copy.deepcopy(config))  # the schema plus Ray's own cross-field checks
    # What `ray up` does before contacting the provider: merge the provider's defaults,
    # then validate again.
    validate_config(prepare_config(copy.deepcopy(config)))

    # The schema is strict where it matters: a misspelt node-type key is refused.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_4x_a10g"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_launcher_config_is_a_cpu_head_with_multi_gpu_worker_groups():
    config = _load(LAUNCHER)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_groups = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_groups) >= 2, "head plus GPU worker groups"
    for name, group in gpu_groups.items():
        assert group["resources"]["GPU"] >= 4, f"{name}: multi-GPU nodes"
        assert group["min_workers"] <= group["max_workers"]
        assert "--gpus all" in group["docker"]["worker_run_options"]
    assert sum(t.get("max_workers", 0) for t in gpu_groups.values()) <= config["max_workers"]
    # The largest cluster config in jobs/configs fits one node of the biggest group.
    from cnnray.config import TrainConfig

    gpu_jobs = [TrainConfig.from_yaml(p) for p in (REPO / "jobs" / "configs").glob("cifar10_*.yaml")]
    assert max(c.workers for c in gpu_jobs if c.gpu) <= max(g["resources"]["GPU"] for g in gpu_groups.values())


def test_launcher_config_keeps_token_auth_and_loopback_dashboard():
    config = _load(LAUNCHER)
    assert "~/.ray/auth_token" in config["file_mounts"]
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands
        assert "CNNRAY_STORAGE=" in commands  # checkpoints on storage every node reaches
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert config["docker"]["image"].endswith(f"/cnnray:{_project_version()}")


# --- KubeRay manifests ----------------------------------------------------------------


def _pod_spec_errors(where: str, pod: dict) -> list[str]:
    """Containers with names and images, every volume mount backed by a volume."""
    errors = []
    containers = pod.get("containers") or []
    if not containers:
        errors.append(f"{where}: no containers")
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for c in containers:
        for key in ("name", "image"):
            if not c.get(key):
                errors.append(f"{where}: container without {key}")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                errors.append(f"{where}: mount {m['name']!r} has no volume")
        limits, requests = c.get("resources", {}).get("limits", {}), c.get("resources", {}).get("requests", {})
        if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != limits.get("nvidia.com/gpu"):
            errors.append(f"{where}: GPU requests must equal limits")
    return errors


def _ray_cluster_spec_errors(where: str, spec: dict) -> list[str]:
    """The RayClusterSpec fields KubeRay requires (json tags without omitempty in
    ray-operator/apis/ray/v1/raycluster_types.go), plus what cnnray relies on."""
    errors = []
    import ray

    if spec.get("rayVersion") != ray.__version__:
        errors.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
    if (spec.get("authOptions") or {}).get("mode") != "token":
        errors.append(f"{where}: token authentication must be on (authOptions.mode: token)")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return errors + [f"{where}: headGroupSpec is required"]
    if not isinstance(head.get("rayStartParams"), dict):
        errors.append(f"{where}: headGroupSpec.rayStartParams must be a mapping")
    errors += _pod_spec_errors(f"{where}.headGroupSpec", (head.get("template") or {}).get("spec") or {})
    names = set()
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        w = f"{where}.workerGroupSpecs[{i}]"
        for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            if key not in group:
                errors.append(f"{w}: {key} is required")
        if group.get("groupName") in names:
            errors.append(f"{w}: duplicate groupName")
        names.add(group.get("groupName"))
        lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", 0), group.get("replicas", 0)
        if not lo <= n <= hi:
            errors.append(f"{w}: need minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        errors += _pod_spec_errors(w, (group.get("template") or {}).get("spec") or {})
    return errors


def _gpus(spec: dict) -> tuple[int, int]:
    """(GPUs per worker pod, most GPUs over all worker groups at maxReplicas)."""
    per_pod, total = 0, 0
    for group in spec.get("workerGroupSpecs", []):
        pod = group["template"]["spec"]["containers"][0]
        gpus = int(pod["resources"]["limits"].get("nvidia.com/gpu", 0))
        per_pod = max(per_pod, gpus)
        total += gpus * group["maxReplicas"]
    return per_pod, total


def _manifest(name: str, kind: str) -> dict:
    doc = _load(KUBERAY / name)
    assert doc["apiVersion"] == ("ray.io/v1" if kind.startswith("Ray") else "v1")
    assert doc["kind"] == kind
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a DNS label
    return doc


def _claims(spec: dict) -> set[str]:
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec.get("workerGroupSpecs", [])]
    return {v["persistentVolumeClaim"]["claimName"] for p in pods for v in p.get("volumes", []) if "persistentVolumeClaim" in v}


def test_kuberay_raycluster():
    doc = _manifest("raycluster.yaml", "RayCluster")
    assert _ray_cluster_spec_errors("RayCluster", doc["spec"]) == []
    per_pod, _ = _gpus(doc["spec"])
    assert per_pod >= 4, "a worker group of multi-GPU pods"
    assert _claims(doc["spec"]) == {_manifest("pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]}


def test_kuberay_rayjob_runs_the_training_job_on_a_cluster_it_fits():
    from cnnray.config import TrainConfig

    doc = _manifest("rayjob.yaml", "RayJob")
    spec = doc["spec"]
    assert _ray_cluster_spec_errors("RayJob.rayClusterSpec", spec["rayClusterSpec"]) == []
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    # The entrypoint runs the wrapper and a config that the image copies from jobs/.
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["python", "/app/jobs/train.py"], argv
    config = Path(argv[argv.index("--config") + 1])
    assert config.parts[:3] == ("/", "app", "jobs")
    cfg = TrainConfig.from_yaml(REPO / "jobs" / config.relative_to("/app/jobs"))
    assert cfg.gpu
    per_pod, total = _gpus(spec["rayClusterSpec"])
    assert cfg.workers <= total, f"{cfg.workers} GPU workers, the cluster has at most {total} GPUs"
    assert _claims(spec["rayClusterSpec"]) == {_manifest("pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]}


def test_kuberay_rayservice_serves_cnnrays_app():
    from ray.serve.schema import ServeDeploySchema

    doc = _manifest("rayservice.yaml", "RayService")
    spec = doc["spec"]
    assert _ray_cluster_spec_errors("RayService.rayClusterConfig", spec["rayClusterConfig"]) == []
    serve_config = yaml.safe_load(spec["serveConfigV2"])  # a string holding YAML
    schema = ServeDeploySchema.model_validate(serve_config)  # the schema Ray Serve ships
    assert schema.http_options.host == "0.0.0.0"  # reachable through the serve Service
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert module == "cnnray.serve.app" and attr
    try:
        from cnnray.serve.schemas import ServeArgs
    except ModuleNotFoundError:
        pytest.skip("cnnray.serve is not in this version")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    args = ServeArgs.model_validate(app["args"])  # the app builder's own argument schema
    per_pod, total = _gpus(spec["rayClusterConfig"])
    if args.gpu:
        assert per_pod >= 1 and (args.replicas == "auto" or args.replicas <= total)
    assert args.model_store.startswith("/mnt/cnnray/")
    # The fast ingress on every pod (head and workers), its names as Ray 2.60 reads them.
    from cnnray.serve.ingress import FAST_INGRESS_ENV

    cluster = spec["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            # Every setting `cnnray serve` applies locally, so the pods serve as the tests measure.
            assert {k: env.get(k) for k in FAST_INGRESS_ENV} == FAST_INGRESS_ENV
            # pip installs the console script there in cluster/Dockerfile's image.
            assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/usr/local/bin/cnnray-haproxy"
            assert env["CNNRAY_HAPROXY_ADMIN_HOST"] == "127.0.0.1"
    assert 'cnnray-haproxy = "cnnray.serve.haproxy_loopback:main"' in (REPO / "pyproject.toml").read_text()
    assert _claims(spec["rayClusterConfig"]) == {_manifest("pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]}


def test_kuberay_pvc_is_shared_between_pods():
    doc = _manifest("pvc.yaml", "PersistentVolumeClaim")
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert doc["spec"]["resources"]["requests"]["storage"]


def test_every_cluster_config_runs_the_same_image():
    images = {_load(LAUNCHER)["docker"]["image"]}
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        text = (KUBERAY / name).read_text()
        images |= set(re.findall(r"image:\s*(\S+)", text))
    assert images == {f"YOUR-REGISTRY/cnnray:{_project_version()}"}


# --- container recipe -------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    import fnmatch

    ignored = False
    for pattern in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_dockerfile_installs_the_package_with_pinned_dependencies():
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")  # constraints.txt's Python
    copied = []
    for op, args in steps:
        if op == "COPY":
            *sources, _dest = args.split()
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignored(source), f"COPY {source}: excluded by Dockerfile.dockerignore"
    assert {"constraints.txt", "pyproject.toml", "cnnray", "jobs"} <= set(copied)
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "pip install -r constraints.txt" in runs
    assert "pip install --no-deps ." in runs
    # Large local folders never reach the build context.
    for heavy in (".venv", "runs", ".git", "data", "sweeps"):
        assert _dockerignored(heavy), heavy
    # The RayJob's entrypoint path is where the image puts jobs/.
    assert ("WORKDIR", "/app") in steps
    user = [args for op, args in steps if op == "USER"]
    assert user == ["ray"], "runs as the unprivileged uid-1000 user, like Ray's images"


# --- cluster/local.sh without a head ------------------------------------------------------


def _local_sh(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CNNRAY_LOCAL_HOME": str(home)}
    return subprocess.run(["bash", str(CLUSTER / "local.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_local_sh_parses_and_answers_without_a_head(tmp_path):
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local.sh")]).returncode == 0
    bad = _local_sh("restart", home=tmp_path)
    assert bad.returncode == 2 and "usage: cluster/local.sh up|down|status" in bad.stderr
    status = _local_sh("status", home=tmp_path)
    assert status.returncode == 3 and "not running" in status.stdout
    down = _local_sh("down", home=tmp_path)
    assert down.returncode == 0 and "not running" in down.stdout
