"""Learning in the right direction, and the SFT/DPO knobs the paper configs use, each shown to act.

The trainers are the real ones, built by each method's own `build_trainer` from the worker's own
`common_arguments`, on a data set prepared by the real data pipeline (Ray Data); they run in this
process, one CPU, without Ray Train around them (no process group: `ddp_backend` is None, as on a
single GPU), so that several short runs cost seconds. The Ray Train path of the paper's SFT
settings (with ZeRO-3 and the optimizer offloaded, which need DeepSpeed's engine) is trained once,
at the end.

The preference pairs and chats are the built-in biomaterials world's; two materials' pairs and
chats are held out of training and are what every direction is measured on. Log-probabilities are
computed here from the model's logits and the chat template, not with TRL's code.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from alloylm.config import TRAIN_STAGES, validate_config

pytestmark = pytest.mark.slow

HELD_OUT_MATERIALS = 2
STEPS = 8
SFT = {"learning_rate": 1e-2, "max_length": 256}


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory):
    """The prepared run (tokenizer, chats, preference pairs without the held-out materials), a
    freshly initialised parent saved as a model folder, and the held-out rows."""
    from alloylm.corpus.biomaterials import preference_pairs, qa_chats
    from alloylm.corpus.options import BuiltinCorpusOptions
    from alloylm.data.prepare import prepare_all
    from alloylm.models.loading import load_tokenizer, save_model
    from alloylm.models.presets import build_model

    root = tmp_path_factory.mktemp("direction")
    options = BuiltinCorpusOptions(materials=8)
    pairs, chats = preference_pairs(options), qa_chats(options)
    held = set(sorted({r["material"] for r in pairs})[-HELD_OUT_MATERIALS:])

    def write(rows: list[dict], name: str) -> str:
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["material"] not in held))
        return str(path)

    config = validate_config({
        "experiment": "direction",
        "storage": str(root / "runs"),
        "tokenizer": {"train": {"vocab_size": 400}},
        "datasets": {
            "chat": {"source": write(chats, "chat.jsonl"), "format": "chat"},
            "prefs": {"source": write(pairs, "prefs.jsonl"), "format": "preference"},
        },
        "data": {"tokenizer_actors": 1},
        "stages": {},
    })
    manifests = prepare_all(config)
    tokenizer = load_tokenizer(os.path.join(config.run_uri, "tokenizer"))
    parent = str(root / "parent")
    save_model(build_model("pico-llama", tokenizer, seed=1), tokenizer, parent)
    return {
        "root": root,
        "config": config,
        "tokenizer": tokenizer,
        "parent": parent,
        "rows": {name: m["counts"]["records_out"] for name, m in manifests.items() if name != "tokenizer"},
        "pairs": [r for r in pairs if r["material"] in held],
        "chats": [r for r in chats if r["material"] in held],
    }


def train(world, kind: str, data: str, *, steps: int = STEPS, training: dict | None = None, **options):
    """Train `kind` from the parent in this process, as a Ray Train worker builds it; returns the trainer."""
    from alloylm.models.loading import load_model
    from alloylm.train import STAGE_TRAINERS
    from alloylm.train.worker import StageJob, common_arguments

    raw = {
        "kind": kind, "from": world["parent"], "data": data,
        "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, **(training or {})},
        **options,
    }
    stage = TRAIN_STAGES[kind].model_validate(raw)
    run = world["config"].run_uri
    job = StageJob(
        stage_name=kind, stage=raw, seed=0, trust_remote_code=False, tokenizer_uri=os.path.join(run, "tokenizer"),
        data_uri=os.path.join(run, "data", data), parent_kind="model", parent=world["parent"],
        output_uri=str(world["root"] / "unused"), data_rows=world["rows"][data],
    )
    workdir = str(world["root"] / f"work-{kind}-{len(os.listdir(world['root']))}")
    arguments = {**common_arguments(job, stage, workdir, steps), "ddp_backend": None, "report_to": []}
    trainer = STAGE_TRAINERS[kind].build_trainer(stage, job, load_model(world["parent"]), world["tokenizer"], arguments)
    return trainer


def _token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token i | tokens < i) for i >= 1."""
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tensor).logits[0, :-1].float().log_softmax(-1)
    return logits.gather(1, tensor[0, 1:, None])[:, 0]


def answer_logprob(model, tokenizer, prompt: list[dict], answer: list[dict]) -> float:
    """Sum of log p(answer tokens | prompt), the answer rendered by the chat template after the prompt."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    assert full[: len(head)] == head
    return _token_logprobs(model, full)[len(head) - 1 :].sum().item()


def held_out_margin(model, world) -> float:
    """Mean over the held-out pairs of log p(chosen | prompt) - log p(rejected | prompt)."""
    tok = world["tokenizer"]
    margins = [answer_logprob(model, tok, r["prompt"], r["chosen"]) - answer_logprob(model, tok, r["prompt"], r["rejected"]) for r in world["pairs"]]
    return sum(margins) / len(margins)


def held_out_losses(model, world) -> tuple[float, float]:
    """Mean next-token loss on the held-out chats' assistant tokens, and on every other token."""
    tok = world["tokenizer"]
    assistant, other = [], []
    for row in world["chats"]:
        rendered = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        losses = -_token_logprobs(model, rendered["input_ids"])
        for loss, is_assistant in zip(losses.tolist(), rendered["assistant_masks"][1:], strict=True):
            (assistant if is_assistant else other).append(loss)
    return sum(assistant) / len(assistant), sum(other) / len(other)


def weights_apart(a, b) -> float:
    sb = b.state_dict()
    return max((v - sb[k]).abs().max().item() for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def parent_model(world):
    from alloylm.models.loading import load_model

    return load_model(world["parent"])


def test_dpo_raises_the_held_out_margin_and_beta_and_loss_type_change_what_is_learned(world, parent_model):
    before = held_out_margin(parent_model, world)
    dpo = train(world, "dpo", "prefs", beta=0.1)
    dpo.train()
    after = held_out_margin(dpo.model, world)
    print(f"held-out margin: parent {before:.3f}, dpo {after:.3f}")
    assert after > before + 1.0, (before, after)

    # beta: the same run with another beta learns other weights (the runs are deterministic: the
    # same beta gives the same weights bit for bit).
    strong = train(world, "dpo", "prefs", beta=1.0)
    strong.train()
    apart = weights_apart(dpo.model, strong.model)
    print(f"beta 0.1 vs 1.0: weights up to {apart:.4f} apart")
    assert apart > 1e-3

    # loss_type: IPO's first loss (policy == reference) is (1 / (2 beta))^2; sigmoid DPO's is log 2.
    ipo = train(world, "dpo", "prefs", steps=1, beta=0.1, loss_type="ipo")
    ipo.train()
    first = lambda trainer: next(h["loss"] for h in trainer.state.log_history if "loss" in h)  # noqa: E731
    assert first(dpo) == pytest.approx(math.log(2), rel=1e-3)
    assert first(ipo) == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-3)
    # A list of loss types with weights (RPO: DPO plus the chosen answers' NLL): the first loss is
    # log 2 plus the weighted NLL of the same first batch, so halving its weight halves the excess.
    rpo = {w: train(world, "dpo", "prefs", steps=1, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, w]) for w in (1.0, 0.5)}
    for trainer in rpo.values():
        trainer.train()
    nll = first(rpo[1.0]) - math.log(2)
    assert nll > 0.1, first(rpo[1.0])
    assert first(rpo[0.5]) - math.log(2) == pytest.approx(nll / 2, rel=1e-3)


def test_dpo_from_a_preset_parent_has_that_parent_as_its_reference(world):
    """TRL loaded the reference from the policy's `_name_or_path`: "" for `from: {init: ...}`, so
    the trainer failed to build (and a remote-code parent lost trust_remote_code)."""
    from alloylm.models.presets import build_model
    from alloylm.train import STAGE_TRAINERS
    from alloylm.train.worker import StageJob, common_arguments

    raw = {"kind": "dpo", "from": {"init": "pico-llama", "seed": 3}, "data": "prefs", "training": {"max_steps": 1, "batch_size": 4}}
    stage = TRAIN_STAGES["dpo"].model_validate(raw)
    run = world["config"].run_uri
    job = StageJob(
        stage_name="dpo", stage=raw, seed=0, trust_remote_code=False, tokenizer_uri=os.path.join(run, "tokenizer"),
        data_uri=os.path.join(run, "data", "prefs"), parent_kind="preset", parent="pico-llama", parent_seed=3,
        output_uri=str(world["root"] / "unused"), data_rows=world["rows"]["prefs"],
    )
    arguments = {**common_arguments(job, stage, str(world["root"] / "work-dpo-preset"), 1), "ddp_backend": None, "report_to": []}
    policy = build_model("pico-llama", world["tokenizer"], seed=3)
    trainer = STAGE_TRAINERS["dpo"].build_trainer(stage, job, policy, world["tokenizer"], arguments)
    assert trainer.ref_model is not trainer.model and weights_apart(trainer.ref_model, policy) == 0.0


def test_orpo_raises_the_held_out_margin(world, parent_model):
    before = held_out_margin(parent_model, world)
    orpo = train(world, "orpo", "prefs")
    orpo.train()
    after = held_out_margin(orpo.model, world)
    print(f"held-out margin: parent {before:.3f}, orpo {after:.3f}")
    assert after > before + 1.0, (before, after)


def test_sft_lowers_the_assistant_loss_and_the_paper_knobs_act(world, parent_model):
    """Default SFT (assistant-only loss): the held-out assistant-token loss falls below the parent's,
    and falls more than the loss on the other tokens, which are not trained. The paper's SFT
    (`assistant_only_loss: false`, `packing: true`, `gradient_checkpointing: true`): the other
    tokens' loss falls too; chats are packed into fewer, longer rows holding the same tokens; every
    decoder layer runs twice per micro-batch (forward, then recomputed in the backward pass)."""
    parent_assistant, parent_other = held_out_losses(parent_model, world)

    default = train(world, "sft", "chat", training=SFT)
    default.train()
    assistant, other = held_out_losses(default.model, world)
    print(f"default SFT: assistant {parent_assistant:.3f} -> {assistant:.3f}, other {parent_other:.3f} -> {other:.3f}")
    assert assistant < parent_assistant - 0.3
    # The other tokens share words with the answers, so their loss falls too, but less.
    assert parent_assistant - assistant > 1.2 * (parent_other - other)

    paper = train(world, "sft", "chat", assistant_only_loss=False, packing=True, training={**SFT, "gradient_checkpointing": True})
    calls = []
    # Calls into the first decoder layer's attention: transformers checkpoints the layer's forward
    # (hooks of the layer itself stay outside the recomputation), and torch stops recomputing once
    # it has what the backward pass needs (so a hook after the layer's last module may not fire).
    attention = paper.model.model.layers[0].self_attn
    handle = attention.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        paper.train()
    finally:
        handle.remove()
    assert len(calls) == 2 * STEPS  # one micro-batch per step, the layer run twice for it
    assert default.model.is_activation_checkpointing is False and paper.model.is_activation_checkpointing is True

    unpacked, packed = default.train_dataset, paper.train_dataset
    assert len(unpacked) == world["rows"]["chat"] and len(packed) < len(unpacked) / 2
    assert max(len(ids) for ids in packed["input_ids"]) <= SFT["max_length"]
    assert sum(map(len, packed["input_ids"])) == sum(map(len, unpacked["input_ids"]))

    paper_assistant, paper_other = held_out_losses(paper.model, world)
    print(f"paper SFT: assistant {parent_assistant:.3f} -> {paper_assistant:.3f}, other {parent_other:.3f} -> {paper_other:.3f}")
    assert paper_assistant < parent_assistant - 0.3
    # Every token is learned now: the other tokens' loss falls more than the answers', and more
    # than it did when only the answers were learned.
    assert parent_other - paper_other > parent_assistant - paper_assistant
    assert parent_other - paper_other > 1.5 * (parent_other - other)


def test_packed_sft_counts_its_epochs_over_the_packed_rows(world):
    """The bug this guards: with `packing: true` the steps were worked out from the chats before TRL
    packed them, so `epochs: 1` made several passes over the packed rows."""
    import math

    from alloylm.train.worker import steps_after_build

    epoch = {"max_steps": None, "epochs": 1, "warmup_ratio": 0.5}
    unpacked_steps = math.ceil(world["rows"]["chat"] / 4)
    packed = train(world, "sft", "chat", steps=unpacked_steps, packing=True, training={**SFT, **epoch})
    stage = TRAIN_STAGES["sft"].model_validate({"kind": "sft", "from": world["parent"], "data": "chat", "packing": True,
                                                "training": {"batch_size": 4, **SFT, **epoch}})
    steps = steps_after_build(stage, packed, 1, unpacked_steps)
    assert steps == math.ceil(len(packed.train_dataset) / 4) < unpacked_steps / 2
    assert packed.args.max_steps == steps and packed.args.warmup_steps == int(0.5 * steps)
    plain = train(world, "sft", "chat", steps=unpacked_steps, training={**SFT, **epoch})
    assert steps_after_build(stage.model_copy(update={"packing": False}), plain, 1, unpacked_steps) == unpacked_steps


def test_the_paper_sft_settings_train_on_ray_under_zero3_with_the_optimizer_offloaded(world):
    """The paper configs' SFT stage, tiny, through Ray Train: ZeRO-3 with the optimizer states
    offloaded to the CPU, 16-bit weights gathered on save, gradient checkpointing, packing, loss on
    every token. What DeepSpeed ran is read from its engine (train_summary.json); the saved model is
    whole (gathered from the ZeRO-3 partitions) and differs from the parent."""
    from alloylm.models.loading import load_model
    from alloylm.train.launcher import stage_uri, train_stage

    raw = world["config"].model_dump(mode="json", by_alias=True)
    raw["stages"] = {"paper-sft": {
        "kind": "sft", "from": world["parent"], "data": "chat", "assistant_only_loss": False, "packing": True,
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "max_length": 256, "gradient_checkpointing": True},
        "deepspeed": {"stage": 3, "precision": "bf16", "offload_optimizer": True, "gather_16bit_weights_on_save": True},
    }}
    config = validate_config(raw)
    metrics = train_stage(config, "paper-sft")["metrics"]
    ran = metrics["deepspeed"]
    assert (ran["enabled"], ran["zero_stage"], ran["offload"]) == (True, 3, {"optimizer": "cpu", "params": None})
    assert ran["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and ran["gather_16bit_weights_on_save"] is True
    assert ran["precision"] == "bf16"  # the paper's precision, run by the engine on the CPU
    assert ran["loaded_partitioned"] is True  # the parent loaded into each rank's partition (zero.Init)
    losses = _losses(config, "paper-sft")
    assert metrics["global_step"] == 2 and len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    trained, parent = load_model(stage_uri(config, "paper-sft")).state_dict(), load_model(world["parent"]).state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in parent.items()}
    assert all(v.numel() > 0 for v in trained.values())
    # Trained, not only rounded to bf16: compared with the parent in the precision it was trained in.
    moved = sum(not torch.equal(v.to(torch.bfloat16), parent[k].to(torch.bfloat16)) for k, v in trained.items())
    assert moved > len(parent) // 2


def _losses(config, stage: str) -> list[float]:
    """The training losses the stage logged (metrics.jsonl in its folder)."""
    from alloylm.train.launcher import stage_uri

    with open(os.path.join(stage_uri(config, stage), "metrics.jsonl"), encoding="utf-8") as f:
        return [row["loss"] for row in map(json.loads, f) if "loss" in row]
