"""Connecting to the Ray cluster a command runs on (`RAY_ADDRESS` if set, else a local one), and
checking that every node sees a local storage or model folder."""

from __future__ import annotations

import logging
import os
import threading

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
        keep_idle_workers()
        # No dashboard for a local throwaway cluster: it costs a CPU-second per second on 2 cores.
        ray.init(include_dashboard=False, **options)
    log.info("Ray cluster: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


# Ray's setting (RayConfig `num_workers_soft_limit`, read from the raylet's environment as every
# RayConfig entry is) for how many idle worker processes a node keeps.
IDLE_WORKERS_VARIABLE = "RAY_num_workers_soft_limit"


def keep_idle_workers(num_cpus: int | None = None) -> None:
    """Before a local cluster starts: keep one idle worker process per CPU, whatever actors hold.

    Ray's default (-1) keeps as many idle workers as the node has CPUs *available*, so while an
    actor pool (data preparation's tokenizers) or Ray Train's workers hold CPUs, the raylet kills
    the idle task workers after a second, and the next Ray Data pass starts new ones, each
    importing Ray Data and this library again before its first task (about 1.5 CPU-seconds). On
    2 CPUs that was half of pass 1's wall time on the data benchmark's 50 MB (read_clean 2.1-2.4 s
    against 1.2-1.4 s with the CPUs' count kept; README, benchmarks). A value the environment
    already sets stands. A `ray start` cluster reads its own environment (README, cluster recipe)."""
    os.environ.setdefault(IDLE_WORKERS_VARIABLE, str(num_cpus if num_cpus is not None else os.cpu_count() or 1))


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


def model_task(fn, *, num_gpus: float = 0.0):
    """`ray.remote(fn)` for a task that loads a whole model, with GPUs given later by `.options()`
    (a stage's or the evaluation's resources). A task given a GPU runs in a worker process that
    exits after it (`max_calls=1`), as Ray does by default only for `@ray.remote(num_gpus=...)`,
    not for GPUs that come through `.options()`. A worker process kept for reuse keeps its CUDA
    context and the memory PyTorch's caching allocator holds after the model is gone
    (ray-project/ray#29624): the next merge or evaluation on that GPU would find it taken, and a
    reused process may be handed another GPU while still holding the first. On the CPU the process
    is reused as before: its imports stay paid for."""
    import ray

    return ray.remote(max_calls=1)(fn) if num_gpus else ray.remote(fn)


# ------------------------------------------------------------------------------ shared storage

# (folder, node id) pairs this process has seen a node reach: a check costs one task per new node,
# so each stage's runner may repeat it for nodes that joined since (an autoscaling cluster).
_nodes_reaching: set[tuple[str, str]] = set()
_nodes_lock = threading.Lock()
# How long a node may take to answer (it may have to start a worker process first). A node that
# does not answer in time is reported in the log and checked again next time; the run goes on.
NODE_CHECK_TIMEOUT_S = 120.0


def _missing_on_this_node(probes: list[tuple[str, str | None]]) -> list[str]:
    """Runs on one node: the paths of `probes` it cannot see (a file with `expected` text, or any
    file or folder where `expected` is None)."""
    missing = []
    for path, expected in probes:
        try:
            if expected is None:
                seen = os.path.exists(path)
            else:
                with open(path, encoding="utf-8") as handle:
                    seen = handle.read() == expected
        except OSError:
            seen = False
        if not seen:
            missing.append(path)
    return missing


def _worker_nodes(needs_gpu: bool = False) -> list[dict]:
    """The alive nodes, other than the driver's, that can run work (any CPU or GPU; a GPU if
    `needs_gpu`)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [
        node for node in ray.nodes()
        if node.get("Alive") and node["NodeID"] != here
        and (node.get("Resources", {}).get("GPU", 0) > 0 or (not needs_gpu and node.get("Resources", {}).get("CPU", 0) > 0))
    ]


def _nodes_missing(folder: str, probes: list[tuple[str, str | None]], needs_gpu: bool = False) -> dict[str, list[str]]:
    """Run `probes` on every worker node not yet seen reaching `folder`: "address (node id)" -> the
    paths that node cannot see. Nodes that see them all are remembered."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    with _nodes_lock:
        nodes = [node for node in _worker_nodes(needs_gpu) if (folder, node["NodeID"]) not in _nodes_reaching]
    if not nodes:
        return {}
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing_on_this_node)
    refs = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(probes): node
        for node in nodes
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_CHECK_TIMEOUT_S)
    if late:
        log.warning(
            "could not check within %.0f s that node(s) %s see %s; going on without it",
            NODE_CHECK_TIMEOUT_S, ", ".join(refs[ref]["NodeID"] for ref in late), folder,
        )
        for ref in late:
            ray.cancel(ref, force=True)
    missing = {}
    for ref in ready:
        node = refs[ref]
        try:
            paths = ray.get(ref)
        except Exception as exc:  # the node died, or its task could not run there: not the storage's fault
            log.warning("could not check that node %s sees %s: %s", node["NodeID"], folder, exc)
            continue
        if paths:
            missing[f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID']})"] = paths
        else:
            with _nodes_lock:
                _nodes_reaching.add((folder, node["NodeID"]))
    return missing


SHARED_STORAGE_HINT = (
    "every node of the Ray cluster must reach the same storage: use an s3:// URI, or a shared "
    "filesystem (NFS, a PersistentVolume with ReadWriteMany) mounted at the same path on every node"
)


def check_storage_shared(storage_root: str) -> None:
    """Refuse (ConfigError, exit 2) a local `storage` folder that a worker node of the cluster does
    not see, before anything is written there.

    A run on several nodes writes and reads its artifacts from every node (Ray Data tasks, Ray
    Train workers and checkpoints, merge trials, evaluation tasks). A folder on the driver's own
    disk (the default `./runs`, or any path not on a shared filesystem) would have each node
    write its part into its own disk, and the run would fail late, with a missing-file error.
    The driver writes a marker file with a random token in the folder; a task pinned to each
    node reads it back. Remote storage (s3://) and single-node clusters cost nothing.
    """
    from alloylm import storage
    from alloylm.errors import ConfigError

    if storage.is_remote(storage_root):
        return
    folder = storage.resolve(storage_root)
    with _nodes_lock:
        pending = any((folder, node["NodeID"]) not in _nodes_reaching for node in _worker_nodes())
    if not pending:
        return
    import uuid

    made = []  # the folders of the path made here, deepest first: removed again on refusal, while empty
    parent = folder
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        made.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    token = uuid.uuid4().hex
    marker = os.path.join(folder, f".alloylm-node-check-{token}")
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write(token)
    try:
        missing = _nodes_missing(folder, [(marker, token)])
    finally:
        try:
            os.remove(marker)
        except OSError:
            pass
    if missing:
        for path in made:
            try:
                os.rmdir(path)  # only while empty: another process may have begun writing there meanwhile
            except OSError:
                break
        nodes = "; ".join(missing)
        raise ConfigError(
            f"storage: {storage_root!r} is a folder on this machine ({folder}) that {len(missing)} node(s) of the "
            f"Ray cluster do not see: {nodes}. Refused before this step wrote anything there: {SHARED_STORAGE_HINT}"
        )


def check_models_on_every_node(sources: dict[str, str], *, needs_gpu: bool = False) -> None:
    """Refuse (ServeError) local model folders a worker node of the cluster does not see: a replica
    placed there could not load its model. Only nodes that could hold a replica (with a GPU, for
    replicas that need one) and absolute paths (a relative one reaches the replicas as it is); remote
    sources (s3://, Hub ids) are not checked."""
    from alloylm import storage
    from alloylm.errors import ServeError

    local = {}
    for name, path in sources.items():
        if not storage.is_remote(path) and os.path.isabs(path.removeprefix("file://")) and os.path.exists(storage.resolve(path)):
            local[name] = storage.resolve(path)
    if not local:
        return
    missing = _nodes_missing("\0".join(sorted(local.values())), [(path, None) for path in local.values()], needs_gpu)
    if missing:
        names = {path: name for name, path in local.items()}
        detail = "; ".join(f"{node}: {', '.join(names[p] for p in paths)}" for node, paths in missing.items())
        raise ServeError(f"variant model folders on this machine that node(s) of the Ray cluster do not see ({detail}); {SHARED_STORAGE_HINT}")
