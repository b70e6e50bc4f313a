"""Tests of alloylm.models: presets, the trained tokenizer and its chat template, loading/saving."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from alloylm import storage
from alloylm.models import (
    CHAT_TEMPLATE,
    PRESETS,
    build_model,
    classify_source,
    load_model,
    load_tokenizer,
    materialize_model_dir,
    preset_config,
    save_model,
    stop_token_ids,
    train_tokenizer,
)
from alloylm.models import loading

_CORPUS = [
    "Nacre is a composite of aragonite platelets and a protein matrix; its toughness is high.",
    "Spider silk combines strength and extensibility through hierarchical beta-sheet crystals.",
    "The Young's modulus of cortical bone is about 18 GPa, its density about 1.9 g/cm3.",
    "Collagen fibrils assemble into fibres, which assemble into tendons and ligaments.",
    "What is the toughness of nacre? It is about 10 MPa m^1/2, far above aragonite alone.",
] * 8

# Parameter counts at vocab 2048, recorded here; the ranges in the preset docs come from these.
_PARAMETERS_AT_VOCAB_2048 = {
    "pico-llama": 153_888,
    "tiny-llama": 353_088,
    "mini-llama": 1_250_432,
    "small-llama": 4_983_040,
    "tiny-mistral": 353_088,
}
_ARCHITECTURES = {
    "pico-llama": "LlamaForCausalLM",
    "tiny-llama": "LlamaForCausalLM",
    "mini-llama": "LlamaForCausalLM",
    "small-llama": "LlamaForCausalLM",
    "tiny-mistral": "MistralForCausalLM",
}

_CHAT = [
    {"role": "system", "content": "You answer questions about biological materials."},
    {"role": "user", "content": "What is nacre made of?"},
    {"role": "assistant", "content": "Aragonite platelets in a protein matrix."},
    {"role": "user", "content": "Is it tough?"},
    {"role": "assistant", "content": "Yes, very."},
]
# What the assistant turns of _CHAT train on: each answer and the <|im_end|> that closes it.
_ASSISTANT_TURNS = "Aragonite platelets in a protein matrix.<|im_end|>Yes, very.<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_CORPUS, vocab_size=512, model_max_length=256)


def _logits(model, tokenizer, text="Nacre is tough."):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- presets


def test_every_preset_is_recorded():
    assert set(PRESETS) == set(_PARAMETERS_AT_VOCAB_2048)


@pytest.mark.parametrize("name", sorted(_PARAMETERS_AT_VOCAB_2048))
def test_preset_parameter_count_and_architecture(name):
    from transformers import AutoModelForCausalLM

    config = preset_config(name, vocab_size=2048)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == _ARCHITECTURES[name]
    assert sum(p.numel() for p in model.parameters()) == _PARAMETERS_AT_VOCAB_2048[name]
    assert config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", sorted(_PARAMETERS_AT_VOCAB_2048))
def test_preset_builds_from_tokenizer_and_gives_a_finite_loss(name, tokenizer):
    model = build_model(name, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer(_CORPUS[0], return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    # An untrained model is near uniform: its loss is close to log(vocab).
    assert abs(out.loss.item() - torch.log(torch.tensor(float(len(tokenizer)))).item()) < 1.0


def test_tiny_mistral_uses_a_sliding_window_and_runs_past_it(tokenizer):
    model = build_model("tiny-mistral", tokenizer)
    window = model.config.sliding_window
    assert window == 128
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (1, window + 20), generator=generator)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'huge-llama'.*tiny-llama"):
        preset_config("huge-llama", vocab_size=2048)


def test_same_seed_same_weights_other_seed_other_weights(tokenizer):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("tiny-llama", tokenizer, seed=7)
    after = torch.rand(3)
    b = build_model("tiny-llama", tokenizer, seed=7)
    c = build_model("tiny-llama", tokenizer, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[q_proj], sc[q_proj])
    # Seeding the build leaves the caller's random stream where it was.
    assert torch.equal(before, after)


def test_build_model_dtype(tokenizer):
    model = build_model("pico-llama", tokenizer, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text(tokenizer):
    texts = [
        "plain ascii, with punctuation!?",
        "ünïcödé façade naïve — “quotes” …",
        "蜘蛛の糸は強い。 真珠层 🕷️🦀🧬",
        "tabs\tand\nnew\r\nlines   and trailing space ",
        "\x00\x01 control bytes and a lone surrogate-free 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token == "<|pad|>"
    names = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
    assert list(ids.values()) == [0, 1, 2, 3, 4]
    assert set(ids) <= set(tokenizer.all_special_tokens)
    # Each marker is one token, never split into bytes.
    assert tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][0] == 3
    assert tokenizer("x<|im_end|>", add_special_tokens=False)["input_ids"][-1] == 4
    assert tokenizer.model_max_length == 256
    assert stop_token_ids(tokenizer) == [1, 4]


def test_tokenizer_training_is_deterministic():
    a = train_tokenizer(_CORPUS, vocab_size=400)
    b = train_tokenizer(list(_CORPUS), vocab_size=400)
    c = train_tokenizer(["Keratin and chitin are structural biopolymers."] * 8, vocab_size=400)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert a.get_vocab() != c.get_vocab()


def test_tokenizer_learns_merges_and_checks_its_arguments():
    trained = train_tokenizer(_CORPUS, vocab_size=400)
    assert 261 < len(trained) <= 400
    # Merges learnt from the corpus shorten it well below one token per byte.
    assert len(trained(_CORPUS[0])["input_ids"]) < len(_CORPUS[0].encode()) / 2
    with pytest.raises(ValueError, match="at least 261"):
        train_tokenizer(_CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(_CORPUS, min_frequency=0)


def test_chat_template_renders_chatml(tokenizer):
    rendered = tokenizer.apply_chat_template(_CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|>"
        "<|im_start|>system\nYou answer questions about biological materials.<|im_end|>\n"
        "<|im_start|>user\nWhat is nacre made of?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tokenizer.apply_chat_template(_CHAT[:2], tokenize=False)
    assert not without.endswith("<|im_start|>assistant\n")
    full = tokenizer.apply_chat_template(_CHAT[:3], tokenize=False)
    # TRL splits prompt from completion by this prefix property.
    assert full.startswith(rendered)
    assert full[len(rendered):] == "Aragonite platelets in a protein matrix.<|im_end|>\n"


def test_assistant_mask_marks_exactly_the_assistant_content(tokenizer):
    out = tokenizer.apply_chat_template(
        _CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(masked) == _ASSISTANT_TURNS
    # Two contiguous spans, each ending on <|im_end|>.
    starts = [k for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1])]
    ends = [k for k in range(len(mask)) if mask[k] and (k == len(mask) - 1 or not mask[k + 1])]
    assert len(starts) == 2
    assert all(ids[e] == tokenizer.convert_tokens_to_ids("<|im_end|>") for e in ends)


def test_trl_sft_and_dpo_prepare_data_with_this_template(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    # activation_checkpointing as the stage's worker sets it: TRL's configs otherwise default to
    # checkpointing under transformers' deprecated name (a warning in 5.25)
    common = dict(
        report_to=[], max_steps=1, per_device_train_batch_size=1, use_cpu=True, save_strategy="no",
        activation_checkpointing=False,
    )
    sft = SFTTrainer(
        model=build_model("pico-llama", tokenizer),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), assistant_only_loss=True, **common),
        train_dataset=Dataset.from_list([{"messages": _CHAT}]),
        processing_class=tokenizer,
    )
    labels = [t for t in sft.train_dataset[0]["labels"] if t != -100]
    assert tokenizer.decode(labels) == _ASSISTANT_TURNS

    dpo = DPOTrainer(
        model=build_model("pico-llama", tokenizer),
        ref_model=build_model("pico-llama", tokenizer),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common),
        train_dataset=Dataset.from_list(
            [
                {
                    "prompt": _CHAT[1:2],
                    "chosen": [_CHAT[2]],
                    "rejected": [{"role": "assistant", "content": "Steel."}],
                }
            ]
        ),
        processing_class=tokenizer,
    )
    row = dpo.train_dataset[0]
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(row["chosen_ids"]) == _CHAT[2]["content"] + "<|im_end|>\n"
    assert tokenizer.decode(row["rejected_ids"]) == "Steel.<|im_end|>\n"


def test_generation_stops_at_im_end(tokenizer):
    model = build_model("pico-llama", tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, im_end]
    bias = torch.zeros(len(tokenizer))
    bias[im_end] = 1e4  # the model now always answers <|im_end|>
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)
    prompt = tokenizer.apply_chat_template(
        _CHAT[1:2], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [im_end]
    # Control: without <|im_end|> among the stop ids, generation runs to max_new_tokens.
    out = model.generate(
        **prompt, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id
    )
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [im_end] * 6


# ----------------------------------------------------------------------------- sources


def test_classify_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert classify_source("/models/x") == "local"
    assert classify_source("./x") == "local"
    assert classify_source("../x") == "local"
    assert classify_source("~/models/x") == "local"
    assert classify_source("file:///models/x") == "local"
    assert classify_source("my-model") == "local"  # exists on disk
    assert classify_source("s3://bucket/runs/exp/sft") == "s3"
    assert classify_source("meta-llama/Llama-3.1-8B-Instruct") == "hub"
    assert classify_source("HuggingFaceTB/SmolLM-1.7B") == "hub"
    for bad in ["tiny-llama", "a/b/c", "org/-name", "org/nm.", "org--x/y", "gs://b", "", "o/n m"]:
        with pytest.raises(ValueError, match="model source|unsupported"):
            classify_source(bad)


def test_a_model_from_outside_the_run_is_identified_by_its_files(tmp_path, s3_bucket):
    # A stage built on a model folder must go stale when that folder's model is replaced in place
    # (it was fingerprinted by its path alone, so the old stage was reused).
    folder = tmp_path / "parent"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"v1")
    before = loading.model_source_id(str(folder))
    assert before == loading.model_source_id(str(folder)) and before[0] == str(folder)
    (folder / "model.safetensors").write_bytes(b"v2 longer")
    assert loading.model_source_id(str(folder)) != before
    uri = f"s3://{s3_bucket}/models/parent"
    storage.write_text(f"{uri}/config.json", "{}")
    on_s3 = loading.model_source_id(uri)
    storage.write_text(f"{uri}/config.json", '{"changed": 1}')
    assert loading.model_source_id(uri) != on_s3
    # A Hub id is itself; a source that is not there is its name (loading it names the problem).
    assert loading.model_source_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert loading.model_source_id(str(tmp_path / "missing")) == str(tmp_path / "missing")


def test_materialize_local_requires_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        materialize_model_dir(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer.json").write_text("{}")
    missing = rf"{re.escape(str(empty))}.*config\.json is missing.*tokenizer\.json"
    with pytest.raises(FileNotFoundError, match=missing):
        materialize_model_dir(str(empty))
    assert materialize_model_dir("org/model") == "org/model"


def _hub_cache_with(tmp_path, repo: str, folder) -> str:
    """A Hugging Face cache (its own layout: refs/main names the snapshot) holding `folder` as `repo`."""
    import shutil

    cache = tmp_path / "hub-cache"
    entry = cache / ("models--" + repo.replace("/", "--"))
    revision = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    shutil.copytree(folder, entry / "snapshots" / revision)
    return str(cache)


def test_a_hub_id_becomes_a_local_folder_for_mergekit(saved_model, tmp_path, monkeypatch):
    """mergekit reads folders only: a Hub id parent (every paper config has one) is fetched into the
    Hugging Face cache; offline, as here, the cached snapshot is used and a missing one named."""
    import huggingface_hub.constants

    from alloylm.models.loading import local_model_dir

    _, folder = saved_model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", _hub_cache_with(tmp_path, "alloylm-test/tiny", folder))
    local = local_model_dir("alloylm-test/tiny")
    assert os.path.isfile(os.path.join(local, "config.json")) and os.path.isfile(os.path.join(local, "model.safetensors"))
    assert local_model_dir(str(folder)) == str(folder)
    with pytest.raises(OSError, match="cannot get alloylm-test/absent from the Hugging Face Hub"):
        local_model_dir("alloylm-test/absent")


def test_a_merge_stage_checks_a_hub_id_parent_like_a_folder(saved_model, tmp_path, monkeypatch):
    """The bug this guards: `check_compatible` got the Hub id itself and failed with "is not a
    folder" after every other stage of the paper configs had trained."""
    import huggingface_hub.constants

    from alloylm.config import RunConfig
    from alloylm.merge.stage import _check_parents, _local_dirs

    _, folder = saved_model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", _hub_cache_with(tmp_path, "alloylm-test/tiny", folder))
    config = RunConfig.model_validate({
        "experiment": "hub", "storage": str(tmp_path / "runs"), "tokenizer": {"from": str(folder)},
        "stages": {"merged": {"kind": "merge", "parents": [str(folder), "alloylm-test/tiny"], "method": "slerp", "parameters": {"t": 0.5}}},
    })
    uris = [str(folder), "alloylm-test/tiny"]
    dirs = _local_dirs(uris)
    _check_parents(config, "merged", uris, dirs)  # no error: the same model twice
    assert dirs[1] != "alloylm-test/tiny" and os.path.isdir(dirs[1])


@pytest.fixture(scope="module")
def saved_model(tokenizer, tmp_path_factory):
    model = build_model("tiny-llama", tokenizer, seed=3)
    folder = tmp_path_factory.mktemp("saved") / "model"
    save_model(model, tokenizer, str(folder))
    return model, folder


def test_local_save_and_load_round_trip(saved_model, tokenizer):
    model, folder = saved_model
    assert (folder / "model.safetensors").is_file()
    loaded = load_model(str(folder))
    loaded_tokenizer = load_tokenizer(str(folder))
    assert torch.equal(_logits(model, tokenizer), _logits(loaded, loaded_tokenizer))
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.model_max_length == 256
    assert (loaded_tokenizer.bos_token, loaded_tokenizer.eos_token, loaded_tokenizer.pad_token) == (
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token
    )
    rendered = tokenizer.apply_chat_template(_CHAT, tokenize=False)
    assert loaded_tokenizer.apply_chat_template(_CHAT, tokenize=False) == rendered
    assert loaded.generation_config.eos_token_id == stop_token_ids(tokenizer)


def test_load_model_dtype(saved_model):
    _, folder = saved_model
    assert load_model(str(folder), dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(str(folder), dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        load_model(str(folder), dtype="float33")


def test_save_model_replaces_an_existing_folder(tokenizer, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "stale.bin").write_text("old")
    model = build_model("pico-llama", tokenizer, seed=1)
    save_model(model, tokenizer, str(folder))
    assert not (folder / "stale.bin").exists()
    assert torch.equal(_logits(load_model(str(folder)), tokenizer), _logits(model, tokenizer))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind


def test_pickle_weights_are_refused(saved_model, tmp_path):
    _, folder = saved_model
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    # Not a valid pickle: the refusal must come before anything tries to read it.
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safetensors only"):
        load_model(str(pickled))


def test_remote_code_is_not_run_by_default(saved_model, tmp_path):
    _, folder = saved_model
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in folder.iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    sentinel = tmp_path / "remote-code-ran"
    config = json.loads((custom / "config.json").read_text())
    config["model_type"] = "alloylm-custom"
    config["auto_map"] = {
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomForCausalLM",
    }
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "custom_model.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig as CustomConfig\n"
        "from transformers import LlamaForCausalLM as CustomForCausalLM\n"
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(custom))
    assert not sentinel.exists()


def test_hub_id_offline_fails_fast_with_a_clear_message():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError) as err:
        load_model("some-org/some-model")
    message = str(err.value)
    assert "'some-org/some-model'" in message
    assert "Hugging Face Hub" in message
    assert "HF_HUB_OFFLINE=1" in message
    with pytest.raises(OSError, match="tokenizer of Hugging Face Hub model 'some-org/some-model'"):
        load_tokenizer("some-org/some-model")


@pytest.mark.s3
def test_load_from_s3_and_reuse_the_cache(saved_model, tokenizer, s3_bucket, tmp_path, monkeypatch):
    model, folder = saved_model
    uri = f"s3://{s3_bucket}/runs/exp/base"
    storage.upload_dir(str(folder), uri)
    cache = tmp_path / "cache"
    loaded = load_model(uri, cache_dir=str(cache))
    loaded_tokenizer = load_tokenizer(uri, cache_dir=str(cache))
    assert torch.equal(_logits(model, tokenizer), _logits(loaded, loaded_tokenizer))
    assert loaded_tokenizer.chat_template == CHAT_TEMPLATE
    assert len([p for p in cache.iterdir() if not p.name.endswith(".lock")]) == 1  # one complete copy, no partial folder left

    def no_download(*args, **kwargs):
        raise AssertionError("a cached S3 model was downloaded again")

    monkeypatch.setattr(loading.storage, "download_dir", no_download)
    again = load_model(uri, cache_dir=str(cache))
    assert torch.equal(_logits(model, tokenizer), _logits(again, tokenizer))
    monkeypatch.undo()

    # New weights uploaded in place (no manifest: a model from outside the run): a new copy, not
    # the cached old one, which a retrained stage would otherwise have been trained from.
    other = build_model("tiny-llama", tokenizer, seed=9)
    save_model(other, tokenizer, str(tmp_path / "other"))
    storage.upload_dir(str(tmp_path / "other"), uri)
    replaced = load_model(uri, cache_dir=str(cache))
    assert torch.equal(_logits(other, tokenizer), _logits(replaced, tokenizer))


@pytest.mark.s3
def test_the_workers_of_a_node_download_an_s3_model_once(saved_model, s3_bucket, tmp_path, monkeypatch):
    """Each of a node's workers (8 ranks on an 8-GPU node) downloaded the whole parent model into
    its own temporary folder, and all but the first copy were thrown away."""
    import threading
    import time

    _, folder = saved_model
    uri = f"s3://{s3_bucket}/runs/exp/parent"
    storage.upload_dir(str(folder), uri)
    downloads = []
    download = loading.storage.download_dir

    def counted(*args, **kwargs):
        downloads.append(args[0])
        time.sleep(0.5)  # long enough for the other workers to arrive meanwhile
        return download(*args, **kwargs)

    monkeypatch.setattr(loading.storage, "download_dir", counted)
    found: list[str] = []
    workers = [threading.Thread(target=lambda: found.append(loading._download_cached(uri, cache_dir=str(tmp_path / "cache")))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert downloads == [uri] and len(found) == 4 and len(set(found)) == 1
    assert os.path.isfile(os.path.join(found[0], "config.json"))


@pytest.mark.s3
def test_a_cache_on_a_file_system_without_locks_still_downloads(saved_model, s3_bucket, tmp_path, monkeypatch):
    """NFS without a lock daemon and some FUSE mounts refuse flock: the model is downloaded
    without the lock (each worker its own copy, the first rename wins) instead of failing."""
    import errno

    _, folder = saved_model
    uri = f"s3://{s3_bucket}/runs/exp/unlocked"
    storage.upload_dir(str(folder), uri)

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(loading.fcntl, "flock", no_locks)
    local = loading._download_cached(uri, cache_dir=str(tmp_path / "cache"))
    assert os.path.isfile(os.path.join(local, "config.json"))
    assert loading._download_cached(uri, cache_dir=str(tmp_path / "cache")) == local  # complete: not again


@pytest.mark.s3
def test_save_to_s3_then_load(tokenizer, s3_bucket, tmp_path):
    model = build_model("pico-llama", tokenizer, seed=5)
    uri = f"s3://{s3_bucket}/runs/exp/merged"
    save_model(model, tokenizer, uri)
    assert storage.exists(storage.join(uri, "model.safetensors"))
    loaded = load_model(uri, cache_dir=str(tmp_path))
    assert torch.equal(_logits(model, tokenizer), _logits(loaded, tokenizer))


@pytest.mark.s3
def test_s3_folder_without_config_is_refused(s3_bucket, tmp_path):
    local = tmp_path / "not-a-model"
    local.mkdir()
    (local / "notes.txt").write_text("hello")
    uri = f"s3://{s3_bucket}/not-a-model"
    storage.upload_dir(str(local), uri)
    missing = rf"{re.escape(uri)} is not a Hugging Face model folder: config\.json"
    with pytest.raises(FileNotFoundError, match=missing):
        materialize_model_dir(uri, cache_dir=str(tmp_path / "cache"))


@pytest.mark.s3
def test_s3_artifact_rewritten_at_the_same_uri_is_downloaded_again(tokenizer, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/runs/exp/sft"
    cache = str(tmp_path / "cache")
    first = build_model("pico-llama", tokenizer, seed=1)
    save_model(first, tokenizer, uri)
    storage.write_json(storage.join(uri, storage.MANIFEST_NAME), {"fingerprint": "first"})
    loaded = load_model(uri, cache_dir=cache)
    assert torch.equal(_logits(loaded, tokenizer), _logits(first, tokenizer))
    # A rerun with another fingerprint rewrites the artifact, manifest included.
    second = build_model("pico-llama", tokenizer, seed=2)
    save_model(second, tokenizer, uri)
    storage.write_json(storage.join(uri, storage.MANIFEST_NAME), {"fingerprint": "second"})
    loaded = load_model(uri, cache_dir=cache)
    assert torch.equal(_logits(loaded, tokenizer), _logits(second, tokenizer))


@pytest.mark.s3
def test_the_model_cache_keeps_to_its_budget_by_removing_the_least_recently_used(saved_model, s3_bucket, tmp_path, monkeypatch, caplog):
    """ALLOYLM_MODEL_CACHE_GB bounds a node's model cache: past it, the copies used longest ago go,
    never the one just asked for, one a live process still holds (it may read its files for
    minutes: a merge reads its parents as it goes), one used within the grace period, or one being
    downloaded; what a killed download left goes too. This process holds every copy it got until
    `release_cached`, as a worker does until it ends."""
    import fcntl
    import time
    from pathlib import Path

    caplog.set_level("INFO", logger="alloylm")
    monkeypatch.setattr(loading, "_budget_warned", set())  # the bad value below is reported in this test too
    _, folder = saved_model
    uris = {name: f"s3://{s3_bucket}/runs/exp/{name}" for name in "abcd"}
    for uri in uris.values():
        storage.upload_dir(str(folder), uri)
    cache = tmp_path / "cache"
    local: dict[str, Path] = {}
    downloads = []
    download = loading.storage.download_dir
    monkeypatch.setattr(loading.storage, "download_dir", lambda *args, **kwargs: (downloads.append(args[0]), download(*args, **kwargs))[1])

    def get(name: str, release: bool = True) -> set[str]:
        local[name] = Path(loading._download_cached(uris[name], cache_dir=str(cache)))
        if release:
            loading.release_cached(str(local[name]))
        return {n for n, path in local.items() if (path / loading._COMPLETE_MARKER).is_file()}

    def used(name: str, seconds_ago: float) -> None:
        at = time.time() - seconds_ago
        os.utime(local[name] / loading._COMPLETE_MARKER, (at, at))

    assert get("a") == {"a"}
    size = loading._folder_bytes(local["a"])
    monkeypatch.setenv(loading.CACHE_BUDGET_ENV, str(2.5 * size / 1e9))  # room for two copies
    monkeypatch.setattr(loading, "CACHE_GRACE_S", 0.0)
    assert get("b") == {"a", "b"}
    used("a", 300)
    used("b", 200)
    assert get("a") == {"a", "b"} and downloads.count(uris["a"]) == 1  # a cached copy, used now
    assert get("c") == {"a", "c"}  # b was used longest ago
    assert any("removed" in r.message and local["b"].name in r.message for r in caplog.records)

    monkeypatch.setattr(loading, "CACHE_GRACE_S", 3600.0)
    assert get("d") == {"a", "c", "d"}  # over the budget, but each was used within the hour

    monkeypatch.setattr(loading, "CACHE_GRACE_S", 0.0)
    monkeypatch.setenv(loading.CACHE_BUDGET_ENV, "0")  # no limit for a moment: nothing is removed here
    get("a", release=False)  # held by this process twice (two users, e.g. threads): still read after
    get("a")  # one of them is done with it
    monkeypatch.setenv(loading.CACHE_BUDGET_ENV, str(2.5 * size / 1e9))
    used("a", 500)
    used("c", 100)
    used("d", 50)
    left = cache / f".{local['c'].name}.partial-x1"  # a download killed midway, nobody downloading c now
    downloading = cache / f".{local['d'].name}.partial-x2"  # one under way: d's lock is held
    for partial in (left, downloading):
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"0" * 10)
    with open(cache / f".{local['d'].name}.lock", "a") as d_lock:
        fcntl.flock(d_lock, fcntl.LOCK_EX)
        assert get("b") == {"a", "b", "d"}  # a is held and d locked: c goes, over the budget still
        assert not left.exists() and downloading.exists()
    assert get("c") == {"a", "c"}  # d's lock free again: d, then b go; a stays held
    loading.release_cached(str(local["a"]))

    monkeypatch.setenv(loading.CACHE_BUDGET_ENV, "lots")  # reported, and no limit: loads go on
    assert get("b") == {"a", "b", "c"}
    assert any("ALLOYLM_MODEL_CACHE_GB='lots' is not a number of GB" in r.message for r in caplog.records)
