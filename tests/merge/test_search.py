"""Merge stages end to end on a real local Ray cluster: fixed merges and the Ray Tune merge search.

Parents are two tiny llamas of the run's own tokenizer (different seeds, one nudged towards the
data by a few hundred SGD steps would be slower and prove nothing more about the search's
mechanics). The objective is the validation split of the built-in benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch
import yaml

from alloylm import storage
from alloylm.config import ConfigError, load_config
from alloylm.merge.search import unresumable_reason

pytestmark = pytest.mark.slow

PAPER_POINT = {"t": {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}}


def _config(root, stages: dict, **extra) -> dict:
    return {
        "experiment": "ms",
        "storage": str(root / "runs"),
        "builtin": {"materials": 6, "documents_per_material": 1, "general_documents": 60, "general_chats": 40},
        "tokenizer": {"train": {"vocab_size": 400}},
        "datasets": {
            "text": {"source": "builtin:general-text"},
            "chat": {"source": "builtin:general-chat"},
            "bench": {"source": "builtin:biomaterials-benchmark"},
        },
        "data": {"block_size": 32, "tokenizer_actors": 1},
        "stages": stages,
        "evaluate": {
            "variants": ["bench-free=" + str(root / "parent-a")],
            "suites": {
                "multiple_choice": {"dataset": "bench"},
                "short_answer": {"dataset": "bench", "max_new_tokens": 6},
                "domain_perplexity": {"enabled": False},
                "general_perplexity": {"enabled": False},
            },
        },
        **extra,
    }


def _search_stage(root, **search) -> dict:
    return {
        "kind": "merge_search",
        "parents": [str(root / "parent-a"), str(root / "parent-b")],
        "method": "slerp",
        "search": {
            "space": {"t": {"anchors": 5, "filters": ["self_attn", "mlp"], "default": 0.5}},
            "points": [PAPER_POINT],
            "num_samples": 6,
            # One trial at a time: which trials ASHA stops depends on the order in which they reach
            # a rung, and with two at once that order (and TPE's next suggestion) follows timing.
            "max_concurrent_trials": 1,
            "asha": {"rungs": [0.5, 1.0]},
            "objective": {"max_items": 8},
            **search,
        },
    }


def _write(root, raw: dict, name: str = "run.yaml"):
    path = root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    """A prepared run (tokenizer, benchmark) and two parents built with its tokenizer."""
    from alloylm.data.prepare import prepare_all
    from alloylm.models.loading import load_tokenizer, save_model
    from alloylm.models.presets import build_model

    root = tmp_path_factory.mktemp("merge-search")
    config = load_config(_write(root, _config(root, {})))
    prepare_all(config)
    tokenizer = load_tokenizer(storage.join(config.run_uri, "tokenizer"))
    for name, seed in (("parent-a", 1), ("parent-b", 2)):
        save_model(build_model("pico-llama", tokenizer, seed=seed), tokenizer, str(root / name))
    return root


def _load(root, stages: dict, name: str = "run.yaml", **extra):
    return load_config(_write(root, _config(root, stages, **extra), name))


def _state_dict(folder: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, file)))
    return tensors


def _parents_not_read_here(monkeypatch) -> None:
    """The driver (on a cluster: the head node) never fetches a parent: the check, the trials and
    the written merge read them on the nodes that do the work, where their tasks run."""
    import alloylm.models.loading

    def refuse(source, **kwargs):
        raise AssertionError(f"the driver fetched parent {source}")

    monkeypatch.setattr(alloylm.models.loading, "local_model_dir", refuse)


def test_search_finds_best_of_its_trials_and_reproduces_with_mergekit(prepared, tmp_path, monkeypatch):
    from alloylm.merge.stage import merge_stage

    root = prepared
    config = _load(root, {"merged": _search_stage(root)})
    _parents_not_read_here(monkeypatch)
    manifest = merge_stage(config, "merged")
    stage = storage.join(config.run_uri, "stages", "merged")
    rows = [json.loads(line) for line in open(os.path.join(stage, "search", "trials.jsonl"))]
    assert len(rows) == 6
    complete = [r for r in rows if r["status"] == "complete"]
    assert complete and all(r["score"] is not None for r in complete)
    summary = json.load(open(os.path.join(stage, "merge_summary.json")))
    assert summary["best_score"] == max(r["score"] for r in complete)
    assert manifest["metrics"]["best_score"] == summary["best_score"]
    # The paper's point is tried (first, as a point to evaluate).
    paper = [r for r in rows if r["params"]["parameters"]["t"]["self_attn"] == PAPER_POINT["t"]["self_attn"]]
    assert paper, [r["params"] for r in rows]
    # ASHA stopped at least one trial (the objective is continuous, so the trials differ), and
    # the stopped trials only scored the first rung.
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped, [(r["status"], r["score"]) for r in rows]
    assert all(r["rung"] == 1 for r in stopped)
    # The artifact: model, best_merge.yaml, table, plots, Tune's folder with TensorBoard events.
    files = set(os.listdir(os.path.join(stage, "search")))
    assert {"trials.jsonl", "trials.csv", "score_per_trial.png", "score_vs_t.mlp.0.png", "tune"} <= files
    events = [f for d, _, fs in os.walk(os.path.join(stage, "search", "tune")) for f in fs if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard events in the Tune experiment copy"
    best_yaml = yaml.safe_load(open(os.path.join(stage, "best_merge.yaml")))
    assert best_yaml["merge_method"] == "slerp"
    # The winner is the top trial of trials.jsonl, and best_merge.yaml holds its parameters.
    top = max(complete, key=lambda r: r["score"])
    assert summary["best_trial"] == top["trial"] and summary["best_params"] == top["params"]
    t = {entry.get("filter", "default"): entry["value"] for entry in best_yaml["parameters"]["t"]}
    assert t == top["params"]["parameters"]["t"]
    # Re-scoring the stage's model (as mergekit wrote it) on the validation split gives best_score.
    from alloylm.evaluate import data_uris
    from alloylm.evaluate.runner import load_eval_data, score_model

    eval_config = config.search_eval_config("merged")
    data = load_eval_data(eval_config, data_uris(eval_config, config.run_uri), split="validation", tokenizer_uri=storage.join(config.run_uri, "tokenizer"))
    rescored, _ = score_model(eval_config, stage, data)
    assert rescored["score"] == pytest.approx(summary["best_score"], abs=1e-6)
    # mergekit's own CLI on best_merge.yaml writes the same tensors as the stage's model.
    out = tmp_path / "mergekit-out"
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), os.path.join(stage, "best_merge.yaml"), str(out)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = _state_dict(stage), _state_dict(str(out))
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours)
    # The tokenizer, chat template and EOS come from the first parent.
    from transformers import AutoTokenizer

    merged_tok, parent_tok = AutoTokenizer.from_pretrained(stage), AutoTokenizer.from_pretrained(str(root / "parent-a"))
    assert merged_tok.chat_template == parent_tok.chat_template and merged_tok.eos_token == parent_tok.eos_token
    # Unchanged inputs: the second call is skipped (same manifest).
    assert merge_stage(config, "merged")["created_at"] == manifest["created_at"]


def test_grid_search_tries_exactly_its_points(prepared):
    from alloylm.merge.stage import merge_stage

    root = prepared
    other = {"t": {"self_attn": [1, 1, 1, 1, 1], "mlp": [0, 0, 0, 0, 0], "default": 0.5}}
    stage = _search_stage(root, searcher="grid", points=[PAPER_POINT, other], asha=None)
    config = _load(root, {"grid": stage}, name="grid.yaml")
    merge_stage(config, "grid")
    rows = [json.loads(line) for line in open(os.path.join(config.run_uri, "stages", "grid", "search", "trials.jsonl"))]
    tried = sorted(r["params"]["parameters"]["t"]["mlp"] for r in rows)
    assert tried == sorted([PAPER_POINT["t"]["mlp"], other["t"]["mlp"]])
    assert all(r["status"] == "complete" for r in rows)


def test_fixed_merge_from_mergekit_yaml_given_as_is(prepared):
    from alloylm.errors import StageError
    from alloylm.merge.stage import merge_stage

    root = prepared
    mk = root / "user-merge.yaml"
    mk.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(root / "parent-a"), "parameters": {"weight": 0.25}}, {"model": str(root / "parent-b"), "parameters": {"weight": 0.75}}],
        "dtype": "float32",
    }))
    stages = {"lin": {"kind": "merge", "parents": [str(root / "parent-a"), str(root / "parent-b")], "mergekit_config": str(mk)}}
    config = _load(root, stages, name="fixed.yaml")
    manifest = merge_stage(config, "lin")
    assert manifest["metrics"]["method"] == "linear"  # the YAML's method, not the stage's default (slerp)
    out = os.path.join(config.run_uri, "stages", "lin")
    merged, a, b = _state_dict(out), _state_dict(str(root / "parent-a")), _state_dict(str(root / "parent-b"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert (merged[name] - (0.25 * a[name] + 0.75 * b[name])).abs().max() < 1e-6
    assert os.path.exists(os.path.join(out, "merge.yaml")) and os.path.exists(os.path.join(out, "tokenizer_config.json"))

    # The merge task gets the YAML's text, read on the driver: on its node the path may not exist.
    from alloylm.merge.stage import _materialize_task

    elsewhere = root / "only-on-the-driver.yaml"
    shutil.copy(mk, elsewhere)
    moved = _load(root, {"lin3": {**stages["lin"], "mergekit_config": str(elsewhere)}}, name="fixed3.yaml")
    text = elsewhere.read_text()
    elsewhere.unlink()
    done = _materialize_task(moved, "lin3", stages["lin"]["parents"], None, str(root / "lin3-staging"), 0, text)
    assert done["method"] == "linear"
    assert torch.equal(_state_dict(str(root / "lin3-staging"))[name], merged[name])

    # A model the YAML merges besides the parents would be merged unchecked and not fingerprinted.
    mk.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(root / "parent-a"), "parameters": {"weight": 0.5}}, {"model": str(root / "elsewhere"), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }))
    with pytest.raises(StageError, match=r"names model\(s\) that are not among the stage's parents: .*elsewhere"):
        merge_stage(_load(root, {"lin2": {**stages["lin"]}}, name="fixed2.yaml"), "lin2")


def test_incompatible_parents_fail_before_any_trial(prepared):
    from alloylm.errors import StageError
    from alloylm.merge.stage import merge_stage
    from alloylm.models.loading import load_tokenizer, save_model
    from alloylm.models.presets import build_model

    root = prepared
    tokenizer = load_tokenizer(str(root / "parent-a"))
    save_model(build_model("tiny-llama", tokenizer, seed=3), tokenizer, str(root / "bigger"))
    stage = _search_stage(root)
    stage["parents"] = [str(root / "parent-a"), str(root / "bigger")]
    config = _load(root, {"bad": stage}, name="bad.yaml")
    with pytest.raises(StageError, match="shape"):
        merge_stage(config, "bad")
    assert not os.path.exists(os.path.join(config.run_uri, "searches")) or not any(
        n.startswith("bad-") for n in os.listdir(os.path.join(config.run_uri, "searches"))
    )


def test_a_tensor_filter_that_would_set_nothing_is_refused_naming_its_key(prepared):
    """mergekit gives a tensor the first filter that is part of its name: a typo (`mlps`) or a
    filter every tensor of which an earlier one takes (`attn` before `self_attn`) set nothing, and
    the search spent dimensions on it; `default` as a filter failed every trial with a TypeError."""
    from alloylm.errors import StageError
    from alloylm.merge.stage import merge_stage

    root = prepared
    cases = {
        "typo": ({"space": {"t": {"anchors": 3, "filters": ["self_attn", "mlps"]}}, "points": []},
                 r"stages.typo.search.space.t.filters: filter 'mlps' would set nothing: it is part of no tensor's name"),
        "shadowed": ({"space": {"t": {"anchors": 3, "filters": ["attn", "self_attn"]}}, "points": []},
                     r"stages.shadowed.search.space.t.filters: filter 'self_attn' would set nothing: every tensor it matches is matched first by 'attn'"),
    }
    for name, (search, message) in cases.items():
        stage = _search_stage(root)
        stage["search"].update(search)
        config = _load(root, {name: stage}, name=f"{name}.yaml")
        with pytest.raises(StageError, match=message):
            merge_stage(config, name)
    fixed = {"kind": "merge", "parents": [str(root / "parent-a"), str(root / "parent-b")], "method": "slerp",
             "parameters": {"t": {"self_attn": [0, 1], "mlps": [1, 0], "default": 0.5}}}
    with pytest.raises(StageError, match=r"stages.fixed.parameters.t: filter 'mlps' would set nothing"):
        merge_stage(_load(root, {"fixed": fixed}, name="fixed.yaml"), "fixed")
    fixed["parameters"] = {"t": {"*": [0, 1], "mlp": [1, 0], "default": 0.5}}  # mergekit's "*" takes every tensor
    with pytest.raises(StageError, match=r"stages.fixed.parameters.t: filter 'mlp' would set nothing: every tensor it matches is matched first by '\*'"):
        merge_stage(_load(root, {"fixed": fixed}, name="fixed.yaml"), "fixed")
    stage = _search_stage(root)
    stage["search"]["space"]["t"]["filters"] = ["self_attn", "default"]
    with pytest.raises(ConfigError, match="not `default`"):
        _load(root, {"m": stage}, name="default-filter.yaml")


def test_a_search_that_could_not_run_as_configured_is_refused_at_load(prepared):
    root = prepared
    stage = _search_stage(root, num_samples=1, points=[PAPER_POINT, PAPER_POINT])
    with pytest.raises(ConfigError, match=r"num_samples \(1\) is below the number of points \(2\)"):
        _load(root, {"m": stage}, name="few-samples.yaml")
    stage = _search_stage(root, objective={"max_items": 8, "suites": {
        "multiple_choice": {"dataset": "bench", "weight": 0}, "short_answer": {"enabled": False},
        "domain_perplexity": {"enabled": False}, "general_perplexity": {"enabled": False}}})
    with pytest.raises(ConfigError, match=r"stages.m.search.objective.suites: every enabled suite has weight 0"):
        _load(root, {"m": stage}, name="no-objective.yaml")


def test_asha_judges_trials_at_every_rung_but_the_last_whatever_its_reduction_factor():
    """Tune's ASHA judges at times rf^k only. The rung number as the time left rungs unjudged:
    rungs [0.25, 0.5, 1.0] with reduction_factor 3 judged the first rung only."""
    from alloylm.config import MergeSearchStageConfig
    from alloylm.merge.search import _scheduler, asha_time

    for rungs in ([0.5, 1.0], [0.25, 0.5, 1.0], [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]):
        for factor in (1.5, 2, 3, 4, 10):
            stage = MergeSearchStageConfig.model_validate({
                "kind": "merge_search", "parents": ["a", "b"],
                "search": {"space": {"t": {}}, "asha": {"rungs": rungs, "reduction_factor": factor}},
            })
            # Tune's judging points (its bracket's milestones; no public accessor)
            milestones = {milestone for milestone, _ in _scheduler(stage)._brackets[0]._rungs}
            reported = [asha_time(stage, rung) for rung in range(1, len(rungs) + 1)]
            assert set(reported[:-1]) <= milestones, (rungs, factor, reported, milestones)


def test_search_on_the_test_split_is_refused(prepared):
    root = prepared
    stage = _search_stage(root)
    stage["search"]["objective"]["split"] = "test"
    with pytest.raises(ConfigError, match="validation split only"):
        _load(root, {"merged": stage}, name="test-split.yaml")


def _finished_trials(experiment: str) -> dict[str, str]:
    """Trial folder -> its result.json text, for the trials Tune's saved experiment state marks TERMINATED."""
    import glob

    states = sorted(glob.glob(os.path.join(experiment, "experiment_state-*.json")))
    if not states:
        return {}
    try:
        state = json.load(open(states[-1]))
    except ValueError:
        return {}  # being written
    done = {}
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        result = os.path.join(experiment, trial["relative_logdir"], "result.json")
        if trial["status"] == "TERMINATED" and os.path.isfile(result):
            done[trial["relative_logdir"]] = open(result).read()
    return done


def test_interrupted_search_restores_without_redoing_finished_trials(prepared, ray_cluster):
    root = prepared
    stage = _search_stage(root, num_samples=6, asha=None, max_concurrent_trials=1)
    path = _write(root, _config(root, {"resume": stage}), "resume.yaml")
    # run.lease_ttl_seconds: the killed driver still holds the run's lease; the rerun (--wait) takes it
    # over once its heartbeat is 5 s old.
    command = [sys.executable, "-m", "alloylm.cli", "search", str(path), "resume", "run.lease_ttl_seconds=5"]
    # The drivers join the session's cluster; killing a driver ends its Tune trials (Ray owns them by driver).
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"  # Tune saves its experiment state every second, so the test sees progress
    searches = root / "runs" / "ms" / "searches"
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finished: dict[str, str] = {}
    try:
        while first.poll() is None:
            experiments = [os.path.join(searches, d, "tune") for d in os.listdir(searches) if d.startswith("resume-")] if searches.exists() else []
            finished = _finished_trials(experiments[0]) if experiments else {}
            if len(finished) >= 2:
                # Killed between two of Tune's copies of its state to the storage: stopped first
                # (its copying thread with it), and killed once what the storage holds is whole.
                # Killed during a copy, the state is not resumable and the search starts again
                # (the next test); this one is about a resume.
                os.kill(first.pid, signal.SIGSTOP)
                finished = _finished_trials(experiments[0])
                if len(finished) >= 2 and unresumable_reason(pafs.LocalFileSystem(), experiments[0], "tpe") is None:
                    break
                os.kill(first.pid, signal.SIGCONT)
            time.sleep(0.5)
        assert first.poll() is None, "the first search ended before it could be interrupted"
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    saved = root / "resume-saved"
    shutil.copytree(experiments[0], saved)  # the interrupted state, for the checks at the end
    uri = str(root / "runs" / "ms" / "stages" / "resume")
    assert not storage.is_complete(uri)
    second = subprocess.run([*command, "--wait"], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "took over from a holder that stopped renewing it" in second.stderr, second.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(uri, "search", "trials.jsonl"))]
    assert len(rows) == 6
    experiment = [os.path.join(searches, d, "tune") for d in os.listdir(searches) if d.startswith("resume-")][0]
    for trial, text in finished.items():
        # A finished trial is not run again: its results are byte for byte what they were.
        assert open(os.path.join(experiment, trial, "result.json")).read() == text, trial

    # What a driver stopped while Tune copies its state leaves behind is told from a whole state.
    fs = pafs.LocalFileSystem()
    assert unresumable_reason(fs, str(saved), "tpe") is None
    [searcher_state] = saved.glob("searcher-state-*.pkl")
    kept = searcher_state.read_bytes()
    searcher_state.write_bytes(kept[: len(kept) // 2])  # a copy cut short
    assert f"{searcher_state.name} is unreadable" in unresumable_reason(fs, str(saved), "tpe")
    searcher_state.unlink()  # never copied
    assert unresumable_reason(fs, str(saved), "tpe") == "the searcher's state never reached the storage"
    searcher_state.write_bytes(kept)
    [experiment_state] = saved.glob("experiment_state-*.json")
    state = json.loads(experiment_state.read_text())
    state["trial_data"].append(state["trial_data"][-1])  # the trials copied after a newer suggestion than the searcher's
    experiment_state.write_text(json.dumps(state))
    assert "one copy older than the other" in unresumable_reason(fs, str(saved), "tpe")


def test_a_search_whose_saved_state_is_not_whole_starts_again(prepared, caplog):
    """An interrupted search whose state Tune had not finished copying is searched again from the
    start rather than resumed from half a state (which failed in Optuna, on every retry)."""
    from alloylm.merge.stage import merge_stage

    root = prepared
    config = _load(root, {"restart": _search_stage(root, searcher="grid", asha=None, objective={"max_items": 4})}, name="restart.yaml")
    first = merge_stage(config, "restart")
    [experiment] = (root / "runs" / "ms" / "searches").glob("restart-*/tune")
    [state] = experiment.glob("basic-variant-state-*.json")
    state.write_bytes(b"")  # as a driver killed during Tune's copy left it
    storage.remove(os.path.join(config.run_uri, "stages", "restart"))  # the stage unfinished again
    with caplog.at_level("WARNING", logger="alloylm.merge"):
        again = merge_stage(config, "restart")
    assert f"cannot be resumed: {state.name} is unreadable" in caplog.text
    assert again["fingerprint"] == first["fingerprint"] and again["metrics"]["best_score"] == first["metrics"]["best_score"]
    assert storage.exists(os.path.join(config.run_uri, "stages", "restart", "best_merge.yaml"))
    [state] = experiment.glob("basic-variant-state-*.json")
    assert state.stat().st_size > 0  # a new experiment in its place


def _merged(root, config, name: str) -> tuple[dict, dict, dict]:
    out = os.path.join(config.run_uri, "stages", name)
    return _state_dict(out), _state_dict(str(root / "parent-a")), _state_dict(str(root / "parent-b"))


def _slerp(t: float, v0, v1):
    """SLERP of two whole tensors as mergekit computes it (the angle between the flattened, normalised
    tensors; the tensors themselves are interpolated), written out here from the formula."""
    import math

    import torch

    a, b = v0.double(), v1.double()
    cos = float((a / a.norm() * (b / b.norm())).sum())
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def test_fixed_merge_from_parameters_is_the_papers_layer_wise_slerp(prepared, monkeypatch):
    """The paper configs' dpo-slerp stage: kind merge, the second parent as base (t=0), the paper's
    gradients. pico-llama has 2 layers: mergekit spreads the 5 anchors over them, so layer 0 takes
    the first anchor and layer 1 the last; other tensors take `default`."""
    from alloylm.merge.stage import merge_stage

    root = prepared
    stages = {"dpo-slerp": {
        "kind": "merge", "parents": [str(root / "parent-a"), str(root / "parent-b")], "base": str(root / "parent-b"),
        "tokenizer_from": str(root / "parent-b"), "method": "slerp", "parameters": PAPER_POINT,
    }}
    config = _load(root, stages, name="dpo-slerp.yaml")
    _parents_not_read_here(monkeypatch)
    manifest = merge_stage(config, "dpo-slerp")
    assert manifest["stage_kind"] == "merge"
    merged, a, b = _merged(root, config, "dpo-slerp")
    # base (t = 0) is parent-b, the other end (t = 1) is parent-a
    for layer, (attention_end, mlp_end) in enumerate([(b, a), (a, b)]):
        q, up = f"model.layers.{layer}.self_attn.q_proj.weight", f"model.layers.{layer}.mlp.up_proj.weight"
        assert torch.equal(merged[q], attention_end[q]), q
        assert torch.equal(merged[up], mlp_end[up]), up
    embed = "model.embed_tokens.weight"
    expected = _slerp(0.5, b[embed], a[embed])
    assert (merged[embed].double() - expected).abs().max() < 1e-5
    assert not torch.equal(merged[embed], a[embed]) and not torch.equal(merged[embed], b[embed])
    out = os.path.join(config.run_uri, "stages", "dpo-slerp")
    assert yaml.safe_load(open(os.path.join(out, "merge.yaml")))["base_model"] == str(root / "parent-b")


def test_a_random_merge_method_is_seeded_by_the_run(prepared):
    """dare_ties draws random masks: the stage seeds them with the run's seed, so two runs of one
    config write the same model, another seed another one, and merge.yaml says how mergekit repeats it."""
    from alloylm.merge.stage import merge_stage

    root = prepared
    stage = {"kind": "merge", "parents": [str(root / "parent-a"), str(root / "parent-b")], "base": str(root / "parent-b"),
             "method": "dare_ties", "model_parameters": {str(root / "parent-a"): {"weight": 0.8, "density": 0.5}}}
    merged = {}
    for label, seed in (("first", 7), ("again", 7), ("other", 8)):
        config = _load(root, {"dare": stage}, name=f"dare-{label}.yaml", seed=seed)
        config = config.model_copy(update={"storage": str(root / f"runs-dare-{label}")})
        merge_stage(config, "dare")
        merged[label] = _merged(root, config, "dare")[0]
        if label == "first":
            text = open(os.path.join(config.run_uri, "stages", "dare", "merge.yaml")).read()
            assert "--random-seed 7" in text
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged["first"][key], merged["again"][key])
    assert not torch.equal(merged["first"][key], merged["other"][key])


def test_what_changes_a_search_result_changes_its_fingerprint(prepared):
    """The objective's evaluation settings (here `evaluate.seed`, which draws the items) and, for a
    searcher that learns from finished trials, how many run at once: a changed one reruns the search
    instead of reusing the old best; a grid's concurrency changes nothing and reuses it."""
    from alloylm.merge.stage import merge_fingerprint, merge_stage

    root = prepared
    grid = _search_stage(root, searcher="grid", asha=None, objective={"max_items": 4})
    config = _load(root, {"fp-merged": grid}, name="fp.yaml")
    first = merge_stage(config, "fp-merged")
    assert merge_stage(config, "fp-merged")["fingerprint"] == first["fingerprint"]  # up to date
    # evaluate.dtype is the dtype `alloylm eval` loads a variant in; trials score the merge in memory
    # in the stage's dtype, so it changes nothing here (it reran every search).
    raw = _config(root, {"fp-merged": grid}, overwrite=True)
    raw["evaluate"]["dtype"] = "bfloat16"
    assert merge_stage(load_config(_write(root, raw, "fp-dtype.yaml")), "fp-merged")["fingerprint"] == first["fingerprint"]
    raw["evaluate"].pop("dtype")
    raw["evaluate"]["seed"] = 5
    reseeded = load_config(_write(root, raw, "fp-seed.yaml"))
    assert merge_stage(reseeded, "fp-merged")["fingerprint"] != first["fingerprint"]
    # The same run moved to another folder (or from local storage to S3) is the same search: the
    # objective's data are known by their content, not where they are (they reran every search).
    from alloylm.merge.stage import _objective, _parents, _search_inputs

    moved_root = root / "moved"
    shutil.copytree(root / "runs" / "ms", moved_root / "ms")
    raw = _config(root, {"fp-merged": grid}, storage=str(moved_root))
    raw["evaluate"]["seed"] = 5
    moved = load_config(_write(root, raw, "fp-moved.yaml"))
    done = storage.read_manifest(os.path.join(moved.run_uri, "stages", "fp-merged"))
    assert merge_stage(moved, "fp-merged") == done
    # Searched before that (the data known by location): still up to date where it was made. The
    # earlier objective written out as the code before 2026-12-05 had it.
    from alloylm.evaluate.config import SCORING_VERSION

    eval_config, eval_data = _search_inputs(reseeded, "fp-merged")
    earlier = [SCORING_VERSION, eval_config.model_dump(mode="json", exclude={"resources", "batch_size", "dtype"}), eval_data.fingerprints]
    assert _objective((eval_config, eval_data), by_location=True) == earlier
    before = merge_fingerprint(reseeded, "fp-merged", _parents(reseeded, reseeded.stages["fp-merged"])[1], earlier)
    assert before != done["fingerprint"]
    manifest = os.path.join(reseeded.run_uri, "stages", "fp-merged", storage.MANIFEST_NAME)
    made_before = {**storage.read_manifest(os.path.dirname(manifest)), "fingerprint": before}
    storage.write_text(manifest, json.dumps(made_before))
    assert merge_stage(reseeded, "fp-merged") == made_before

    def fp(stage: dict) -> str:
        return merge_fingerprint(_load(root, {"merged": stage}, name="fp-only.yaml"), "merged", ["a", "b"])

    tpe = _search_stage(root, max_concurrent_trials=1)
    assert fp(tpe) != fp({**tpe, "search": {**tpe["search"], "max_concurrent_trials": 2}})
    assert fp(grid) == fp({**grid, "search": {**grid["search"], "max_concurrent_trials": 2}})
    # A GPU changes the device the trials and the written model are merged on; CPUs change nothing.
    assert fp(grid) != fp({**grid, "resources": {"num_gpus": 1}})
    assert fp(grid) == fp({**grid, "resources": {"num_cpus": 2}})


def test_a_merge_task_that_wrote_no_model_here_leaves_no_manifest(prepared, monkeypatch):
    """On a multi-node cluster with a local run folder the merge task writes on its own node: the
    stage must fail naming that, not publish a manifest over a folder without the model."""
    import alloylm.merge.stage as stage_module
    from alloylm.errors import StageError

    root = prepared
    parents = [str(root / "parent-a"), str(root / "parent-b")]
    wrote_elsewhere = {"merge_seconds": 0.0, "device": "cpu", "method": "slerp", "yaml_text": "merge_method: slerp\n", "parent_dirs": parents}
    monkeypatch.setattr(stage_module, "_on_cluster", lambda *args, **kwargs: dict(wrote_elsewhere))
    stages = {"elsewhere": {"kind": "merge", "parents": parents, "method": "slerp", "parameters": {"t": 0.5}}}
    config = _load(root, stages, name="elsewhere.yaml")
    with pytest.raises(StageError, match="the merged model is not at .* after the merge task"):
        stage_module.merge_stage(config, "elsewhere")
    assert storage.read_manifest(os.path.join(config.run_uri, "stages", "elsewhere")) is None


def _rows(config, name: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(config.run_uri, "stages", name, "search", "trials.jsonl"))]


def _searcher_state(config, name: str, pattern: str) -> list[str]:
    """The searcher state files Tune saved with the experiment (in the stage's tune/ copy)."""
    import glob

    return glob.glob(os.path.join(config.run_uri, "stages", name, "search", "tune", pattern))


def test_cmaes_search_over_model_space_weights(prepared):
    """Optuna's CMA-ES over per-parent `weight`s of a linear merge (`model_space`): the given point
    is tried first, the searcher is CMA-ES, and the stage's model is the linear merge with the top
    trial's weights, checked against a hand calculation (mergekit normalises the weights)."""
    from alloylm.merge.stage import merge_stage

    root = prepared
    a_name, b_name = str(root / "parent-a"), str(root / "parent-b")
    stage = {
        "kind": "merge_search", "parents": [a_name, b_name], "method": "linear",
        "search": {
            "model_space": {a_name: {"weight": {"low": 0.1, "high": 1.0}}, b_name: {"weight": {"low": 0.1, "high": 1.0}}},
            "points": [{"model_parameters": {a_name: {"weight": 0.9}, b_name: {"weight": 0.2}}}],
            "searcher": "cmaes", "num_samples": 2, "max_concurrent_trials": 1, "objective": {"max_items": 4},
        },
    }
    config = _load(root, {"cmaes": stage}, name="cmaes.yaml")
    merge_stage(config, "cmaes")
    rows = _rows(config, "cmaes")
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows)
    weights = [(r["params"]["model_parameters"][a_name]["weight"], r["params"]["model_parameters"][b_name]["weight"]) for r in rows]
    assert weights[0] == (0.9, 0.2)
    assert len(set(weights)) == 2 and all(0.1 <= w <= 1.0 for pair in weights for w in pair)
    import cloudpickle

    (state,) = _searcher_state(config, "cmaes", "searcher-state-*.pkl")  # OptunaSearch's saved attributes
    with open(state, "rb") as f:
        assert type(cloudpickle.load(f)["_sampler"]).__name__ == "CmaEsSampler"

    top = max(rows, key=lambda r: r["score"])
    wa, wb = (top["params"]["model_parameters"][n]["weight"] for n in (a_name, b_name))
    merged, a, b = _merged(root, config, "cmaes")
    name = "model.layers.1.self_attn.o_proj.weight"
    assert (merged[name] - (wa * a[name] + wb * b[name]) / (wa + wb)).abs().max() < 1e-6


def test_random_search_samples_within_bounds_after_its_points(prepared):
    """Tune's random search: the point first, then uniform samples within the bounds, one trial at a
    time as `max_concurrent_trials: 1` says (so every trial ran in the one reused trial process)."""
    from alloylm.merge.stage import merge_stage

    root = prepared
    stage = _search_stage(root, searcher="random", num_samples=2, asha=None, max_concurrent_trials=1,
                          space={"t": {"low": 0.2, "high": 0.4}}, points=[{"t": 0.25}], objective={"max_items": 4})
    config = _load(root, {"random": stage}, name="random.yaml")
    merge_stage(config, "random")
    rows = _rows(config, "random")
    ts = [r["params"]["parameters"]["t"] for r in rows]
    assert len(rows) == 2 and ts[0] == 0.25
    assert len(set(ts)) == 2 and all(0.2 <= t <= 0.4 for t in ts), ts
    # Tune's BasicVariantGenerator ran (its own state file), not an Optuna searcher.
    assert _searcher_state(config, "random", "basic-variant-state-*.json") and not _searcher_state(config, "random", "searcher-state-*.pkl")
    tune_dir = os.path.join(config.run_uri, "stages", "random", "search", "tune")
    pids = {json.loads(open(os.path.join(tune_dir, d, "result.json")).readline())["pid"] for d in os.listdir(tune_dir) if d.startswith("run_trial_")}
    assert len(pids) == 1, pids
    summary = json.load(open(os.path.join(config.run_uri, "stages", "random", "merge_summary.json")))
    assert summary["best_params"]["parameters"]["t"] == max(rows, key=lambda r: r["score"])["params"]["parameters"]["t"]


def test_cli_data_only_merge_eval_and_report(prepared, capsys):
    """`alloylm data --only`, `merge`, `eval` and `report`, in process on the session's cluster (here
    to reuse this module's parents). A run of its own takes parent-a's tokenizer: `data --only bench`
    prepares the tokenizer and that data set and no other; `merge` writes the fixed stage; `eval`
    scores it (the score it prints is the one results.json holds, on the test split); `report`
    renders it."""
    from alloylm.cli import main

    root = prepared
    a, b = str(root / "parent-a"), str(root / "parent-b")
    raw = _config(root, {"lin": {"kind": "merge", "parents": [a, b], "method": "linear", "model_parameters": {a: {"weight": 0.3}, b: {"weight": 0.7}}}})
    raw["experiment"] = "cli"
    raw["tokenizer"] = {"from": a}
    raw["evaluate"]["variants"] = ["lin"]
    raw["evaluate"]["max_items"] = 4
    raw["evaluate"]["suites"]["short_answer"] = {"enabled": False}
    path = str(_write(root, raw, "cli.yaml"))
    run = root / "runs" / "cli"

    def command(*argv: str) -> dict:
        assert main(list(argv)) == 0
        out = capsys.readouterr().out
        return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]

    prepared_now = command("data", path, "--only", "bench")
    assert set(prepared_now) == {"bench"}  # the data sets' counts (the tokenizer is made too)
    assert storage.is_complete(str(run / "tokenizer")) and storage.is_complete(str(run / "data" / "bench")) and not (run / "data" / "text").exists() and not (run / "data" / "chat").exists()

    merged = command("merge", path, "lin")
    assert merged["stage"] == "lin" and storage.is_complete(merged["model"])
    assert os.path.exists(os.path.join(merged["model"], "merge.yaml"))

    scored = command("eval", path)
    assert scored["failed"] == {} and set(scored["scores"]) == {"lin"}
    for variant, score in scored["scores"].items():
        results = json.load(open(run / "eval" / variant / "results.json"))
        assert results["split"] == "test" and results["score"] == score and score is not None

    command("report", path)
    report = (run / "report" / "report.md").read_text()
    assert "lin" in report and (run / "report" / "report.html").exists()
