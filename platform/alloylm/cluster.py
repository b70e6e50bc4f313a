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
    forwarded = {
        key: os.environ[key]
        for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM")
        if key in os.environ
    }
    options = {"runtime_env": {"env_vars": forwarded}} if forwarded else {}
    if address:
        ray.init(address=address, **options)
    else:
        # No dashboard for a local throwaway cluster: it costs a CPU-second per second on 2 cores.
        ray.init(include_dashboard=False, **options)
    log.info("Ray cluster: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
