"""Offline validation of the KubeRay manifests under k8s/ and of the Dockerfile their image comes from.

Every YAML document of every file under k8s/ is checked the way a cluster would check it, without one:

- ray.io/v1 kinds against KubeRay v1.7's CRD schemas (`../shared/kuberay/crds/`, skipped with a reason
  where absent), as the API server applies them: `default:` values filled in first, then the
  defaulted object validated; unknown fields rejected (the server silently prunes them from a
  structural schema, so a typo such as `rayStartParam` would vanish without a word);
  `x-kubernetes-int-or-string`; int32/int64 bounds; list-map keys unique. Then the rules KubeRay
  checks in Go when it reconciles (ray-operator/controllers/ray/utils/validation.go), which no
  schema expresses. CEL rules (`x-kubernetes-validations`) are not evaluated: the only ones on
  fields a user sets concern `managedBy` and `deletionStrategy`, which no manifest here uses.
- other kinds (the Secrets) with kubernetes_validate, strict, at KUBERNETES_VERSION.
- what the manifests embed: `serveConfigV2` (Ray's ServeDeploySchema, unknown keys included, and
  our ServeConfig for AlloyLM's `args`), `runtimeEnvYAML` (Ray's RuntimeEnv), and the RayJob's
  entrypoint (the script exists, and `alloylm validate` accepts its config with its overrides).
- what they promise each other: every Secret and key they read is in secrets.example.yaml, the
  RayService serves the stages the RayJob writes, Ray versions agree with the installed Ray and
  the Dockerfile's base image, and the Dockerfile installs the repository.
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import posixpath
import re
import shlex
import typing
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from pydantic import BaseModel

import alloylm
from alloylm.cluster import IDLE_WORKERS_VARIABLE
from alloylm.config import ConfigError, load_config
from alloylm.serve.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
DOCKERFILE = REPO / "Dockerfile"
# KubeRay's CRDs are shared data next to the repository, not vendored into it (3 MB).
CRD_DIR = Path(os.environ.get("ALLOYLM_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay" / "crds"))
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# KubeRay 1.7 (2026-08) supports the Kubernetes releases of its time; 1.34 is one of them.
KUBERNETES_VERSION = "1.34"
# KubeRay derives Service and Pod names from these, hence limits below DNS-1035's 63.
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")
AUTH_TOKEN_MIN_RAY = (2, 52, 0)
AUTH_TOKEN_SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
S3_SECRET = "alloylm-s3"
SERVE_IMPORT_PATH = "alloylm.serve.app:build_app"
# Values in secrets.example.yaml that are settings, not secrets; every other must be a placeholder.
NOT_SECRET_KEYS = {"AWS_DEFAULT_REGION"}
PLACEHOLDER = "REPLACE-ME"

_INT_FORMAT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


# ------------------------------------------------------------------------------------------
# The manifests
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Document:
    """One YAML document of a file under k8s/."""

    file: str
    index: int
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind"))

    @property
    def label(self) -> str:
        name = (self.obj.get("metadata") or {}).get("name")
        return f"{self.file}#{self.index}:{self.kind}/{name}"


def _load_documents() -> list[_Document]:
    documents = []
    for path in sorted(K8S.rglob("*.y*ml")):
        for index, obj in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if obj is not None:
                documents.append(_Document(path.relative_to(REPO).as_posix(), index, obj))
    return documents


DOCUMENTS = _load_documents()
RAY_DOCUMENTS = [d for d in DOCUMENTS if str(d.obj.get("apiVersion", "")).startswith("ray.io/")]
CORE_DOCUMENTS = [d for d in DOCUMENTS if d not in RAY_DOCUMENTS]
SERVICES = [d for d in RAY_DOCUMENTS if d.kind == "RayService"]
JOBS = [d for d in RAY_DOCUMENTS if d.kind == "RayJob"]


def _ids(documents: list[_Document]) -> list[str]:
    return [d.label for d in documents]


def _document(file: str, kind: str) -> dict[str, Any]:
    """A deep copy of the first `kind` document of `file`, for tests that break it on purpose."""
    return copy.deepcopy(next(d.obj for d in DOCUMENTS if d.file == f"k8s/{file}" and d.kind == kind))


def _dotted(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _cluster_specs(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The RayCluster specs in a ray.io object, with their dotted paths."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "RayCluster":
        return [("spec", spec)]
    if obj["kind"] == "RayJob" and spec.get("rayClusterSpec"):
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if obj["kind"] == "RayService" and spec.get("rayClusterConfig"):
        return [("spec.rayClusterConfig", spec["rayClusterConfig"])]
    return []


def _groups(cluster: dict[str, Any], at: str) -> list[tuple[str, dict[str, Any]]]:
    """The head and worker groups of a cluster spec, with their dotted paths."""
    groups = [(f"{at}.headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"{at}.workerGroupSpecs[{i}]", g or {}) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    return groups


def _pod_spec(group: dict[str, Any]) -> dict[str, Any]:
    return ((group.get("template") or {}).get("spec")) or {}


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in the first container of each group's pod (RayContainerIndex = 0)."""
    containers = _pod_spec(group).get("containers") or [{}]
    return containers[0]


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# ------------------------------------------------------------------------------------------
# CRD schemas: defaults, then a JSON Schema that refuses what the API server would drop or refuse
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict[str, Any]:
    """The `ray.io/v1` openAPIV3Schema of `kind` from KubeRay's CRD."""
    with open(CRD_DIR / CRD_FILES[kind], encoding="utf-8") as handle:
        crd = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """One node of a Kubernetes structural schema as JSON Schema (draft 2020-12), strict.

    - an object's fields are exactly its `properties` (or the `additionalProperties` map), unless
      `x-kubernetes-preserve-unknown-fields`: the API server prunes anything else, silently;
    - an object schema with neither keeps nothing, so any field in it is unknown;
    - `x-kubernetes-int-or-string` takes an integer or a string (patterns apply to the string);
    - `format: int32/int64` bound the integer; `nullable: true` allows null (nothing else does);
    - `x-kubernetes-list-type: set` items are unique (list-map keys are checked by _list_map_problems).
    """
    passed_through = ("type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "required")
    schema: dict[str, Any] = {key: node[key] for key in passed_through if key in node}
    if node.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "anyOf" in node:
        schema["anyOf"] = [_to_json_schema(option) for option in node["anyOf"]]
    if "properties" in node:
        schema["properties"] = {name: _to_json_schema(sub) for name, sub in node["properties"].items()}
    if node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        extra = node.get("additionalProperties", False)
        schema["additionalProperties"] = _to_json_schema(extra) if isinstance(extra, dict) else bool(extra)
    if isinstance(node.get("items"), dict):
        schema["items"] = _to_json_schema(node["items"])
    if node.get("type") == "integer" and node.get("format") in _INT_FORMAT_BOUNDS:
        low, high = _INT_FORMAT_BOUNDS[node["format"]]
        schema["minimum"] = max(node.get("minimum", low), low)
        schema["maximum"] = min(node.get("maximum", high), high)
    if node.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if node.get("x-kubernetes-list-type") == "set":
        schema["uniqueItems"] = True
    return schema


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.protocols.Validator:
    schema = _to_json_schema(_crd_schema(kind))
    # The top-level metadata is an ObjectMeta the API server checks itself (`type: object` in the
    # CRD); _metadata_problems checks it against Kubernetes' own ObjectMeta schema instead.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def _apply_defaults(value: Any, node: dict[str, Any]) -> None:
    """Fill in `default:` values in place, as the API server does: for every field missing from
    an object that is present, recursively, including inside the defaults themselves."""
    if isinstance(value, dict):
        properties = node.get("properties") or {}
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        extra = node.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                _apply_defaults(item, properties[name])
            elif isinstance(extra, dict):
                _apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _apply_defaults(item, node["items"])


def _list_map_problems(value: Any, node: dict[str, Any], path: str) -> list[str]:
    """Items of an `x-kubernetes-list-type: map` list must differ in their list-map keys."""
    problems = []
    if isinstance(value, dict):
        properties = node.get("properties") or {}
        for name, item in value.items():
            if name in properties:
                problems += _list_map_problems(item, properties[name], f"{path}.{name}" if path else name)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        if node.get("x-kubernetes-list-type") == "map":
            keys = node.get("x-kubernetes-list-map-keys") or []
            seen: set[tuple[Any, ...]] = set()
            for index, item in enumerate(value):
                identity = tuple((item or {}).get(key) for key in keys)
                if identity in seen:
                    problems.append(f"{path}[{index}]: duplicate entry for {dict(zip(keys, identity))} (keys: {', '.join(keys)})")
                seen.add(identity)
        for index, item in enumerate(value):
            problems += _list_map_problems(item, node["items"], f"{path}[{index}]")
    return problems


def _with_defaults(obj: dict[str, Any]) -> dict[str, Any]:
    defaulted = copy.deepcopy(obj)
    _apply_defaults(defaulted, _crd_schema(obj["kind"]))
    return defaulted


def _schema_problems(obj: dict[str, Any]) -> list[str]:
    """What the API server would refuse (or silently drop) in a ray.io/v1 object, one line each."""
    kind = obj.get("kind")
    if obj.get("apiVersion") != "ray.io/v1" or kind not in CRD_FILES:
        return [f"apiVersion/kind: {obj.get('apiVersion')}/{kind} is not one of ray.io/v1 {', '.join(CRD_FILES)}"]
    defaulted = _with_defaults(obj)
    problems = []
    for error in _validator(kind).iter_errors(defaulted):
        path = _dotted(error.absolute_path)
        if error.validator == "additionalProperties" and error.validator_value is False:
            known = set(error.schema.get("properties") or {})
            for name in sorted(set(error.instance) - known):
                where = f"{path}.{name}" if path else name
                problems.append(f"{where}: unknown field (known here: {', '.join(sorted(known)) or 'none'})")
        else:
            problems.append(f"{path or '(top level)'}: {error.message}")
    problems += _list_map_problems(defaulted, _crd_schema(kind), "")
    problems += _metadata_problems(obj)
    return sorted(problems)


def _core_problems(obj: dict[str, Any]) -> list[str]:
    """kubernetes_validate's verdict on a core object, strict (unknown fields are errors)."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{_dotted(err.absolute_path) or '(top level)'}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"apiVersion/kind: no Kubernetes {KUBERNETES_VERSION} schema ({err})"]
    name = (obj.get("metadata") or {}).get("name", "")
    if not DNS_1123_SUBDOMAIN.match(name):
        return [f"metadata.name: {name!r} is not a DNS-1123 subdomain"]
    return []


def _metadata_problems(obj: dict[str, Any]) -> list[str]:
    # Kubernetes' ObjectMeta schema, applied by validating a ConfigMap that carries this metadata.
    return _core_problems({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata") or {}})


# ------------------------------------------------------------------------------------------
# KubeRay's rules in Go (validation.go), which the schemas do not express
# ------------------------------------------------------------------------------------------


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for env in container.get("env") or []:
        if env.get("name") == name:
            return env.get("value", "")
    return None


def _cluster_problems(cluster: dict[str, Any], at: str) -> list[str]:
    problems = []
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    autoscaler_version = (cluster.get("autoscalerOptions") or {}).get("version")
    head = cluster.get("headGroupSpec") or {}
    head_v2_env = _env_value(_ray_container(head), "RAY_enable_autoscaler_v2")
    autoscaler_v2 = autoscaling and (autoscaler_version == "v2" or head_v2_env in ("1", "true"))
    if not autoscaling and head_v2_env in ("1", "true"):
        problems.append(f"{at}.headGroupSpec: RAY_enable_autoscaler_v2={head_v2_env} needs enableInTreeAutoscaling: true")
    if autoscaling and autoscaler_version and head_v2_env is not None:
        problems.append(f"{at}.autoscalerOptions.version: set both it and the head's RAY_enable_autoscaler_v2; use only the former")

    names: set[str] = set()
    for path, group in _groups(cluster, at):
        if not _pod_spec(group).get("containers"):
            problems.append(f"{path}.template.spec.containers: a group needs at least one container")
        params = group.get("rayStartParams") or {}
        in_params = [key for key in RAY_START_RESOURCES if params.get(key)]
        if in_params and group.get("resources"):
            problems.append(
                f"{path}: resources set both in rayStartParams ({', '.join(in_params)}) and in resources; "
                "KubeRay allows only one of them"
            )
        if "labels" in params:
            problems.append(f"{path}.rayStartParams.labels: not supported; use the group's labels field")
        restart = _pod_spec(group).get("restartPolicy")
        if autoscaler_v2 and restart not in (None, "", "Never"):
            problems.append(f"{path}.template.spec.restartPolicy: must be Never or unset with autoscaler v2 (got {restart})")
        if path.endswith("headGroupSpec"):
            continue
        name = group.get("groupName")
        if name in names:
            problems.append(f"{path}.groupName: {name!r} is used by another worker group")
        names.add(name)
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            problems.append(f"{path}: minReplicas and maxReplicas are both needed when autoscaling is off")
        for key, value in (("minReplicas", low), ("maxReplicas", high)):
            if value is not None and value < 0:
                problems.append(f"{path}.{key}: must not be negative (got {value})")
        if low is not None and high is not None and low > high:
            problems.append(f"{path}: minReplicas ({low}) is greater than maxReplicas ({high})")
        idle = group.get("idleTimeoutSeconds")
        if idle is not None and (idle < 0 or not autoscaler_v2):
            problems.append(f"{path}.idleTimeoutSeconds: needs autoscaler v2 and a non-negative value (got {idle})")

    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = cluster.get("rayVersion")
        if not version or _version_tuple(version) < AUTH_TOKEN_MIN_RAY:
            problems.append(f"{at}.rayVersion: authOptions.mode token needs Ray 2.52.0 or newer (got {version!r})")
        if auth.get("enableK8sTokenAuth") and auth.get("secretName"):
            problems.append(f"{at}.authOptions: enableK8sTokenAuth and secretName exclude each other")
    elif auth.get("enableK8sTokenAuth"):
        problems.append(f"{at}.authOptions.enableK8sTokenAuth: needs authOptions.mode token")
    idle = (cluster.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        problems.append(f"{at}.autoscalerOptions.idleTimeoutSeconds: must not be negative (got {idle})")
    return problems


def _yaml_text_problem(text: str | None, where: str) -> str | None:
    if not text:
        return None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        return f"{where}: not valid YAML ({getattr(err, 'problem', err)})"
    return None


def _rayjob_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if spec.get("suspend") and not shutdown:
        problems.append("spec.suspend: a RayJob can be suspended only with shutdownAfterJobFinishes: true")
    if spec.get("suspend") and selector:
        problems.append("spec.suspend: not supported with clusterSelector")
    if ttl < 0:
        problems.append(f"spec.ttlSecondsAfterFinished: must not be negative (got {ttl})")
    if ttl > 0 and not shutdown:
        problems.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
    if not spec.get("rayClusterSpec") and not selector:
        problems.append("spec: a RayJob needs spec.rayClusterSpec (a cluster to create) or spec.clusterSelector (one to use)")
    if selector:
        if not selector.get("ray.io/cluster"):
            problems.append("spec.clusterSelector: needs the ray.io/cluster key naming the cluster")
        if mode == "SidecarMode":
            problems.append("spec.clusterSelector: not supported in SidecarMode")
        if backoff and backoff > 0:
            problems.append("spec.backoffLimit: must be 0 with clusterSelector")
    if mode == "InteractiveMode" and backoff and backoff > 0:
        problems.append("spec.backoffLimit: must be 0 in InteractiveMode")
    if mode == "SidecarMode":
        for key in ("submitterPodTemplate", "submitterConfig"):
            if spec.get(key):
                problems.append(f"spec.{key}: not supported in SidecarMode")
    if backoff is not None and backoff < 0:
        problems.append(f"spec.backoffLimit: must not be negative (got {backoff})")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(key) is not None and spec[key] <= 0:
            problems.append(f"spec.{key}: must be positive (got {spec[key]})")
    cluster = spec.get("rayClusterSpec")
    if cluster:
        if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
            problems.append("spec.rayClusterSpec.authOptions.enableK8sTokenAuth: not supported for a RayJob")
        problems += _cluster_problems(cluster, "spec.rayClusterSpec")
    problem = _yaml_text_problem(spec.get("runtimeEnvYAML"), "spec.runtimeEnvYAML")
    return problems + ([problem] if problem else [])


def _rayservice_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    cluster = spec.get("rayClusterConfig") or {}
    if (cluster.get("authOptions") or {}).get("enableK8sTokenAuth"):
        problems.append("spec.rayClusterConfig.authOptions.enableK8sTokenAuth: not supported for a RayService")
    problems += _cluster_problems(cluster, "spec.rayClusterConfig")
    head_service = (cluster.get("headGroupSpec") or {}).get("headService") or {}
    if (head_service.get("metadata") or {}).get("name"):
        problems.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set in a RayService")
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
        problems.append(f"spec.upgradeStrategy.type: {upgrade!r} is not NewClusterWithIncrementalUpgrade, NewCluster or None")
    delay = spec.get("rayClusterDeletionDelaySeconds")
    if delay is not None and delay < 0:
        problems.append(f"spec.rayClusterDeletionDelaySeconds: must not be negative (got {delay})")
    problem = _yaml_text_problem(spec.get("serveConfigV2"), "spec.serveConfigV2")
    return problems + ([problem] if problem else [])


def _kuberay_problems(obj: dict[str, Any]) -> list[str]:
    """KubeRay's own checks of a (defaulted) ray.io/v1 object, one line each."""
    kind = obj["kind"]
    name = str((obj.get("metadata") or {}).get("name", ""))
    problems = []
    if len(name) > NAME_LIMITS[kind]:
        problems.append(f"metadata.name: {name!r} has {len(name)} characters; KubeRay allows at most {NAME_LIMITS[kind]} for a {kind}")
    if not DNS_1035_LABEL.match(name):
        problems.append(
            f"metadata.name: {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter and ending with a letter or digit)"
        )
    spec = obj.get("spec") or {}
    if kind == "RayCluster":
        problems += _cluster_problems(spec, "spec")
    elif kind == "RayJob":
        problems += _rayjob_problems(spec)
    else:
        problems += _rayservice_problems(spec)
    return problems


# ------------------------------------------------------------------------------------------
# AlloyLM's own conventions for its clusters
# ------------------------------------------------------------------------------------------


def _resource(container: dict[str, Any], name: str) -> float:
    """A container's limit (else request) of a resource, as a number (CPUs, GPUs)."""
    resources = container.get("resources") or {}
    raw = (resources.get("limits") or {}).get(name, (resources.get("requests") or {}).get(name, 0))
    text = str(raw)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _convention_problems(obj: dict[str, Any]) -> list[str]:
    problems = []
    for at, cluster in _cluster_specs(obj):
        if cluster.get("rayVersion") != ray.__version__:
            problems.append(f"{at}.rayVersion: {cluster.get('rayVersion')!r} is not the installed Ray {ray.__version__}")
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{at}.authOptions.mode: must be token; without it anyone who reaches the dashboard runs code on the cluster")
        head_params = (cluster.get("headGroupSpec") or {}).get("rayStartParams") or {}
        if head_params.get("num-cpus") != "0":
            problems.append(f"{at}.headGroupSpec.rayStartParams.num-cpus: must be \"0\", so that no task or actor lands on the head")
        images = set()
        for path, group in _groups(cluster, at):
            container = _ray_container(group)
            image = str(container.get("image", ""))
            images.add(image)
            repository, _, tag = image.rpartition(":")
            if repository.rsplit("/", 1)[-1] != "alloylm" or not tag.startswith(alloylm.__version__):
                problems.append(f"{path}: image {image!r} is not alloylm:{alloylm.__version__}[-variant] (built from the Dockerfile)")
            volumes = {v.get("name"): v for v in _pod_spec(group).get("volumes") or []}
            shm = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
            if not shm or (volumes.get(shm[0].get("name"), {}).get("emptyDir") or {}).get("medium") != "Memory":
                problems.append(f"{path}: mount an emptyDir with medium Memory at /dev/shm (Ray's object store, NCCL)")
            else:
                store = _object_store_outside_shm(group, container, volumes[shm[0]["name"]]["emptyDir"])
                if store:
                    problems.append(f"{path}: {store}")
            if S3_SECRET not in [(s.get("secretRef") or {}).get("name") for s in container.get("envFrom") or []]:
                problems.append(f"{path}: envFrom secretRef {S3_SECRET} (S3 credentials) is missing")
            if not path.endswith("headGroupSpec"):  # the head runs no tasks (num-cpus 0)
                cpus = int(_resource(container, "cpu"))
                kept = {e.get("name"): e.get("value") for e in container.get("env") or []}.get(IDLE_WORKERS_VARIABLE)
                if kept != str(cpus):
                    problems.append(f"{path}: env {IDLE_WORKERS_VARIABLE} must be \"{cpus}\", the container's CPUs (got {kept!r}): "
                                    "Ray's default keeps idle workers only for the CPUs no actor holds (alloylm.cluster.keep_idle_workers)")
            resources = container.get("resources") or {}
            requested = (resources.get("requests") or {}).get("nvidia.com/gpu")
            limited = (resources.get("limits") or {}).get("nvidia.com/gpu")
            if requested is not None and str(requested) != str(limited):
                problems.append(f"{path}: nvidia.com/gpu must be set in limits, equal to requests (extended resources are not overcommitted)")
        if len(images) > 1:
            problems.append(f"{at}: every group must run the same image (one Ray, one Python), got {sorted(images)}")
    return problems


# ------------------------------------------------------------------------------------------
# What the manifests embed: serveConfigV2, runtimeEnvYAML, the RayJob's entrypoint
# ------------------------------------------------------------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _unknown_keys(model: type[BaseModel], data: Any, path: str) -> list[str]:
    """Keys a pydantic model would ignore: Ray's Serve schemas ignore unknown keys, so a typo
    (`http_option:`) would silently keep the default."""
    if not isinstance(data, dict):
        return []
    fields = {(field.alias or name): field for name, field in model.model_fields.items()}
    problems = []
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{path}.{key}: unknown key (known here: {', '.join(sorted(fields))})")
            continue
        models = _models_in(fields[key].annotation)
        if len(models) != 1:
            continue
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            where = f"{path}.{key}[{index}]" if isinstance(value, list) else f"{path}.{key}"
            problems += _unknown_keys(models[0], item, where)
    return problems


def _import(import_path: str) -> Any:
    module, _, attribute = import_path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _serve_config_problems(text: str, where: str = "spec.serveConfigV2") -> tuple[list[str], list[ServeConfig]]:
    """Ray's and AlloyLM's verdicts on a serveConfigV2, and the ServeConfig of each AlloyLM app."""
    from ray.serve.schema import ServeDeploySchema

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"{where}: not valid YAML ({getattr(err, 'problem', err)})"], []
    try:
        ServeDeploySchema.model_validate(data)
    except ValueError as err:
        return [f"{where}: Ray's ServeDeploySchema refuses it: {err}"], []
    problems = _unknown_keys(ServeDeploySchema, data, where)
    configs = []
    for index, app in enumerate(data.get("applications") or []):
        at = f"{where}.applications[{index}]"
        try:
            target = _import(app["import_path"])
        except (ImportError, AttributeError, ValueError) as err:
            problems.append(f"{at}.import_path: {app['import_path']!r} cannot be imported ({err})")
            continue
        if not callable(target):
            problems.append(f"{at}.import_path: {app['import_path']!r} is not callable")
        if app["import_path"] != SERVE_IMPORT_PATH:
            continue
        try:
            config = ServeConfig.model_validate(app.get("args") or {})
        except ValueError as err:
            problems.append(f"{at}.args: not a valid ServeConfig: {err}")
            continue
        configs.append(config)
        missing = config.missing_sources()
        if missing:
            problems.append(f"{at}.args.sources: no model folder for {', '.join(missing)} (a RayService has no run to take it from)")
        for variant, source in config.sources.items():
            if source.startswith("s3://") and not re.fullmatch(rf"s3://[^/]+(/[^/]+)*/stages/{re.escape(variant)}", source):
                problems.append(f"{at}.args.sources.{variant}: {source!r} is not s3://<bucket>/<experiment>/stages/{variant}")
    return problems, configs


def _secret_mounts(group: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    """Mount path -> (Secret name, file names it provides) for the Ray container of a group."""
    volumes = {v.get("name"): v.get("secret") for v in _pod_spec(group).get("volumes") or [] if v.get("secret")}
    mounts = {}
    for mount in _ray_container(group).get("volumeMounts") or []:
        secret = volumes.get(mount.get("name"))
        if secret:
            files = {item.get("path") for item in secret.get("items") or []} or {"*"}
            mounts[mount["mountPath"].rstrip("/")] = (secret.get("secretName"), files)
    return mounts


def _serving_fit_problems(obj: dict[str, Any], configs: list[ServeConfig]) -> list[str]:
    """Each AlloyLM app of a RayService fits its cluster: keys mounted, replicas placeable, port served."""
    cluster = obj["spec"].get("rayClusterConfig") or {}
    groups = _groups(cluster, "spec.rayClusterConfig")
    workers = [group for path, group in groups if "workerGroupSpecs" in path]
    problems = []
    for config in configs:
        if config.api_keys_file:
            folder, file = posixpath.split(config.api_keys_file)
            for path, group in groups:
                _, files = _secret_mounts(group).get(folder, (None, set()))
                if file not in files and "*" not in files:
                    problems.append(f"{path}: no Secret mounted at {folder} with {file} (api_keys_file {config.api_keys_file})")
        fits = [
            group
            for group in workers
            if _resource(_ray_container(group), "cpu") >= config.deployment.num_cpus
            and _resource(_ray_container(group), "nvidia.com/gpu") >= config.deployment.num_gpus
        ]
        if not fits:
            problems.append(
                f"spec.rayClusterConfig.workerGroupSpecs: no group fits one replica "
                f"({config.deployment.num_cpus} CPUs, {config.deployment.num_gpus} GPUs)"
            )
    serve_config = yaml.safe_load(obj["spec"].get("serveConfigV2") or "{}") or {}
    port = (serve_config.get("http_options") or {}).get("port", 8000)
    head_ports = {p.get("name"): p.get("containerPort") for p in _ray_container(cluster.get("headGroupSpec") or {}).get("ports") or []}
    if head_ports.get("serve") != port:
        problems.append(f"spec.rayClusterConfig.headGroupSpec: the Ray container needs a port named serve = {port} (KubeRay's serve Service targets it)")
    return problems


def _runtime_env_problems(text: str | None, workdir: str) -> list[str]:
    """Ray's verdict on a RayJob's runtimeEnvYAML; its working_dir must be the image's repository."""
    from ray.runtime_env import RuntimeEnv

    if not text:
        return ["spec.runtimeEnvYAML: missing; working_dir must point at the repository in the image"]
    env = yaml.safe_load(text)
    if not isinstance(env, dict):
        return ["spec.runtimeEnvYAML: must be a mapping"]
    problems = [
        f"spec.runtimeEnvYAML.{key}: not a runtime_env field (known: {', '.join(sorted(RuntimeEnv.known_fields))})"
        for key in env
        if key not in RuntimeEnv.known_fields
    ]
    if env.get("working_dir") != workdir:
        problems.append(f"spec.runtimeEnvYAML.working_dir: {env.get('working_dir')!r} is not the image's repository {workdir!r}")
    # The image's repository is this checkout, so Ray can check the working_dir that exists here.
    try:
        RuntimeEnv(**{**env, "working_dir": str(REPO)})
    except (TypeError, ValueError) as err:
        problems.append(f"spec.runtimeEnvYAML: Ray's RuntimeEnv refuses it: {err}")
    return problems


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: Any) -> float:
    """A Kubernetes memory quantity (`8Gi`, `500M`, a plain number) in bytes."""
    match = _QUANTITY.match(str(quantity))
    assert match, f"not a memory quantity: {quantity!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


def _object_store_outside_shm(group: dict[str, Any], container: dict[str, Any], shm: dict[str, Any]) -> str | None:
    """Where Ray would put the pod's object store, if not in its /dev/shm: Ray 2.60 sizes it at 30%
    of the pod's memory, capped at 95% of /dev/shm but never below 10 GB (`resolve_object_store_memory`),
    and moves it to /tmp on the container's disk (slower, and unbounded) when /dev/shm is smaller."""
    memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if memory is None or shm.get("sizeLimit") is None:
        return None
    shm_bytes = _bytes(shm["sizeLimit"])
    given = (group.get("rayStartParams") or {}).get("object-store-memory")
    store = float(given) if given is not None else min(0.3 * _bytes(memory), max(1e10, 0.95 * shm_bytes))
    if store <= shm_bytes:
        return None
    return (
        f"Ray's object store ({store / 2**30:.1f} GiB of {memory}) does not fit /dev/shm ({shm['sizeLimit']}) and would go "
        "to /tmp on the container's disk: raise the emptyDir's sizeLimit or set rayStartParams object-store-memory"
    )


def _entrypoint_problems(spec: dict[str, Any]) -> tuple[list[str], Any]:
    """The entrypoint runs jobs/pipeline.py on a config of the repository that `alloylm validate`
    accepts with the entrypoint's overrides; returns the problems and the resolved RunConfig."""
    argv = shlex.split(spec.get("entrypoint") or "")
    if len(argv) < 3 or argv[0] not in ("python", "python3") or argv[1] != "jobs/pipeline.py":
        return [f"spec.entrypoint: {spec.get('entrypoint')!r} is not `python jobs/pipeline.py CONFIG [key=value ...]`"], None
    problems = []
    if not (REPO / argv[1]).is_file():
        problems.append(f"spec.entrypoint: {argv[1]} is not in the repository")
    from alloylm.cli import make_parser

    try:  # as jobs/pipeline.py hands them to `alloylm run`: flags (--wait) and key=value overrides
        parsed = make_parser().parse_args(["run", *argv[2:]])
    except SystemExit:
        return problems + [f"spec.entrypoint: `alloylm run` refuses the arguments {argv[2:]}"], None
    config_path, overrides = REPO / parsed.config, parsed.overrides
    if spec.get("backoffLimit") and not parsed.wait:
        # A retried driver finds the lease of the one that died (it renews no more, but only
        # expires after run.lease_ttl_seconds): without --wait it exits 1 at once, and the retry is spent.
        problems.append("spec.entrypoint: a RayJob with backoffLimit must pass --wait, or its retry fails on the dead driver's lease")
    if not config_path.is_file():
        return problems + [f"spec.entrypoint: config {argv[2]} is not in the repository"], None
    try:
        config = load_config(config_path, overrides)
    except ConfigError as err:
        return problems + [f"spec.entrypoint: alloylm validate refuses {argv[2]} {' '.join(overrides)}: {err}"], None
    if spec.get("shutdownAfterJobFinishes") and not config.storage.startswith("s3://"):
        problems.append(f"spec.entrypoint: storage {config.storage!r} dies with the cluster; give storage=s3://...")
    return problems, config


# ------------------------------------------------------------------------------------------
# The Dockerfile
# ------------------------------------------------------------------------------------------


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def _dockerfile_problems(text: str) -> list[str]:
    """The base image runs the installed Ray; the repository is copied and pip-installed."""
    instructions = _dockerfile_instructions(text)
    problems = []
    args: dict[str, str] = {}
    base = None
    for keyword, arguments in instructions:
        if keyword == "ARG" and base is None:
            name, _, default = arguments.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif keyword == "FROM" and base is None:
            base = _substitute(next(t for t in arguments.split() if not t.startswith("--")), args)
    match = re.fullmatch(r"rayproject/ray(?:-ml|-llm)?:(\d+\.\d+\.\d+)(-[\w.-]+)?", base or "")
    if not match:
        problems.append(f"FROM: {base!r} is not a rayproject/ray:<version>[-suffix] image")
    elif match.group(1) != ray.__version__:
        problems.append(f"FROM: the base image runs Ray {match.group(1)}, the project pins Ray {ray.__version__}")

    workdir, package_copied, installed, repository_copied, warm = None, False, False, False, False
    env_keys = set()
    for keyword, arguments in instructions:
        if keyword == "WORKDIR":
            workdir = arguments
        elif keyword == "ENV":
            env_keys |= set(re.findall(r"(?:^|\s)(\w+)=", arguments))
        elif keyword == "COPY":
            tokens = [t for t in shlex.split(arguments) if not t.startswith("--")]
            sources, target = tokens[:-1], tokens[-1].rstrip("/") or "/"
            into_workdir = target in (".", "./", workdir)
            if into_workdir and "." in sources:
                repository_copied = True
                package_copied = True
            elif "pyproject.toml" in sources or any(s.rstrip("/") == "platform" for s in sources):
                package_copied = package_copied or ("pyproject.toml" in sources)
        elif keyword == "RUN":
            tokens = shlex.split(arguments)
            if "pip" in tokens and "install" in tokens:
                targets = tokens[tokens.index("install") + 1 :]
                if package_copied and any(t in (".", "./", workdir) for t in targets):
                    installed = True
            if "-m alloylm.warm" in arguments:
                warm = True
    if workdir is None:
        problems.append("WORKDIR: none; the RayJob's working_dir needs the repository at a known path")
    if not installed:
        problems.append("RUN pip install .: the repository (pyproject.toml) is not copied and pip-installed")
    if not repository_copied:
        problems.append("COPY . .: the whole repository (jobs/, configs/) is not copied into the WORKDIR")
    if "TORCH_EXTENSIONS_DIR" not in env_keys:
        problems.append("ENV TORCH_EXTENSIONS_DIR: not set; DeepSpeed would compile its ops again in every job")
    if not warm:
        problems.append("RUN python -m alloylm.warm: DeepSpeed's op is not built into the image")
    return problems


def _dockerfile_workdir() -> str:
    return [a for k, a in _dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")) if k == "WORKDIR"][-1]


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns leave `path` out of the build context (no `!` rules)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        candidates = [pattern.strip("/"), pattern[3:]] if pattern.startswith("**/") else [pattern.strip("/")]
        if any(fnmatch(prefix, candidate) for prefix in prefixes for candidate in candidates):
            return True
    return False


# ------------------------------------------------------------------------------------------
# The Secrets the manifests read, and those secrets.example.yaml declares
# ------------------------------------------------------------------------------------------


def _secret_references(obj: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(Secret, key or None for all keys, where) for every Secret a ray.io object reads."""
    references = []
    for at, cluster in _cluster_specs(obj):
        secret = (cluster.get("authOptions") or {}).get("secretName")
        if secret:
            references.append((secret, AUTH_TOKEN_SECRET_KEY, f"{at}.authOptions.secretName"))
        for path, group in _groups(cluster, at):
            pod = _pod_spec(group)
            for volume in pod.get("volumes") or []:
                if volume.get("secret"):
                    keys = [item["key"] for item in volume["secret"].get("items") or []] or [None]
                    references += [(volume["secret"]["secretName"], key, f"{path} volume {volume['name']}") for key in keys]
            for container in pod.get("containers") or []:
                for source in container.get("envFrom") or []:
                    if source.get("secretRef"):
                        references.append((source["secretRef"]["name"], None, f"{path} envFrom"))
                for env in container.get("env") or []:
                    ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        references.append((ref["name"], ref["key"], f"{path} env {env['name']}"))
    return references


def _missing_secrets(objects: list[dict[str, Any]], declared: dict[str, set[str]]) -> list[str]:
    problems = []
    for obj in objects:
        for secret, key, where in _secret_references(obj):
            if secret not in declared:
                problems.append(f"{where}: Secret {secret!r} is not declared in secrets.example.yaml")
            elif key is not None and key not in declared[secret]:
                problems.append(f"{where}: Secret {secret!r} has no key {key!r} in secrets.example.yaml")
    return problems


def _declared_secrets() -> dict[str, set[str]]:
    return {
        d.obj["metadata"]["name"]: set(d.obj.get("stringData") or {}) | set(d.obj.get("data") or {})
        for d in DOCUMENTS
        if d.file == "k8s/secrets.example.yaml" and d.kind == "Secret"
    }


# ------------------------------------------------------------------------------------------
# Tests: what is shipped
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kuberay_crds() -> Path:
    if not all((CRD_DIR / name).is_file() for name in CRD_FILES.values()):
        pytest.skip(f"KubeRay CRDs not found in {CRD_DIR} (set ALLOYLM_KUBERAY_CRDS to a folder with {', '.join(CRD_FILES.values())})")
    return CRD_DIR


def test_k8s_folder_ships_every_manifest():
    kinds = sorted(d.kind for d in DOCUMENTS)
    assert kinds.count("RayCluster") >= 2 and "RayJob" in kinds and "RayService" in kinds and "Secret" in kinds, kinds
    files = {d.file for d in DOCUMENTS}
    assert {"k8s/raycluster-cpu.yaml", "k8s/raycluster-gpu.yaml", "k8s/secrets.example.yaml"} <= files
    gpu = _document("raycluster-gpu.yaml", "RayCluster")
    assert any(_resource(_ray_container(g), "nvidia.com/gpu") >= 1 for g in gpu["spec"]["workerGroupSpecs"])


@pytest.mark.parametrize("document", RAY_DOCUMENTS, ids=_ids(RAY_DOCUMENTS))
def test_ray_manifest_fits_kuberay_crd(document, kuberay_crds):
    assert _schema_problems(document.obj) == []


@pytest.mark.parametrize("document", RAY_DOCUMENTS, ids=_ids(RAY_DOCUMENTS))
def test_ray_manifest_passes_kuberay_rules(document, kuberay_crds):
    assert _kuberay_problems(_with_defaults(document.obj)) == []


@pytest.mark.parametrize("document", RAY_DOCUMENTS, ids=_ids(RAY_DOCUMENTS))
def test_ray_manifest_follows_alloylm_conventions(document):
    assert _convention_problems(document.obj) == []


@pytest.mark.parametrize("document", CORE_DOCUMENTS, ids=_ids(CORE_DOCUMENTS))
def test_core_manifest_fits_kubernetes_schema(document):
    assert _core_problems(document.obj) == []


@pytest.mark.parametrize("document", SERVICES, ids=_ids(SERVICES))
def test_rayservice_serve_config_is_valid_and_fits_its_cluster(document):
    problems, configs = _serve_config_problems(document.obj["spec"].get("serveConfigV2", ""))
    assert problems == []
    assert configs, "no application with import_path alloylm.serve.app:build_app"
    assert _serving_fit_problems(document.obj, configs) == []


def test_rayservice_carries_the_serving_folders_serve_config():
    # serving/rayservice_serve_config.yaml is the documented fragment; the manifest must not drift.
    fragment = yaml.safe_load((REPO / "serving" / "rayservice_serve_config.yaml").read_text(encoding="utf-8"))
    manifest = _document("rayservice.yaml", "RayService")
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == yaml.safe_load(fragment["spec"]["serveConfigV2"])


def test_rayservice_serves_the_stages_the_rayjob_writes():
    run_uris = set()
    for job in JOBS:
        problems, config = _entrypoint_problems(job.obj["spec"])
        assert problems == [] and config is not None
        run_uris.add(config.run_uri.rstrip("/"))
    for service in SERVICES:
        _, configs = _serve_config_problems(service.obj["spec"]["serveConfigV2"])
        for config in configs:
            for variant, source in config.sources.items():
                if source.startswith("s3://"):
                    assert source.rsplit("/stages/", 1)[0] in run_uris, (variant, source, run_uris)


@pytest.mark.parametrize("document", JOBS, ids=_ids(JOBS))
def test_rayjob_entrypoint_runs_a_config_alloylm_accepts(document):
    problems, config = _entrypoint_problems(document.obj["spec"])
    assert problems == []
    assert config.storage.startswith("s3://")


@pytest.mark.parametrize("document", JOBS, ids=_ids(JOBS))
def test_rayjob_runtime_env_is_valid_and_points_at_the_image_repository(document):
    assert _runtime_env_problems(document.obj["spec"].get("runtimeEnvYAML"), _dockerfile_workdir()) == []


def test_every_secret_the_manifests_read_is_declared_in_the_example():
    assert _missing_secrets([d.obj for d in RAY_DOCUMENTS], _declared_secrets()) == []


def test_secrets_example_holds_only_placeholders():
    secrets = [d.obj for d in DOCUMENTS if d.file == "k8s/secrets.example.yaml"]
    assert secrets and all(s["kind"] == "Secret" for s in secrets)
    for secret in secrets:
        assert not secret.get("data"), "use stringData, so that placeholders are readable as such"
        for key, value in secret["stringData"].items():
            if key in NOT_SECRET_KEYS:
                continue
            lines = [line for line in str(value).splitlines() if line.strip()]
            assert lines and all(PLACEHOLDER in line for line in lines), f"{secret['metadata']['name']}.{key}"


def test_dockerfile_builds_on_the_installed_ray_and_installs_the_repository():
    assert _dockerfile_problems(DOCKERFILE.read_text(encoding="utf-8")) == []


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "_dockerignored does not handle ! exceptions"
    needed = ["pyproject.toml", "README.md", "platform/alloylm/__init__.py", "jobs/pipeline.py", "jobs/_entry.py", "configs/quickstart.yaml"]
    assert [p for p in needed if _dockerignored(p, patterns)] == []
    assert all(_dockerignored(p, patterns) for p in [".venv/bin/python", "runs/quickstart/manifest.json", ".git/HEAD", "platform/alloylm/__pycache__/x.pyc"])
    # API keys written into the repository by mistake stay out of the image (and out of git).
    assert _dockerignored("api-keys.txt", patterns) and "api-keys.txt" in (REPO / ".gitignore").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------
# Tests: the checks catch what they claim to
# ------------------------------------------------------------------------------------------


def test_misspelled_field_is_rejected_with_its_path(kuberay_crds):
    cluster = _document("raycluster-cpu.yaml", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagee"] = "alloylm:0.1.0"
    problems = _schema_problems(cluster)
    assert any(p.startswith("spec.headGroupSpec.rayStartParam: unknown field") for p in problems), problems
    assert any(p.startswith("spec.workerGroupSpecs[0].template.spec.containers[0].imagee: unknown field") for p in problems), problems


def test_misspelled_metadata_field_is_rejected(kuberay_crds):
    job = _document("rayjob-quickstart.yaml", "RayJob")
    job["metadata"]["label"] = job["metadata"].pop("labels")
    assert any("label" in p and p.startswith("metadata") for p in _schema_problems(job))


def test_int32_bounds_and_int_or_string_follow_the_schema(kuberay_crds):
    cluster = _document("raycluster-cpu.yaml", "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4  # an integer quantity is fine
    assert _schema_problems(cluster) == []
    worker["maxReplicas"] = 2**31
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [4]
    problems = _schema_problems(cluster)
    assert any(p.startswith("spec.workerGroupSpecs[0].maxReplicas:") for p in problems), problems
    assert any(p.startswith("spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu:") for p in problems), problems


def test_defaults_are_filled_before_validation(kuberay_crds):
    cluster = _document("raycluster-cpu.yaml", "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]
    del worker["maxReplicas"], worker["minReplicas"]
    defaulted = _with_defaults(cluster)["spec"]
    worker = defaulted["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"], worker["numOfHosts"]) == (0, 2**31 - 1, 1)
    head_ports = defaulted["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert head_ports and all(port["protocol"] == "TCP" for port in head_ports)  # defaults inside list items
    worker = cluster["spec"]["workerGroupSpecs"][0]
    assert _schema_problems(cluster) == []
    worker["minReplicas"] = 3  # against the default maxReplicas: fine
    assert _kuberay_problems(_with_defaults(cluster)) == []


def test_duplicate_list_map_key_is_rejected(kuberay_crds):
    cluster = _document("raycluster-cpu.yaml", "RayCluster")
    ports = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append({"containerPort": 8265, "name": "dashboard-again"})
    problems = _schema_problems(cluster)
    assert any(p.startswith("spec.headGroupSpec.template.spec.containers[0].ports[") and "duplicate" in p for p in problems), problems


def test_too_long_or_non_dns_names_are_rejected(kuberay_crds):
    service = _document("rayservice.yaml", "RayService")
    service["metadata"]["name"] = "alloylm-" + "x" * 40  # 48 > 47
    problems = _kuberay_problems(_with_defaults(service))
    assert any(p.startswith("metadata.name:") and "at most 47" in p for p in problems), problems
    service["metadata"]["name"] = "Alloylm_serve"
    assert any(p.startswith("metadata.name:") and "DNS-1035" in p for p in _kuberay_problems(_with_defaults(service)))
    cluster = _document("raycluster-cpu.yaml", "RayCluster")
    cluster["metadata"]["name"] = "a" * 53
    assert _kuberay_problems(_with_defaults(cluster)) == []
    cluster["metadata"]["name"] = "a" * 54
    assert any("at most 53" in p for p in _kuberay_problems(_with_defaults(cluster)))


def test_rayjob_without_a_cluster_is_rejected(kuberay_crds):
    job = _document("rayjob-quickstart.yaml", "RayJob")
    del job["spec"]["rayClusterSpec"]
    assert _schema_problems(job) == []  # the schema allows it; only KubeRay's rule catches it
    problems = _kuberay_problems(_with_defaults(job))
    assert any("spec.rayClusterSpec" in p and "spec.clusterSelector" in p for p in problems), problems


def test_resources_set_twice_are_rejected(kuberay_crds):
    cluster = _document("raycluster-cpu.yaml", "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]
    worker["rayStartParams"] = {"num-cpus": "4"}
    worker["resources"] = {"CPU": "4"}
    assert _schema_problems(cluster) == []
    problems = _kuberay_problems(_with_defaults(cluster))
    assert any(p.startswith("spec.workerGroupSpecs[0]:") and "rayStartParams (num-cpus)" in p for p in problems), problems


def test_replica_bounds_and_containers_are_checked(kuberay_crds):
    job = _document("rayjob-quickstart.yaml", "RayJob")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["minReplicas"], worker["maxReplicas"] = 3, 2
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"] = []
    problems = _kuberay_problems(_with_defaults(job))
    assert any("minReplicas (3) is greater than maxReplicas (2)" in p for p in problems), problems
    assert any(p.startswith("spec.rayClusterSpec.headGroupSpec.template.spec.containers:") for p in problems), problems


def test_embedded_yaml_must_parse(kuberay_crds):
    job = _document("rayjob-quickstart.yaml", "RayJob")
    job["spec"]["runtimeEnvYAML"] = "working_dir: [unclosed"
    assert any(p.startswith("spec.runtimeEnvYAML: not valid YAML") for p in _kuberay_problems(_with_defaults(job)))
    service = _document("rayservice.yaml", "RayService")
    service["spec"]["serveConfigV2"] = "applications: {unclosed"
    assert any(p.startswith("spec.serveConfigV2: not valid YAML") for p in _kuberay_problems(_with_defaults(service)))


def test_serve_config_mistakes_are_caught():
    text = _document("rayservice.yaml", "RayService")["spec"]["serveConfigV2"]
    data = yaml.safe_load(text)
    data["http_option"] = data.pop("http_options")  # Ray's schema would ignore this typo
    problems, _ = _serve_config_problems(yaml.safe_dump(data))
    assert any(p.startswith("spec.serveConfigV2.http_option: unknown key") for p in problems), problems
    data = yaml.safe_load(text)
    data["applications"][0]["args"]["variant"] = data["applications"][0]["args"].pop("variants")
    problems, _ = _serve_config_problems(yaml.safe_dump(data))
    assert any(p.startswith("spec.serveConfigV2.applications[0].args: not a valid ServeConfig") and "variant" in p for p in problems)
    data = yaml.safe_load(text)
    del data["applications"][0]["args"]["sources"]["dpo"]
    data["applications"][0]["args"]["sources"]["instruct"] = "s3://alloylm-runs/quickstart/stages/sft"
    problems, _ = _serve_config_problems(yaml.safe_dump(data))
    assert any("no model folder for dpo" in p for p in problems), problems
    assert any(p.startswith("spec.serveConfigV2.applications[0].args.sources.instruct:") for p in problems), problems
    data["applications"][0]["import_path"] = "alloylm.serve.app:no_such_builder"
    problems, _ = _serve_config_problems(yaml.safe_dump(data))
    assert any(p.startswith("spec.serveConfigV2.applications[0].import_path:") for p in problems), problems


def test_serving_that_cannot_fit_its_cluster_is_caught():
    service = _document("rayservice.yaml", "RayService")
    data = yaml.safe_load(service["spec"]["serveConfigV2"])
    data["applications"][0]["args"]["deployment"]["num_gpus"] = 1  # the CPU workers have no GPU
    data["http_options"]["port"] = 9000
    service["spec"]["serveConfigV2"] = yaml.safe_dump(data)
    for _, group in _groups(service["spec"]["rayClusterConfig"], ""):
        group["template"]["spec"]["containers"][0]["volumeMounts"].pop()  # drop the API key mount
    _, configs = _serve_config_problems(service["spec"]["serveConfigV2"])
    problems = _serving_fit_problems(service, configs)
    assert any("no group fits one replica" in p for p in problems), problems
    assert any("no Secret mounted at /etc/alloylm" in p for p in problems), problems
    assert any("port named serve = 9000" in p for p in problems), problems


def test_rayjob_entrypoint_and_runtime_env_mistakes_are_caught():
    spec = _document("rayjob-quickstart.yaml", "RayJob")["spec"]
    bad = {**spec, "entrypoint": "python jobs/pipeline.py configs/quickstart.yaml storage=s3://alloylm-runs data.blok_size=64"}
    problems, _ = _entrypoint_problems(bad)
    assert any("alloylm validate refuses" in p and "blok_size" in p for p in problems), problems
    problems, _ = _entrypoint_problems({**spec, "entrypoint": "python jobs/pipeline.py configs/quickstart.yaml"})
    assert any("dies with the cluster" in p for p in problems), problems
    problems, _ = _entrypoint_problems({**spec, "entrypoint": "python jobs/pipeline.py configs/nope.yaml"})
    assert any("configs/nope.yaml is not in the repository" in p for p in problems), problems
    problems = _runtime_env_problems("working_dirr: /home/ray/alloylm\nenv_vars: {A: 1}\n", _dockerfile_workdir())
    assert any(p.startswith("spec.runtimeEnvYAML.working_dirr: not a runtime_env field") for p in problems), problems
    assert any("RuntimeEnv refuses" in p for p in problems), problems
    assert any(p.startswith("spec.runtimeEnvYAML.working_dir:") for p in problems), problems


def test_conventions_catch_a_mismatched_cluster():
    cluster = _document("raycluster-gpu.yaml", "RayCluster")
    cluster["spec"]["rayVersion"] = "2.59.0"
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "2"
    gpu_container = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    gpu_container["image"] = "alloylm:0.0.9-gpu"
    del gpu_container["resources"]["limits"]["nvidia.com/gpu"]
    gpu_container["volumeMounts"] = []
    gpu_container["resources"]["limits"]["cpu"] = gpu_container["resources"]["requests"]["cpu"] = "16"  # the env still says 8
    problems = _convention_problems(cluster)
    for expected in ("rayVersion", "num-cpus", "same image", "/dev/shm", "nvidia.com/gpu must be set in limits", f"{IDLE_WORKERS_VARIABLE} must be \"16\""):
        assert any(expected in p for p in problems), (expected, problems)


def test_undeclared_secret_is_caught():
    service = _document("rayservice.yaml", "RayService")
    service["spec"]["rayClusterConfig"]["authOptions"]["secretName"] = "ray-token"
    volume = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"][1]
    volume["secret"]["items"][0]["key"] = "keys"
    problems = _missing_secrets([service], _declared_secrets())
    assert any("authOptions.secretName: Secret 'ray-token' is not declared" in p for p in problems), problems
    assert any("has no key 'keys'" in p for p in problems), problems


def test_core_schema_catches_a_misspelled_secret_field():
    secret = copy.deepcopy(next(d.obj for d in CORE_DOCUMENTS))
    secret["stringdata"] = secret.pop("stringData")
    problems = _core_problems(secret)
    assert problems and "stringdata" in problems[0], problems


def test_dockerfile_checks_fail_for_real():
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert ray.__version__ in text
    problems = _dockerfile_problems(text.replace(f"RAY_VERSION={ray.__version__}", "RAY_VERSION=2.59.0"))
    assert any(p.startswith("FROM: the base image runs Ray 2.59.0") for p in problems), problems
    without_install = "\n".join(line for line in text.splitlines() if not line.startswith("RUN pip install ."))
    assert any(p.startswith("RUN pip install .") for p in _dockerfile_problems(without_install))
    assert any(p.startswith("FROM:") for p in _dockerfile_problems("FROM python:3.11\n"))


def test_the_gpu_cluster_as_it_starts_fits_every_stage_of_the_paper_configs():
    """`alloylm run` checks each stage against the cluster as it stands (it does not wait for the
    autoscaler): with `minReplicas: 0` / `replicas: 2`, every paper config was refused at once."""
    from alloylm.config import load_config
    from alloylm.pipeline import check_stage_resources

    spec = yaml.safe_load((K8S / "raycluster-gpu.yaml").read_text())["spec"]
    have = {"CPU": float(spec["headGroupSpec"]["rayStartParams"].get("num-cpus", 0)), "GPU": 0.0}
    for group in spec["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        have["CPU"] += group["minReplicas"] * float(limits["cpu"])
        have["GPU"] += group["minReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    for path in sorted((REPO / "configs" / "paper").glob("*.yaml")):
        check_stage_resources(load_config(str(path)), have=have)
