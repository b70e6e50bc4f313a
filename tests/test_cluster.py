"""`alloylm.cluster`: a merge or evaluation task given a GPU does not leave its process behind
(`model_task`); the local cluster keeps its idle worker processes while actors hold CPUs
(`keep_idle_workers`)."""

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


# The local cluster `alloylm` starts (`connect_ray`), two task workers, then an actor holding every
# CPU but one, as data preparation's tokenizer actors or a stage's Ray Train workers do.
IDLE_SCRIPT = r"""
import json, os, time
import psutil
import ray

from alloylm.cluster import connect_ray

connect_ray()
cpus = int(ray.cluster_resources()["CPU"])


@ray.remote(num_cpus=1)
def pid():
    time.sleep(1.0)  # both at once: two worker processes
    return os.getpid()


@ray.remote(num_cpus=max(cpus - 1, 1))
class Holder:
    def ready(self):
        return True


workers = sorted(set(ray.get([pid.remote(), pid.remote()])))
holder = Holder.remote()
ray.get(holder.ready.remote())
time.sleep(4.0)  # Ray kills an idle worker over its limit once it has idled 1 s (checked every 0.2 s)
print(json.dumps({"cpus": cpus, "workers": workers, "alive": [p for p in workers if psutil.pid_exists(p)]}), flush=True)
ray.shutdown()
"""


def test_the_local_cluster_keeps_its_idle_workers_while_an_actor_holds_cpus(tmp_path):
    """Ray keeps as many idle workers as CPUs are *available*: with an actor holding all but one,
    it killed the second idle task worker, and the next Ray Data pass started and warmed a new
    process (pass 1 of the data benchmark: 2.1-2.4 s against 1.2-1.4 s). `connect_ray` keeps one
    per CPU. Needs 2 CPUs or more (one CPU runs the two tasks in one process)."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    script = tmp_path / "idle_workers.py"
    script.write_text(IDLE_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["workers"]) == 2, result
    assert result["alive"] == result["workers"], result


def test_a_soft_limit_the_environment_sets_stands(monkeypatch):
    from alloylm.cluster import IDLE_WORKERS_VARIABLE, keep_idle_workers

    monkeypatch.setenv(IDLE_WORKERS_VARIABLE, "7")
    keep_idle_workers(2)
    assert os.environ[IDLE_WORKERS_VARIABLE] == "7"
    monkeypatch.delenv(IDLE_WORKERS_VARIABLE)
    keep_idle_workers(3)
    assert os.environ[IDLE_WORKERS_VARIABLE] == "3"
