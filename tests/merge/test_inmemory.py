"""Tests of alloylm.merge: mergekit configs, compatibility checks, in-memory merges against the
folder mergekit writes (in-process and through the `mergekit-yaml` CLI), and the merged folder.

Parents are pico Llamas built in-process; they differ by the seed of their initialisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from alloylm.merge import (
    InMemoryMerger,
    MergeInputError,
    check_compatible,
    known_methods,
    materialize,
    mergekit_config,
    read_mergekit_yaml,
    write_mergekit_yaml,
)
from alloylm.models import build_model, preset_config, save_model, train_tokenizer
from mergekit.merge_methods.slerp import slerp

_CORPUS = [
    "Nacre is a composite of aragonite platelets and a protein matrix; its toughness is high.",
    "Spider silk combines strength and extensibility through hierarchical beta-sheet crystals.",
    "The Young's modulus of cortical bone is about 18 GPa, its density about 1.9 g/cm3.",
    "Collagen fibrils assemble into fibres, which assemble into tendons and ligaments.",
] * 8
NAMES = ["dpo", "instruct"]
# The "instruct" parent's own chat template and generation settings, which materialize must keep.
_INSTRUCT_TEMPLATE_MARK = "{# instruct parent's template #}"
_INSTRUCT_MAX_NEW_TOKENS = 7
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_CORPUS, vocab_size=320, model_max_length=128)


def _save(model, tokenizer, folder: Path) -> str:
    save_model(model, tokenizer, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tokenizer):
    """Two pico-llama folders: "dpo" (seed 0) and "instruct" (seed 1, its own chat template,
    generation config and eos id)."""
    root = tmp_path_factory.mktemp("parents")
    dpo = _save(build_model("pico-llama", tokenizer, seed=0), tokenizer, root / "dpo")
    instruct_tok = train_tokenizer(_CORPUS, vocab_size=320, model_max_length=128)
    instruct_tok.chat_template = _INSTRUCT_TEMPLATE_MARK + instruct_tok.chat_template
    instruct_model = build_model("pico-llama", tokenizer, seed=1)
    instruct_model.generation_config.max_new_tokens = _INSTRUCT_MAX_NEW_TOKENS
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    instruct_model.config.eos_token_id = im_end
    instruct = _save(instruct_model, instruct_tok, root / "instruct")
    return [dpo, instruct]


@pytest.fixture(scope="module", params=[False, True], ids=["lazy-reads", "parents-in-memory"])
def merger(request, parents):
    """Both ways of reading the parents: mergekit's LoaderCache on every merge (the CPU default),
    and the parents' tensors read once and handed to mergekit's executor (the accelerator default)."""
    return InMemoryMerger(parents, names=NAMES, keep_parents_in_memory=request.param)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_same_tensors(model, folder: str) -> None:
    on_disk = _tensors(folder)
    in_memory = model.state_dict()
    assert set(on_disk) == set(in_memory)
    for name, tensor in on_disk.items():
        # Bit-exact: the same mergekit code runs on the same inputs in the same order.
        assert torch.equal(in_memory[name], tensor), name


# ----------------------------------------------------------------------------- configs


def test_slerp_config_is_the_documented_slices_form(parents):
    cfg = mergekit_config(
        "slerp", parents, names=NAMES,
        parameters={"t": {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}},
    )
    assert cfg["merge_method"] == "slerp"
    assert cfg["base_model"] == parents[0]
    assert cfg["slices"] == [{"sources": [{"model": p, "layer_range": [0, 2]} for p in parents]}]
    assert cfg["parameters"]["t"] == [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    assert "models" not in cfg


def test_linear_config_uses_models_and_per_model_parameters(parents):
    cfg = mergekit_config("linear", parents, names=NAMES, model_parameters={"dpo": {"weight": 0.6}, "instruct": {"weight": 0.4}})
    assert "base_model" not in cfg
    assert cfg["models"] == [
        {"model": parents[0], "parameters": {"weight": 0.6}},
        {"model": parents[1], "parameters": {"weight": 0.4}},
    ]


def test_unknown_method_lists_the_known_ones(parents):
    with pytest.raises(MergeInputError, match="unknown merge method 'slurp'.*slerp") as err:
        mergekit_config("slurp", parents, names=NAMES)
    assert "ties" in str(err.value) and "ties" in known_methods()


def test_slerp_without_t_names_the_parameter(parents):
    with pytest.raises(MergeInputError, match="'slerp' needs parameter 't'"):
        mergekit_config("slerp", parents, names=NAMES)
    with pytest.raises(MergeInputError, match="parameters.t: a gradient by filter needs a 'default'"):
        mergekit_config("slerp", parents, names=NAMES, parameters={"t": {"self_attn": [0, 1]}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "ties", "model_parameters": {"instruct": {"density": 0.5}}}, "needs parameter 'weight' for parent 'instruct'"),
        ({"method": "linear", "model_parameters": {"dpo": {"weigth": 0.5}}}, r"model_parameters\['dpo'\].weigth: merge method 'linear' has no parameter 'weigth'"),
        ({"method": "linear", "model_parameters": {"sft": {"weight": 0.5}}}, "'sft', which is not a parent"),
        ({"method": "slerp", "parameters": {"t": 0.5}, "model_parameters": {"instruct": {"t": 0.2}}}, "'t' is a method-level parameter"),
        ({"method": "ties", "model_parameters": {"dpo": {"weight": 1.0}, "instruct": {"weight": 1.0}}}, "does not apply to the base model 'dpo'"),
        ({"method": "slerp", "parameters": {"t": "half"}}, "parameters.t: 'half' is not a valid t"),
        ({"method": "slerp", "parameters": {"t": 0.5}, "base": 2}, "base must be the index of one of the 2 parents"),
    ],
)
def test_bad_parameters_name_the_problem(parents, kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(MergeInputError, match=message):
        mergekit_config(method, parents, names=NAMES, **kwargs)


def test_mergekit_schema_errors_become_merge_input_errors(tmp_path, parents):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": parents[0]}], "slices": [{"sources": []}]}))
    with pytest.raises(MergeInputError, match=f"{bad}.*Exactly one of 'models', 'slices', or 'modules'"):
        read_mergekit_yaml(str(bad))
    broken = tmp_path / "broken.yml"
    broken.write_text("merge_method: [unclosed\n")
    with pytest.raises(MergeInputError, match=f"{broken} is not valid YAML"):
        read_mergekit_yaml(str(broken))


def test_read_mergekit_yaml_resolves_stage_names(tmp_path, parents):
    user = tmp_path / "user.yml"
    user.write_text(
        "merge_method: slerp\nbase_model: dpo\n"
        "slices:\n  - sources:\n      - {model: dpo, layer_range: [0, 2]}\n      - {model: instruct, layer_range: [0, 2]}\n"
        "parameters:\n  t: [0, 1]\ndtype: float32\n"
    )
    cfg = read_mergekit_yaml(str(user), stage_dirs={"dpo": parents[0], "instruct": parents[1]})
    assert cfg["base_model"] == parents[0]
    assert [s["model"] for s in cfg["slices"][0]["sources"]] == parents
    assert cfg["parameters"] == {"t": [0, 1]}


# ----------------------------------------------------------------------------- compatibility


def test_compatible_parents_pass(parents):
    check_compatible(parents, NAMES)


def _preset_folder(root: Path, preset: str, tokenizer, seed: int = 0) -> str:
    return _save(build_model(preset, tokenizer, seed=seed), tokenizer, root / f"{preset}-{len(tokenizer)}-{seed}")


def test_different_architectures_are_named(tmp_path, tokenizer):
    llama = _preset_folder(tmp_path, "tiny-llama", tokenizer)
    mistral = _preset_folder(tmp_path, "tiny-mistral", tokenizer)
    with pytest.raises(MergeInputError, match=r"parents 'base' and 'other' differ: architecture llama \['LlamaForCausalLM'\] vs mistral \['MistralForCausalLM'\]"):
        check_compatible([llama, mistral], ["base", "other"])


def test_different_shapes_are_named(tmp_path, tokenizer, parents):
    tiny = _preset_folder(tmp_path, "tiny-llama", tokenizer)
    with pytest.raises(MergeInputError, match=r"parents 'dpo' and 'tiny' differ: lm_head.weight has shape \[\d+, 32\] vs \[\d+, 64\]"):
        check_compatible([parents[0], tiny], ["dpo", "tiny"])


def test_different_vocabularies_are_named(tmp_path, tokenizer, parents):
    bigger = train_tokenizer(_CORPUS * 2 + ["tendon ligament keratin chitin"] * 4, vocab_size=400, model_max_length=128)
    assert len(bigger) != len(tokenizer)
    other = _preset_folder(tmp_path, "pico-llama", bigger)
    with pytest.raises(MergeInputError, match=rf"parents 'dpo' and 'other' differ: vocabulary size \(config vocab_size\) {len(tokenizer)} vs {len(bigger)}"):
        check_compatible([parents[0], other], ["dpo", "other"])


def test_same_size_different_tokens_are_named(tmp_path, tokenizer, parents):
    other_tok = train_tokenizer([t.upper() for t in _CORPUS], vocab_size=320, model_max_length=128)
    folder = tmp_path / "upper"
    # Same vocabulary size as the parents (checked), different tokens.
    model = build_model("pico-llama", tokenizer, seed=3)
    save_model(model, other_tok, str(folder))
    if len(other_tok) != len(tokenizer):
        pytest.skip("the upper-case corpus gave a different vocabulary size")
    with pytest.raises(MergeInputError, match=r"parents 'dpo' and 'upper' differ: vocabulary: token id \d+ is"):
        check_compatible([parents[0], str(folder)], ["dpo", "upper"])


def test_in_memory_merger_checks_its_parents(tmp_path, tokenizer, parents):
    tiny = _preset_folder(tmp_path, "tiny-llama", tokenizer)
    with pytest.raises(MergeInputError, match="parents 'dpo' and 'tiny' differ"):
        InMemoryMerger([parents[0], tiny], names=["dpo", "tiny"])


# ----------------------------------------------------------------------------- in memory == on disk

_METHODS = {
    "slerp": dict(parameters={"t": 0.35}),
    "slerp-gradient": dict(parameters={"t": {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}}),
    "linear": dict(model_parameters={"dpo": {"weight": 0.6}, "instruct": {"weight": 0.4}}),
    "task_arithmetic": dict(model_parameters={"instruct": {"weight": 0.7}}),
    "ties": dict(model_parameters={"instruct": {"weight": 0.8, "density": 0.5}}),
    # DARE drops delta entries at random (torch.bernoulli): equal only under the same seed.
    "dare_ties": dict(model_parameters={"instruct": {"weight": 0.8, "density": 0.5}}),
    # Any other mergekit method, by name.
    "nuslerp": dict(model_parameters={"dpo": {"weight": 0.3}, "instruct": {"weight": 0.7}}),
}


def _config(parents, case: str) -> dict:
    return mergekit_config(case.split("-")[0], parents, names=NAMES, **_METHODS[case])


@pytest.mark.parametrize("case", sorted(_METHODS))
def test_in_memory_merge_equals_the_materialized_folder(tmp_path, parents, merger, case):
    cfg = _config(parents, case)
    seed = 1234 if case == "dare_ties" else None
    model = merger.merge(cfg, random_seed=seed)
    out = materialize(cfg, str(tmp_path / case), tokenizer_from=parents[1], random_seed=seed)
    _assert_same_tensors(model, out)
    # The merge is a real mix: neither parent's tensors.
    head = "lm_head.weight"
    assert not torch.equal(model.state_dict()[head], _tensors(parents[0])[head])
    assert not torch.equal(model.state_dict()[head], _tensors(parents[1])[head])


def test_dare_depends_on_its_seed(parents, merger):
    cfg = _config(parents, "dare_ties")
    q = "model.layers.0.mlp.up_proj.weight"
    first = merger.merge(cfg, random_seed=1).state_dict()[q].clone()
    again = merger.merge(cfg, random_seed=1).state_dict()[q].clone()
    other = merger.merge(cfg, random_seed=2).state_dict()[q].clone()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_in_memory_model_is_reused_and_matches_the_loaded_folder(tmp_path, tokenizer, parents, merger):
    cfg = _config(parents, "slerp-gradient")
    model = merger.merge(cfg)
    assert merger.merge(_config(parents, "linear")) is model  # one instance, weights replaced
    model = merger.merge(cfg)
    out = materialize(cfg, str(tmp_path / "merged"), tokenizer_from=parents[1])
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer(_CORPUS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert not model.training


def test_slerp_endpoints_are_the_parents(parents, merger):
    # After other merges, so stale weights or parent tensors changed in place would show here.
    merger.merge(_config(parents, "ties"))
    for t, parent in ((0.0, parents[0]), (1.0, parents[1])):
        state = merger.merge(mergekit_config("slerp", parents, names=NAMES, parameters={"t": t})).state_dict()
        for name, tensor in _tensors(parent).items():
            assert torch.equal(state[name], tensor), (t, name)


def test_layer_wise_gradient_puts_the_interpolated_t_on_each_layer(tmp_path, tokenizer):
    """mergekit's documented semantics: the anchors are spread evenly over the layers and each
    layer takes the linear interpolation at its position; tensors no filter names take "default"."""
    layers = 4
    folders = []
    for seed in (0, 1):
        config = preset_config("pico-llama", vocab_size=len(tokenizer))
        config.num_hidden_layers = layers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        folders.append(_save(model, tokenizer, tmp_path / f"four-{seed}"))
    anchors = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
    cfg = mergekit_config("slerp", folders, names=["a", "b"], parameters={"t": anchors | {"default": 0.25}})
    merged = InMemoryMerger(folders, names=["a", "b"]).merge(cfg).state_dict()
    base, other = _tensors(folders[0]), _tensors(folders[1])

    def expect(name: str, t: float) -> None:
        # mergekit's slerp takes a batch of tensors (its leading axis) and interpolates each
        # whole tensor of the batch: here a batch of one.
        want = slerp(torch.tensor([t]), base[name][None], other[name][None])[0]
        # t comes from np.interp here and from mergekit's own interpolation there: the same
        # value up to float rounding, hence allclose rather than equal.
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)

    positions = np.linspace(0, 1, 5)
    seen = set()
    for layer in range(layers):
        where = layer / (layers - 1)
        for part, values in anchors.items():
            t = float(np.interp(where, positions, values))
            for name in base:
                if name.startswith(f"model.layers.{layer}.{part}."):
                    expect(name, t)
                    seen.add(name)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expect(f"model.layers.{layer}.{norm}.weight", 0.25)
            seen.add(f"model.layers.{layer}.{norm}.weight")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        expect(name, 0.25)
        seen.add(name)
    assert seen == set(base)
    # Layer 1 sits at 1/3 of the way: between anchors 0.5 and 0.3, not on either.
    assert abs(float(np.interp(1 / 3, positions, anchors["self_attn"])) - 13 / 30) < 1e-9


def test_in_memory_rejects_configs_over_other_models(tmp_path, tokenizer, parents, merger):
    stranger = _preset_folder(tmp_path, "pico-llama", tokenizer, seed=9)
    cfg = mergekit_config("slerp", [parents[0], stranger], names=["dpo", "stranger"], parameters={"t": 0.5})
    with pytest.raises(MergeInputError, match=f"{stranger}, which is not one of this merger's parents"):
        merger.merge(cfg)


# ----------------------------------------------------------------------------- the merged folder


def test_mergekit_yaml_cli_reproduces_materialize(tmp_path, parents):
    cfg = _config(parents, "dare_ties")
    path = tmp_path / "merge.yml"
    write_mergekit_yaml(cfg, str(path), random_seed=77)
    text = path.read_text()
    assert "--random-seed 77" in text.splitlines()[1]
    assert yaml.safe_load(text) == cfg
    ours = materialize(cfg, str(tmp_path / "ours"), tokenizer_from=parents[1], random_seed=77)
    theirs = tmp_path / "theirs"
    result = subprocess.run(
        [str(MERGEKIT_YAML), str(path), str(theirs), "--random-seed", "77", "--quiet"],
        capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = _tensors(ours), _tensors(str(theirs))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_materialize_keeps_the_chosen_parents_tokenizer_and_generates(tmp_path, parents):
    cfg = _config(parents, "slerp")  # base (and mergekit's own tokenizer donor): "dpo"
    out = materialize(cfg, str(tmp_path / "merged"), tokenizer_from=parents[1])
    tokenizer = AutoTokenizer.from_pretrained(out)
    instruct_tok = AutoTokenizer.from_pretrained(parents[1])
    assert tokenizer.chat_template.startswith(_INSTRUCT_TEMPLATE_MARK)
    assert tokenizer.get_vocab() == instruct_tok.get_vocab()
    assert tokenizer.eos_token == "<|end_of_text|>"
    config = AutoConfig.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.eos_token_id == im_end != AutoConfig.from_pretrained(parents[0]).eos_token_id
    generation = GenerationConfig.from_pretrained(out)
    assert generation.max_new_tokens == _INSTRUCT_MAX_NEW_TOKENS
    assert generation.eos_token_id == GenerationConfig.from_pretrained(parents[1]).eos_token_id
    assert yaml.safe_load((Path(out) / "mergekit_config.yml").read_text()) == cfg
    assert not list(tmp_path.glob(".merged.merging-*"))  # staging folder renamed away

    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is nacre?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_materialize_replaces_an_existing_folder(tmp_path, parents):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    materialize(_config(parents, "linear"), str(out), tokenizer_from=parents[0])
    assert not (out / "stale.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == AutoConfig.from_pretrained(parents[0]).eos_token_id


@pytest.mark.parametrize(("gpu_ids", "cuda", "device"), [([0], True, "cuda"), ([], True, "cpu"), ([0], False, "cpu")])
def test_the_merge_stage_writes_its_model_on_the_gpu_it_was_given(parents, tmp_path, monkeypatch, gpu_ids, cuda, device):
    """The merge stage's task merges on the GPU its resources gave it, as the search's trials do:
    on the CPU, a seeded random method (dare_ties) drew other masks than the trials had on the GPU,
    so the written model was not the one the search scored (measured on an H200:
    `benchmarks/gpu_paths.py`, dare_ties CUDA against CPU differ by up to 0.18, CUDA twice by 0)."""
    import ray

    import alloylm.merge.materializer as materializer
    from alloylm.config import RunConfig
    from alloylm.merge.stage import _materialize_task

    calls = []

    def record(config, out_dir, **kwargs):
        calls.append(kwargs)
        os.makedirs(out_dir)
        Path(out_dir, "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(materializer, "materialize", record)
    config = RunConfig.model_validate({
        "experiment": "gpu", "storage": str(tmp_path / "runs"), "tokenizer": {"from": parents[0]},
        "stages": {"merged": {"kind": "merge", "parents": parents, "tokenizer_from": parents[1], "method": "slerp", "parameters": {"t": 0.5}}},
    })
    result = _materialize_task(config, "merged", parents, None, str(tmp_path / "staging"), 5)
    assert result["device"] == device  # recorded in merge_summary.json and the manifest's metrics
    assert result["parent_dirs"] == parents and "merge_method: slerp" in result["yaml_text"]
    assert calls == [{"tokenizer_from": parents[1], "trust_remote_code": False, "random_seed": 5, "device": device}]
    assert (tmp_path / "staging" / "config.json").is_file()


def test_a_search_trial_scores_with_the_generation_settings_the_stages_model_takes(parents):
    """The written model takes its tokenizer and generation settings from `tokenizer_from`
    (materialize); a trial's in-memory model took them from the base model, so a search with
    base dpo and tokenizer_from instruct chose under settings the chosen model would not have."""
    from alloylm.config import MergeSearchStageConfig
    from alloylm.evaluate.config import EvalConfig
    from alloylm.merge import search

    stage = MergeSearchStageConfig.model_validate({
        "kind": "merge_search", "parents": NAMES, "base": "dpo", "tokenizer_from": "instruct",
        "search": {"space": {"t": {}}, "num_samples": 1},
    })
    job = search.TrialJob(stage=stage, parent_uris=tuple(parents), names=tuple(NAMES), eval_config=EvalConfig(variants=["m"]))
    try:
        state = search._worker_state(job)
        model = state["merger"].merge(search.mergekit_config_for(stage, parents, NAMES, {"t": 0.5}, {}))
        assert model.generation_config.max_new_tokens == _INSTRUCT_MAX_NEW_TOKENS
        assert state["tokenizer"].chat_template.startswith(_INSTRUCT_TEMPLATE_MARK)
    finally:
        search._WORKER.clear()
