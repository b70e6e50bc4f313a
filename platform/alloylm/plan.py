"""The plan of a run: per-GPU memory, tokens, time and GPU-hours of every stage on a target cluster.

    alloylm plan configs/paper/llama-3.1-8b-base.yaml --gpus 8 --gpu-memory-gib 80

Pure functions, no Ray and no weights: models are built on the meta device from their config
(shipped shapes under `models/shapes/` for the paper's models, a folder's or `s3://` URI's own
`config.json`, or a preset), model-state memory comes from DeepSpeed's own estimators, activation
memory from the formula of Korthikanti et al. (2022), time from 6·N·tokens at an assumed MFU.
Everything here is an estimate; the formulas are quoted where they are used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

from alloylm.errors import ConfigError, StageError
from alloylm.plan_config import ClusterConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from alloylm.config import RunConfig

GIB = 1024**3
# Of a GPU's memory, what a stage may plan to use: the CUDA context, NCCL buffers and allocator
# fragmentation take the rest (DeepSpeed's own buffers are inside its estimate).
USABLE_FRACTION = 0.9
# SLERP of one parameter: a dot product, two norms, an arccos, two sines and a weighted sum, about
# 20 FLOPs; a merge is bound by memory traffic, so this is a lower bound of its time.
SLERP_FLOPS_PER_PARAMETER = 20
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


# ------------------------------------------------------------------------------ model shapes


def shipped_shape(source: str) -> dict | None:
    """The shipped `config.json` of a Hugging Face id (public shape facts), or None."""
    name = source.removeprefix("hf:").replace("/", "--") + ".json"
    path = resources.files("alloylm.models") / "shapes" / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def model_config_from_source(source: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The transformers config of a model source, without its weights.

    A local folder or `s3://` URI: its own `config.json`. A Hugging Face id: the shipped shape when
    there is one (the hub is not needed), else `AutoConfig` (the hub or its local cache).
    """
    from transformers import AutoConfig

    from alloylm import storage
    from alloylm.models.loading import classify_source

    kind = classify_source(source)
    if kind == "s3":
        data = storage.read_json(storage.join(source, "config.json"))
    elif kind == "local":
        path = source.removeprefix("file://")
        import os

        data = json.loads(open(os.path.join(os.path.expanduser(path), "config.json"), encoding="utf-8").read())
    else:
        data = shipped_shape(source)
        if data is None:
            return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    data = dict(data)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model built on the meta device (shared tensors counted once)."""

    total: int  # every parameter, LoRA adapters included
    trainable: int  # what the optimizer updates: all of them, or the LoRA adapters
    largest_layer: int  # the largest module's own parameters (DeepSpeed's ZeRO-3 estimator needs it)


@functools.lru_cache(maxsize=32)
def _count(config_json: str, lora_json: str | None) -> ParameterCount:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if lora_json is not None:
        from peft import LoraConfig, get_peft_model

        lora = json.loads(lora_json)
        model = get_peft_model(
            model,
            LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                       target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
        )
    # model.parameters() yields a tied embedding once, as DeepSpeed's model_to_params counts it.
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCount(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        largest_layer=largest,
    )


def count_parameters(config: PretrainedConfig, lora=None) -> ParameterCount:
    """Exact parameter counts: the model (and PEFT's LoRA adapters) built on the meta device."""
    data = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"):
        data.pop(key, None)
    lora_json = None
    if lora is not None:
        lora_json = json.dumps({"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "target_modules": lora.target_modules})
    return _count(json.dumps(data, sort_keys=True, default=str), lora_json)


@dataclass(frozen=True)
class Shape:
    """What the formulas need of an architecture."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            max_positions=getattr(config, "max_position_embeddings", 0) or 0,
        )


# ------------------------------------------------------------------------------ memory formulas


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU (and model states in CPU memory, with offload)."""

    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    cpu: float = 0.0

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations


def model_states(
    count: ParameterCount,
    *,
    zero_stage: int | None,
    precision: str,
    workers: int,
    gpus_per_node: int = 8,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> Memory:
    """Per-GPU bytes of parameters, gradients and Adam states of one data-parallel worker.

    Mixed precision (bf16/fp16) under ZeRO: the total is DeepSpeed's own estimate
    (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs` from
    deepspeed.runtime.zero, which assume mixed-precision Adam). It is split as DeepSpeed's code
    comments it: 2 bytes of 16-bit weights per parameter, 12 of optimizer states (4 fp32 master
    weights + 8 Adam momentum and variance), both sharded as the stage shards them; the rest of
    DeepSpeed's figure is gradients (ZeRO-2: 2 16-bit + 4 fp32 bytes per parameter; ZeRO-3:
    4 bytes per parameter plus the largest layer's 16-bit weights and gradients gathered).
    ZeRO 0 and 1 have no estimator of their own: ZeRO 0 is the ZeRO-2 estimate on one GPU
    (nothing sharded); ZeRO 1 adds every rank's full 16-bit gradients (2 bytes per parameter,
    less the shard already counted) to the ZeRO-2 estimate.

    fp32 training and plain DDP (`stage: null`: torch AMP keeps fp32 weights): 4 weight + 4
    gradient + 8 Adam bytes per parameter under the same sharding rules; DeepSpeed's estimators
    (16-bit weights) do not apply, so this formula is used. ZeRO 1-3 still keep an fp32 partition
    of the weights of their own for the optimizer (`single_partition_of_fp32_groups` in
    stage_1_and_2.py, `fp32_partitioned_groups_flat` in stage3.py): 4 more bytes per parameter,
    sharded, as `benchmarks/plan_accuracy.py` measures on CPU (stage3.py may reuse the weights
    when they sit on the optimizer's device; the plan does not count on it). ZeRO 0 and DDP run
    the plain optimizer.

    LoRA: the frozen base weights only take their weight bytes (sharded under ZeRO-3); gradients
    and optimizer states exist for the adapters only, which the estimators are given.
    """
    # DeepSpeed's logger writes to the stdout of import time: keep `alloylm plan --json` clean.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = max(1, workers)
    per_node = max(1, min(gpus_per_node or n, n))
    nodes = math.ceil(n / per_node)
    trained, frozen, layer = count.trainable, count.total - count.trainable, count.largest_layer
    mixed = precision in ("bf16", "fp16") and zero_stage is not None
    weight = 2 if mixed else 4
    frozen_bytes = frozen * weight / (n if zero_stage == 3 else 1)
    offload_optimizer = offload_optimizer and bool(zero_stage)
    shard = n if zero_stage else 1  # optimizer states are sharded from ZeRO-1 on
    master_copy = mixed or bool(zero_stage)  # 4 bytes of fp32 master weights besides Adam's 8
    opt = 0.0 if offload_optimizer else trained * (12 if master_copy else 8) / shard
    cpu = 0.0
    if zero_stage == 3:
        gathered = layer * weight  # the largest layer's full weights (and as many bytes of its gradients)
        params = (0.0 if offload_params else trained * weight / n) + gathered
        grads = (0.0 if offload_optimizer else trained * 4 / n) + gathered
    else:
        params = trained * weight
        grads = 0.0 if offload_optimizer else trained * 4 / (n if zero_stage == 2 else 1)
    if mixed and not (offload_params and not offload_optimizer):
        if zero_stage == 3:
            cpu, total, _ = estimate_zero3_model_states_mem_needs(
                trained, layer, per_node, nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_params
            )
        elif zero_stage == 0:
            _, total = estimate_zero2_model_states_mem_needs(trained, 1, 1, cpu_offload=False)
        else:
            cpu, total = estimate_zero2_model_states_mem_needs(trained, per_node, nodes, cpu_offload=offload_optimizer)
            if zero_stage == 1 and not offload_optimizer:
                total += trained * 2 * (1 - 1 / n)
        grads = total - params - opt
    return Memory(parameters=params + frozen_bytes, gradients=grads, optimizer=opt, cpu=cpu)


def activation_bytes(
    shape: Shape,
    *,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
    precision: str,
    attention: str = "sdpa",
) -> float:
    """Activation memory of one micro-batch on one GPU.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (arXiv:2205.05198), §4.1: a transformer layer stores s·b·h·(34 + 5·a·s/h) bytes of 16-bit
    activations without tensor parallelism or recomputation; 5·a·s²·b of it are the attention
    scores, softmax and its dropout. Memory-efficient attention (transformers' default `sdpa` on
    GPU: FlashAttention or the memory-efficient kernel) does not store them, which is exactly
    their §4.2 selective recomputation, so `sdpa` leaves that term out. With full recomputation
    (gradient checkpointing) each layer keeps only its 2·s·b·h input, and the layer being
    recomputed holds its full set once. (The formula is for GPT's 4h MLP; Llama's SwiGLU MLP with
    GQA stays close to it.) Add the output layer: logits of s·b·V in 16-bit, their fp32 upcast for
    the loss and the saved log-softmax (2 + 4 + 4 bytes each). fp32 training doubles every 16-bit
    activation.
    """
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    width = 1 if precision in ("bf16", "fp16") else 2
    per_layer = 34 * s * b * h + (5 * a * s * s * b if attention == "eager" else 0)
    if checkpointing:
        layers = 2 * s * b * h * shape.layers + per_layer
    else:
        layers = per_layer * shape.layers
    logits = s * b * shape.vocab * ((2 + 4 + 4) if width == 1 else (4 + 4))
    return layers * width + logits


# ------------------------------------------------------------------------------ the plan


@dataclass
class StagePlan:
    """One row of the plan."""

    name: str
    kind: str
    model: str = ""
    parameters: int | None = None
    trainable: int | None = None
    tokens: int | None = None
    tokens_from: str = ""  # "manifest", "max_steps" or "unknown"
    gpus: float = 0.0
    memory_gib: dict[str, float] = field(default_factory=dict)  # per GPU: parameters, ..., total
    cpu_memory_gib: float | None = None
    fits: bool | None = None  # None: not checked (CPU stage, unknown GPU memory)
    why: str = ""
    fixes: list[str] = field(default_factory=list)  # overrides that would make it fit
    flops: float | None = None
    hours: float | None = None  # wall-clock estimate
    gpu_hours: float | None = None
    hours_per_billion_tokens: float | None = None  # wall-clock, for training stages whose tokens are unknown
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunPlan:
    experiment: str
    cluster: ClusterConfig
    stages: list[StagePlan]

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "cluster": self.cluster.model_dump(), "stages": [s.to_json() for s in self.stages]}

    @property
    def ok(self) -> bool:
        return all(s.fits is not False for s in self.stages)


def _origin(config: RunConfig, ref: Any) -> Any:
    """Follow stage names to where the weights come from: a model source or a preset init."""
    seen = set()
    while isinstance(ref, str) and ref in config.stages and ref not in seen:
        seen.add(ref)
        stage = config.stages[ref]
        refs = stage.parent_refs()
        ref = getattr(stage, "from_", None) if hasattr(stage, "from_") else (refs[0] if refs else None)
    return ref


def _vocab_of_run(config: RunConfig) -> int:
    """Preset models take the run tokenizer's vocabulary."""
    if config.tokenizer.train is not None:
        return config.tokenizer.train.vocab_size
    shape = shipped_shape(config.tokenizer.from_ or "")
    if shape is None:
        raise ValueError(f"the vocabulary of tokenizer {config.tokenizer.from_!r} is unknown offline")
    return shape["vocab_size"]


def model_config_of(config: RunConfig, ref: Any) -> tuple[PretrainedConfig, str]:
    """The transformers config a stage (or a model reference) trains or merges, and its origin."""
    from alloylm.train.config import PresetInit

    origin = _origin(config, ref)
    if isinstance(origin, PresetInit):
        from alloylm.models.presets import preset_config

        return preset_config(origin.init, vocab_size=_vocab_of_run(config)), f"{{init: {origin.init}}}"
    return model_config_from_source(origin, trust_remote_code=config.trust_remote_code), origin


def _dataset_tokens(config: RunConfig, name: str) -> int | None:
    """`tokens_out` of a prepared data set's manifest, if it has been prepared."""
    from alloylm import storage
    from alloylm.layout import RunLayout

    try:
        manifest = storage.read_manifest(RunLayout.of(config).dataset(name))
    except Exception:  # unreachable or placeholder storage: the plan just does not know
        return None
    return (manifest or {}).get("counts", {}).get("tokens_out")


def _gpu_share(gpus_per_unit: float) -> float:
    """How many workers (replicas) one GPU holds: 1, or 1/g for a fractional GPU share."""
    return max(1.0, 1.0 / gpus_per_unit) if gpus_per_unit > 0 else 1.0


def _set_memory(row: StagePlan, memory: Memory, per_gpu_units: float) -> None:
    row.memory_gib = {
        key: getattr(memory, key) * per_gpu_units / GIB
        for key in ("parameters", "gradients", "optimizer", "activations", "total")
    }
    if memory.cpu:
        row.cpu_memory_gib = memory.cpu / GIB


def _check_fit(row: StagePlan, cluster: ClusterConfig) -> None:
    if row.gpus <= 0:
        row.notes.append("CPU stage: no GPU memory check")
        return
    if cluster.gpus and row.gpus > cluster.total_gpus + 1e-9:
        row.fits, row.why = False, f"needs {row.gpus:g} GPUs, the cluster has {cluster.total_gpus}"
        return
    if cluster.gpu_memory_gib is None:
        return
    limit = cluster.gpu_memory_gib * USABLE_FRACTION
    total = row.memory_gib["total"]
    row.fits = total <= limit
    if not row.fits:
        row.why = f"{total:.1f} GiB per GPU > {limit:.1f} GiB usable ({USABLE_FRACTION:.0%} of {cluster.gpu_memory_gib:g} GiB)"


def _training_memory(stage, count: ParameterCount, shape: Shape, seq_len: int, cluster: ClusterConfig) -> Memory:
    ds, tr = stage.deepspeed, stage.training
    workers = stage.resources.workers
    memory = model_states(
        count,
        zero_stage=ds.stage,
        precision=ds.precision,
        workers=workers,
        gpus_per_node=cluster.gpus or workers,
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_params,
    )
    # DPO and ORPO put the chosen and the rejected sequence of each pair through one forward pass.
    sequences = tr.batch_size * (2 if stage.kind in ("dpo", "orpo") else 1)
    act = activation_bytes(shape, seq_len=seq_len, micro_batch=sequences, checkpointing=tr.gradient_checkpointing, precision=ds.precision)
    params = memory.parameters
    if stage.kind == "dpo" and stage.lora is None:
        # TRL's reference model: a frozen copy in the training precision (ZeRO-3: sharded like the
        # policy). With LoRA the reference is the base with the adapters switched off: no copy.
        weight = 2 if ds.precision in ("bf16", "fp16") else 4
        params += count.total * weight / (workers if ds.stage == 3 else 1) + (count.largest_layer * weight if ds.stage == 3 else 0)
    return replace(memory, parameters=params, activations=act)


def _fixes(config: RunConfig, name: str, cluster: ClusterConfig) -> list[str]:
    """Overrides that make a training stage fit, cheapest first (at most three)."""
    stage = config.stages[name]
    ds, tr = stage.deepspeed, stage.training
    p = f"stages.{name}"
    candidates: list[list[str]] = []
    if not tr.gradient_checkpointing:
        candidates.append([f"{p}.training.gradient_checkpointing=true"])
    batch, accumulation = tr.batch_size, tr.gradient_accumulation_steps
    while batch > 1:  # the same effective batch: halve the micro-batch, double the accumulation
        batch, accumulation = batch // 2, accumulation * 2
        candidates.append([f"{p}.training.batch_size={batch}", f"{p}.training.gradient_accumulation_steps={accumulation}"])
    zero3 = [] if ds.stage == 3 else [f"{p}.deepspeed.stage=3"] + ([f"{p}.deepspeed.precision=bf16"] if ds.precision == "fp32" else [])
    if zero3:
        candidates.append(zero3)
    if not ds.offload_optimizer:
        candidates.append(zero3 + [f"{p}.deepspeed.offload_optimizer=true"])
    if not ds.offload_params:
        candidates.append(zero3 + [f"{p}.deepspeed.offload_optimizer=true", f"{p}.deepspeed.offload_params=true"])
    checkpointing = [] if tr.gradient_checkpointing else [f"{p}.training.gradient_checkpointing=true"]
    smallest = checkpointing + zero3 + [f"{p}.training.batch_size=1", f"{p}.training.gradient_accumulation_steps={tr.batch_size * tr.gradient_accumulation_steps}"]
    candidates += [smallest, smallest + [f"{p}.deepspeed.offload_optimizer=true", f"{p}.deepspeed.offload_params=true"]]
    found = []
    for overrides in candidates:
        overrides = list(dict.fromkeys(overrides))
        try:
            changed = _with_overrides(config, overrides)
        except ConfigError:  # a combination the stage's schema refuses
            continue
        row = plan_stage(changed, name, cluster, suggest=False)
        if row.fits:
            found.append(" ".join(overrides) + f"  ({row.memory_gib['total']:.1f} GiB)")
        if len(found) == 3:
            break
    return found


def _with_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    from alloylm.config import apply_overrides, validate_config

    raw = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    return validate_config(apply_overrides(raw, overrides))


def _plan_training(config: RunConfig, name: str, cluster: ClusterConfig, suggest: bool) -> StagePlan:
    stage = config.stages[name]
    tr, res = stage.training, stage.resources
    hf_config, origin = model_config_of(config, name)
    count = count_parameters(hf_config, stage.lora)
    shape = Shape.of(hf_config)
    row = StagePlan(name=name, kind=stage.kind, model=str(origin), parameters=count.total, trainable=count.trainable)
    row.gpus = res.workers * res.gpus_per_worker
    seq_len = config.data.block_size if stage.kind == "cpt" else tr.max_length
    # Tokens: the optimizer steps (max_steps) if set, else the prepared data set's tokens x epochs.
    pair = 2 if stage.kind in ("dpo", "orpo") else 1  # chosen and rejected, each with the prompt
    if tr.max_steps is not None:
        row.tokens = tr.max_steps * tr.batch_size * res.workers * tr.gradient_accumulation_steps * seq_len * pair
        row.tokens_from = "max_steps x batch x workers x accumulation x length (an upper bound: padding counts)"
    else:
        tokens = _dataset_tokens(config, stage.data)
        if tokens is not None:
            # Preference manifests count prompt + the longer answer per pair; both answers are run.
            row.tokens = int(tokens * pair * tr.epochs)
            row.tokens_from = f"data set {stage.data!r}'s manifest x {tr.epochs:g} epochs"
        else:
            row.tokens_from = f"unknown: data set {stage.data!r} is not prepared and max_steps is not set"
    memory = _training_memory(stage, count, shape, seq_len, cluster)
    _set_memory(row, memory, _gpu_share(res.gpus_per_worker))
    _check_fit(row, cluster)
    # Model FLOPs (Kaplan et al. 2020; Narayanan et al. 2021): 6·N per token (2 forward, 4
    # backward); MFU counts these, so recomputation under checkpointing is inside the MFU. LoRA
    # skips the weight gradients of the frozen base: 4·N. DPO adds the reference model's forward
    # pass: 2·N. ORPO has no reference model.
    per_token = (6 if stage.lora is None else 4) + (2 if stage.kind == "dpo" else 0)
    row.notes.append(f"{per_token}·N FLOPs per token")
    if row.gpus > 0:
        row.hours_per_billion_tokens = per_token * count.total * 1e9 / (row.gpus * cluster.gpu_tflops * 1e12 * cluster.mfu) / 3600
    if row.tokens is not None:
        row.flops = per_token * count.total * row.tokens
        _set_time(row, row.flops, cluster)
    if suggest and row.fits is False and "GPUs" not in row.why:
        row.fixes = _fixes(config, name, cluster)
    return row


def _set_time(row: StagePlan, flops: float, cluster: ClusterConfig) -> None:
    gpus = row.gpus
    if gpus <= 0:
        return
    seconds = flops / (gpus * cluster.gpu_tflops * 1e12 * cluster.mfu)
    row.hours = seconds / 3600
    row.gpu_hours = row.hours * gpus


def _plan_merge(config: RunConfig, name: str, cluster: ClusterConfig) -> StagePlan:
    stage = config.stages[name]
    hf_config, origin = model_config_of(config, stage.parents[0])
    count = count_parameters(hf_config)
    row = StagePlan(name=name, kind=stage.kind, model=str(origin), parameters=count.total)
    row.gpus = stage.resources.num_gpus
    k = len(stage.parents) + (1 if stage.base and stage.base not in stage.parents else 0)
    width = _DTYPE_BYTES[stage.dtype]
    if stage.kind == "merge":
        # mergekit's executor streams tensor by tensor: the parents' and the output's copy of the
        # largest tensor at a time.
        memory = Memory(parameters=(k + 1) * count.largest_layer * width)
        row.notes.append("mergekit streams tensors: largest tensor x (parents + output)")
        flops = SLERP_FLOPS_PER_PARAMETER * count.total
        row.tokens_from = "-"
        _set_memory(row, memory, 1)
        _check_fit(row, cluster)
        _set_time(row, flops, cluster)
        return row
    # merge_search: a trial holds its parents and the candidate on its device (InMemoryMerger),
    # merges, then scores max_items validation items per suite (a forward pass of at most
    # evaluate.max_length tokens each, 2·N FLOPs per token; short answers decode
    # max_new_tokens more). ASHA stops weak trials early: this is the upper bound.
    search = stage.search
    eval_config = config.search_eval_config(name)
    length = eval_config.max_length or hf_config.max_position_embeddings
    suites = eval_config.suites
    items = search.objective.max_items or 0
    per_item = 0
    for suite_name in ("multiple_choice", "short_answer", "domain_perplexity", "general_perplexity"):
        suite = getattr(suites, suite_name, None)
        if suite is None or not getattr(suite, "enabled", True):
            continue
        per_item += length + (getattr(suite, "max_new_tokens", 0) or 0)
    trials = search.num_samples  # Ray Tune counts the given points among num_samples (grid: approximate)
    row.tokens = trials * items * per_item
    row.tokens_from = f"{trials} trials x {items} items x <= {per_item} tokens (ASHA stops some early)"
    shape = Shape.of(hf_config)
    sequences = eval_config.batch_size
    # Inference keeps no activations for a backward pass: one layer's working set and the logits.
    act = 34 * length * sequences * shape.hidden * 2 + length * sequences * shape.vocab * (2 + 4)
    memory = Memory(parameters=(k + 1) * count.total * width, activations=act)
    _set_memory(row, memory, _gpu_share(row.gpus))
    _check_fit(row, cluster)
    flops = trials * SLERP_FLOPS_PER_PARAMETER * count.total + 2 * count.total * row.tokens
    if row.gpus > 0:
        # A trial with g GPUs gets g GPUs' throughput; trials run max_concurrent_trials at a time.
        seconds_one_after_another = flops / (row.gpus * cluster.gpu_tflops * 1e12 * cluster.mfu)
        row.gpu_hours = seconds_one_after_another * row.gpus / 3600
        row.hours = seconds_one_after_another / 3600 / min(search.max_concurrent_trials, trials)
    row.notes.append(f"trials x (merge + validation scoring), {search.max_concurrent_trials} at a time")
    return row


def _plan_serving(config: RunConfig, cluster: ClusterConfig) -> list[StagePlan]:
    serve = config.serve
    rows = []
    vllm = serve.backend == "vllm"
    for variant in serve.variant_names:
        ref = serve.sources.get(variant, variant)
        if ref not in config.stages and "/" not in ref and ":" not in ref:
            continue
        hf_config, origin = model_config_of(config, ref)
        count = count_parameters(hf_config)
        shape = Shape.of(hf_config)
        width = _serve_width(config, ref, hf_config)
        if vllm:
            length = serve.vllm.max_model_len or shape.max_positions
            gpus = float(serve.vllm.tensor_parallel_size)
        else:
            length = serve.limits.max_prompt_tokens + serve.limits.max_tokens
            gpus = serve.deployment.num_gpus
        batch = serve.batching.max_batch_size
        # KV cache: keys and values of every layer, kv_heads x head_dim each, per token.
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * width * length * batch
        row = StagePlan(name=f"serve:{variant}", kind="serve", model=str(origin), parameters=count.total)
        row.gpus = gpus * serve.deployment.num_replicas
        row.tokens_from = f"KV cache for {batch} sequences x {length} tokens"
        split = max(1.0, gpus) if vllm else 1.0
        memory = Memory(parameters=count.total * width / split, activations=kv / split)
        _set_memory(row, memory, _gpu_share(gpus))
        row.memory_gib["kv_cache"] = row.memory_gib.pop("activations")
        _check_fit(row, cluster)
        rows.append(row)
    return rows


def _serve_width(config: RunConfig, ref: str, hf_config) -> int:
    if config.serve.dtype != "auto":
        return _DTYPE_BYTES[config.serve.dtype]
    stage = config.stages.get(ref)
    if stage is not None and hasattr(stage, "dtype"):
        return _DTYPE_BYTES[stage.dtype]
    if stage is not None and hasattr(stage, "deepspeed"):
        return 2 if stage.deepspeed.precision in ("bf16", "fp16") else 4
    saved = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32").removeprefix("torch.")
    return _DTYPE_BYTES.get(saved, 4)


def plan_stage(config: RunConfig, name: str, cluster: ClusterConfig, *, suggest: bool = True) -> StagePlan:
    """The plan of one stage of the run."""
    stage = config.stages[name]
    if hasattr(stage, "training"):
        return _plan_training(config, name, cluster, suggest)
    if stage.kind in ("merge", "merge_search"):
        return _plan_merge(config, name, cluster)
    return StagePlan(name=name, kind=stage.kind, notes=[f"no estimate for {stage.kind!r} stages"])


def plan_run(config: RunConfig, cluster: ClusterConfig | None = None, *, names: list[str] | None = None) -> RunPlan:
    """The plan of every stage (in dependency order), then of serving."""
    cluster = cluster or config.cluster or ClusterConfig()
    rows = []
    for name in names if names is not None else config.stage_order():
        try:
            rows.append(plan_stage(config, name, cluster))
        except (OSError, ValueError) as exc:  # a model whose config cannot be read here
            rows.append(StagePlan(name=name, kind=config.stages[name].kind, notes=[f"no estimate: {exc}"]))
    if names is None and config.serve is not None:
        try:
            rows += _plan_serving(config, cluster)
        except (OSError, ValueError) as exc:
            rows.append(StagePlan(name="serve", kind="serve", notes=[f"no estimate: {exc}"]))
    return RunPlan(experiment=config.experiment, cluster=cluster, stages=rows)


def check_stages_fit(config: RunConfig, names: list[str], cluster: ClusterConfig) -> None:
    """Refuse (StageError) a stage the plan says cannot fit on the cluster's GPUs, before it starts.

    Skipped where GPU memory is unknown (`cluster.gpu_memory_gib` unset) or the stage runs on CPUs.
    """
    if cluster.gpu_memory_gib is None or cluster.gpus == 0:
        return
    for name in names:
        if not hasattr(config.stages[name], "training"):
            continue
        try:
            row = plan_stage(config, name, cluster)
        except (OSError, ValueError):
            continue  # a model config not readable here: the stage itself will say
        if row.fits is False:
            fixes = "; or ".join(row.fixes) or "none of ZeRO-3, offload, micro-batch 1 and gradient checkpointing is enough"
            m = row.memory_gib
            raise StageError(
                f"stage {name!r} does not fit: {row.why} (parameters {m['parameters']:.1f}, gradients {m['gradients']:.1f}, "
                f"optimizer {m['optimizer']:.1f}, activations {m['activations']:.1f} GiB); nothing was run. "
                f"Settings that would fit: {fixes}"
            )


# ------------------------------------------------------------------------------ output


def _human(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def format_table(plan: RunPlan) -> str:
    """The plan as a Markdown table, one row per stage, with its notes below."""
    c = plan.cluster
    memory = f"{c.gpu_memory_gib:g} GiB" if c.gpu_memory_gib else "unknown memory"
    lines = [
        f"Plan of {plan.experiment} on {c.nodes} node(s) x {c.gpus} GPU(s) of {memory}, "
        f"{c.gpu_tflops:g} TFLOPS at MFU {c.mfu:g} (memory per GPU, GiB)",
        "",
        "| stage | kind | params | tokens | GPUs | weights | grads | optim | activ/KV | total | fits | hours | GPU-h |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    notes = []
    for row in plan.stages:
        m = row.memory_gib
        cell = lambda key: f"{m[key]:.3g}" if key in m else "-"  # noqa: E731
        fits = {True: "yes", False: "NO", None: "-"}[row.fits]
        params = _human(row.parameters) + (f" ({_human(row.trainable)} LoRA)" if row.trainable and row.trainable != row.parameters else "")
        lines.append(
            f"| {row.name} | {row.kind} | {params} | {_human(row.tokens) if row.tokens is not None else 'unknown' if row.tokens_from.startswith('unknown') else '-'} "
            f"| {row.gpus:g} | {cell('parameters')} | {cell('gradients')} | {cell('optimizer')} "
            f"| {cell('activations') if 'activations' in m else cell('kv_cache')} | {cell('total')} | {fits} "
            f"| {f'{row.hours:.1f}' if row.hours is not None else '-'} | {f'{row.gpu_hours:.0f}' if row.gpu_hours is not None else '-'} |"
        )
        if row.why:
            notes.append(f"- {row.name}: does not fit: {row.why}")
        for fix in row.fixes:
            notes.append(f"  - fits with: {fix}")
        if row.tokens_from.startswith("unknown"):
            rate = row.hours_per_billion_tokens
            per_billion = f"; 1B tokens take {rate:.1f} h ({rate * row.gpus:.0f} GPU-h)" if rate else ""
            notes.append(f"- {row.name}: tokens {row.tokens_from}{per_billion}")
        notes += [f"- {row.name}: {note}" for note in row.notes if note.startswith("no estimate")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)
