"""Connecting to the Ray cluster a command runs on: `RAY_ADDRESS` if set, else a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("alloylm")


def connect_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), or start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # Workers inherit the driver's environment only on a local cluster; pass what they need to
    # reach S3 and stay offline explicitly, so a remote cluster's workers see the same settings.
    forwarded = forwarded_environment()
    runtime_env: dict = {"env_vars": forwarded} if forwarded else {}
    shipped = shipped_library()
    if shipped:
        runtime_env["py_modules"] = shipped
    options = {"runtime_env": runtime_env} if runtime_env else {}
    if address:
        ray.init(address=address, **options)
    else:
        # No dashboard for a local throwaway cluster: it costs a CPU-second per second on 2 cores.
        ray.init(include_dashboard=False, **options)
    log.info("Ray cluster: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


# Where Ray hands a job's driver its job config (runtime env included); the name is Ray's
# (`ray._private.runtime_env.constants`), written out here to keep off Ray's private modules.
_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
FORWARDED = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")


def forwarded_environment() -> dict[str, str]:
    """The driver's variables (of FORWARDED) for the workers' runtime env, less those the Ray job
    already sets: inside a job (`ray job submit --runtime-env-json`, a RayJob's `runtimeEnvYAML`),
    `ray.init` refuses a runtime env that names an env var the job's also names, even with the
    same value, so the job's setting stands and reaches the workers as it is."""
    job = _job_runtime_env().get("env_vars") or {}
    return {key: os.environ[key] for key in FORWARDED if key in os.environ and key not in job}


def _job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver runs in ({} outside a job)."""
    import json

    try:
        return json.loads(os.environ.get(_JOB_CONFIG) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def shipped_library() -> list[str]:
    """The `alloylm` package as the runtime env's `py_modules`, when this driver imported it from the
    job's working_dir (`ray job submit --working-dir .`, where `jobs/_entry.py` puts `platform/` on
    the driver's path): else Ray's workers would import the copy installed in the image, and code
    edits would reach the driver alone. [] outside a job, for an installed package, or when the job
    names py_modules itself (Ray would refuse the two)."""
    import alloylm

    if _JOB_CONFIG not in os.environ or _job_runtime_env().get("py_modules"):
        return []
    package = os.path.dirname(os.path.abspath(alloylm.__file__))
    return [package] if package.startswith(os.path.join(os.path.abspath(os.getcwd()), "")) else []
