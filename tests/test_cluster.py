"""`alloylm.cluster.model_task`: a merge or evaluation task given a GPU does not leave its process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Runs in a Ray cluster of its own, with one GPU declared (Ray schedules GPU tasks on it; nothing
# here touches CUDA). Each line of output is one JSON object.
SCRIPT = r"""
import json, os, time, types
import psutil
import ray

ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
from alloylm.cluster import model_task
from alloylm.merge.stage import _on_cluster


def pid():
    return os.getpid()


def gone(pids, wait_s=120.0):
    deadline = time.monotonic() + wait_s  # how long a worker may take to exit after its last task
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if not psutil.pid_exists(p)]


evaluation = [ray.get(model_task(pid, num_gpus=1).options(num_cpus=0.5, num_gpus=1).remote()) for _ in range(3)]
stage = types.SimpleNamespace(resources=types.SimpleNamespace(num_cpus=0.5))
merge = [_on_cluster(pid, stage, num_gpus=1) for _ in range(3)]
print(json.dumps({"evaluation": evaluation, "merge": merge, "gone": gone(evaluation + merge)}), flush=True)
ray.shutdown()
"""


def test_a_task_given_a_gpu_runs_in_a_process_that_exits_after_it(tmp_path):
    """Ray ends the worker process of a task with GPUs only when they are given to `ray.remote`
    itself; ours come through `.options()` (the stage's and the evaluation's resources), and a
    process kept for reuse would hold the CUDA context and the cached memory of the model it
    loaded. Through `model_task` (evaluation) and the merge stage's `_on_cluster`, every GPU task
    runs in a new process, and each process is gone afterwards."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    script = tmp_path / "gpu_tasks.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    pids = result["evaluation"] + result["merge"]
    assert len(set(pids)) == len(pids), result  # no process ran two of them
    assert sorted(result["gone"]) == sorted(pids), result
