"""cluster/: the KubeRay manifests parse, use only fields KubeRay's ray.io/v1 CRDs and Kubernetes define, agree
with the Dockerfile, the pinned dependencies and the project (entrypoint script, profile, GPUs, memory plan), keep
the dashboard private and take the Ray auth token from a Secret."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from qcore.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
AUTH_SECRET, AUTH_KEY = "qadapter-ray-auth", "auth_token"
SHARED_CLAIM, SHARED_PATH = "qadapter-runs", "/mnt/shared"

# Field names of the KubeRay ray.io/v1 types (KubeRay v1.6 API reference) that these manifests may use. A typo
# would otherwise be dropped silently by the API server (or rejected under strict field validation).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId",
    "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC = {
    "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions", "upgradeStrategy",
}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
              "version", "env", "envFrom", "volumeMounts"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
SUBMITTER_CONFIG = {"backoffLimit"}
POD_SPEC = {"containers", "initContainers", "volumes", "nodeSelector", "tolerations", "affinity", "securityContext",
            "serviceAccountName", "imagePullSecrets", "restartPolicy", "priorityClassName", "schedulerName",
            "terminationGracePeriodSeconds", "hostNetwork", "dnsPolicy", "topologySpreadConstraints"}
CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "ports", "resources",
             "volumeMounts", "lifecycle", "securityContext", "livenessProbe", "readinessProbe", "startupProbe",
             "workingDir"}


def _docs():
    out = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _one(kind):
    (doc,) = [d for _, d in _docs() if d["kind"] == kind]
    return doc


def _cluster_specs():
    """(label, RayClusterSpec) for the RayJob's cluster and the interactive RayCluster."""
    return [("rayjob", _one("RayJob")["spec"]["rayClusterSpec"]), ("raycluster", _one("RayCluster")["spec"])]


def _ray_pod_specs():
    for label, spec in _cluster_specs():
        yield f"{label}/head", spec["headGroupSpec"]["template"]["spec"], spec["headGroupSpec"]
        for group in spec["workerGroupSpecs"]:
            yield f"{label}/{group['groupName']}", group["template"]["spec"], group


def _dockerfile_args():
    text = (CLUSTER / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M)), text


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _expected_image_tag():
    args, _ = _dockerfile_args()
    return f"{_pyproject()['version']}-ray{args['RAY_VERSION']}-{args['PYTHON_TAG']}-gpu"


def _entrypoint():
    argv = shlex.split(_one("RayJob")["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[2] == "--config", argv
    return argv[1], argv[3], argv[4:]


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------------ parse, shape
def test_every_manifest_parses_and_names_itself():
    docs = _docs()
    assert {d["kind"] for _, d in docs} >= {"RayJob", "RayCluster", "PersistentVolumeClaim"}
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name
        if doc["kind"] in ("RayJob", "RayCluster"):
            assert doc["apiVersion"] == "ray.io/v1", name


def test_rayjob_has_what_kuberay_requires():
    spec = _one("RayJob")["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["entrypoint"].strip() and spec["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) > 0
    assert int(spec["activeDeadlineSeconds"]) > 0 and int(spec.get("backoffLimit", 0)) >= 0
    assert set(spec.get("submitterConfig", {})) <= SUBMITTER_CONFIG
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


@pytest.mark.parametrize("which", ["rayjob", "raycluster"])
def test_cluster_specs_use_known_fields_and_required_ones(which):
    spec = dict(_cluster_specs())[which]
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    args, _ = _dockerfile_args()
    assert spec["rayVersion"] == args["RAY_VERSION"]
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map[string]string in the CRD
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER
    assert set(spec.get("authOptions", {})) <= AUTH_OPTIONS
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for label, pod, _ in _ray_pod_specs():
        if label.startswith(which):
            assert set(pod) <= POD_SPEC, (label, set(pod) - POD_SPEC)
            assert pod["containers"], label
            for c in pod["containers"]:
                assert set(c) <= CONTAINER, (label, set(c) - CONTAINER)
                assert c["name"] and c["image"]


# ----------------------------------------------------------------------------------- image and dependencies
def test_images_match_the_dockerfile_tag_and_ray_version():
    args, text = _dockerfile_args()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", text, flags=re.M)
    tag = _expected_image_tag()
    images = set()
    for _, doc in _docs():
        images |= set(re.findall(r"image: (\S+)", yaml.safe_dump(doc)))
    assert images and all(img.rsplit(":", 1)[1] == tag for img in images), (images, tag)
    assert len(images) == 1  # one image for head, workers, submitter and the loader pod
    assert f"-t {images.pop()} ." in text  # the build command in the Dockerfile's header


def test_lock_pins_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement

    args, text = _dockerfile_args()
    pins = {}
    for line in (CLUSTER / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    for dep in _pyproject()["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in cluster/requirements.lock"
        assert req.specifier.contains(pins[name]), (dep, pins[name])
    assert pins["ray"] == args["RAY_VERSION"]
    assert "pip install -r /tmp/requirements.lock" in text and "pip install --no-deps -e /app" in text


# --------------------------------------------------------------------------------- entrypoint and runtime env
def test_entrypoint_script_and_profile_exist_and_load():
    script, profile, overrides = _entrypoint()
    assert script == "pipelines/full.py" and (ROOT / script).is_file()
    cfg = load_config(ROOT / profile, overrides)
    storage = cfg.run.storage_path
    assert storage.startswith(("s3://", "gs://")) or storage.startswith(SHARED_PATH + "/"), storage


def test_runtime_env_runs_from_the_image_and_does_not_clash_with_the_driver():
    from pipelines.common import WORKER_ENV

    runtime_env = yaml.safe_load(_one("RayJob")["spec"]["runtimeEnvYAML"])
    _, text = _dockerfile_args()
    assert f"WORKDIR {runtime_env['working_dir']}" in text  # the code baked into the image
    # Ray raises at ray.init when the job's runtime_env and ray.init's set the same variable
    assert not set(runtime_env.get("env_vars", {})) & set(WORKER_ENV)


def test_gpu_workers_match_the_profile_and_its_memory_plan():
    from qcore.planner import assert_fits

    _, profile, overrides = _entrypoint()
    cfg = load_config(ROOT / profile, overrides)
    spec = _one("RayJob")["spec"]["rayClusterSpec"]
    gpus = cpus = 0
    for group in spec["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        gpus += int(c["resources"]["limits"]["nvidia.com/gpu"]) * group["replicas"]
        cpus += int(c["resources"]["limits"]["cpu"]) * group["replicas"]
    assert cfg.train.use_gpu and gpus == cfg.train.num_workers
    assert cfg.train.cpus_per_worker * cfg.train.num_workers < cpus  # spare CPUs for Ray Data / eval
    assert_fits(cfg, gpu_memory_gib=80)  # the nodeSelector asks for 80 GB H100s


# ------------------------------------------------------------------------------------------- pods and resources
def test_resources_requests_equal_limits_and_gpus_only_on_workers():
    for label, pod, group in _ray_pod_specs():
        for c in pod["containers"]:
            res = c["resources"]
            assert res["requests"] == res["limits"], label
            assert {"cpu", "memory"} <= set(res["limits"]), label
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["containers"])
        if label.endswith("/head"):
            assert gpus == 0 and group["rayStartParams"].get("num-gpus") == "0", label
        else:
            assert gpus >= 1, label
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod.get("nodeSelector"), label


def test_every_ray_pod_has_shm_shared_storage_assets_and_offline_env():
    for label, pod, _ in _ray_pod_specs():
        volumes = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory", label
        shared = volumes[mounts[SHARED_PATH]["name"]]
        assert shared["persistentVolumeClaim"]["claimName"] == SHARED_CLAIM, label
        assert mounts["/mnt/assets"].get("readOnly") is True, label
        env = _env(c)
        assert env["HF_HUB_OFFLINE"]["value"] == "1", label
        if not label.endswith("/head"):
            assert {"NCCL_SOCKET_IFNAME", "NCCL_DEBUG"} <= set(env), label
    claims = {d["metadata"]["name"]: d for _, d in _docs() if d["kind"] == "PersistentVolumeClaim"}
    assert "ReadWriteMany" in claims[SHARED_CLAIM]["spec"]["accessModes"]


# ------------------------------------------------------------------------------------------- exposure and auth
def test_dashboard_is_not_exposed_publicly():
    for name, doc in _docs():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), name
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    for label, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", label
        assert not head.get("enableIngress", False), label
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", label
    text = "".join(p.read_text() for p in CLUSTER.glob("*.yaml"))
    assert "LoadBalancer" not in re.sub(r"#.*", "", text) and "NodePort" not in re.sub(r"#.*", "", text)


def test_ray_token_auth_comes_from_a_secret():
    job = _one("RayJob")["spec"]
    # KubeRay wires the Ray pods and authenticates its own job-API calls with the Secret's token
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    submitter = job["submitterPodTemplate"]["spec"]
    assert set(submitter) <= POD_SPEC and submitter["restartPolicy"] == "Never"
    (sub,) = submitter["containers"]
    assert set(sub) <= CONTAINER and "command" not in sub  # KubeRay fills in `ray job submit ...`
    assert sub["resources"]["requests"] == sub["resources"]["limits"]
    spec = _one("RayCluster")["spec"]
    containers = [sub] + [c for label, pod, _ in _ray_pod_specs() if label.startswith("raycluster")
                          for c in pod["containers"]]
    if spec.get("enableInTreeAutoscaling"):
        containers.append(spec["autoscalerOptions"])
    for c in containers:
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": AUTH_KEY}
    # no token, nor any Secret, in the repository
    for name, doc in _docs():
        assert doc["kind"] != "Secret", name
        for e in re.findall(r"RAY_AUTH_TOKEN.{0,80}", yaml.safe_dump(doc), flags=re.S):
            assert "value:" not in e.split("valueFrom")[0], (name, e)


def test_readme_names_only_files_that_exist():
    readme = (CLUSTER / "README.md").read_text()
    for ref in set(re.findall(r"cluster/[\w.-]+", readme)):
        assert (ROOT / ref).exists(), ref
    for word in ("kubectl create secret generic qadapter-ray-auth", "port-forward", "tensorboard", "KubeRay"):
        assert word in readme
