"""Merging candidate configs into one model held in memory: the trial loop of a merge search.

This is mergekit-evolve's in-memory mode (`mergekit.evo.actors.InMemoryMergeEvaluator`) without
lm-eval or vLLM: mergekit plans the merge (`MergePlanner.plan_in_memory`), mergekit's `Executor`
runs its merge methods, and each `ReturnTensor` is copied into the parameters of a model built
once. Nothing is written to disk and no model is loaded per trial.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from mergekit.architecture import get_architecture_info
from mergekit.common import dtype_from_name
from mergekit.graph import Executor, TaskUniverse
from mergekit.io.tasks import LoadTensor, ReturnTensor
from mergekit.merge import _model_out_config
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from alloylm.merge.compat import check_compatible, tensor_shapes
from alloylm.merge.mergekit_builder import MergeInputError, validate_merge_config

# Keys of the output config that may differ between trials without rebuilding the held model
# (mergekit-evolve's rule): the dtype bookkeeping and the special token ids.
_VOLATILE_CONFIG_KEYS = frozenset({"torch_dtype", "dtype", "use_cache", "transformers_version", "_name_or_path"})


class InMemoryMerger:
    """Holds the parents once (per process / Ray worker) and merges candidate configs into one
    reused model instance.

    Where trial time goes (benchmarks/merge_search.py, 58M-parameter Llama, SLERP, 1 CPU thread):
    ~1.3 CPU s per merge, nearly all of it mergekit's merge math; reading the parents again
    through mergekit's `LoaderCache` (safetensors, from the OS page cache) cost no measurable extra
    on the CPU (1.26 vs 1.29 CPU s, median of 5). So `keep_parents_in_memory` defaults to False on
    the CPU (the page cache already holds the files, and a second copy would double the parents'
    memory) and to True on an accelerator, where every lazy read would also copy each tensor from
    host to device on every trial: there the parents are read once, onto the device, and handed
    to mergekit's executor as the already computed values of its `LoadTensor` tasks.
    """

    def __init__(
        self,
        parents: Sequence[str],
        *,
        names: Sequence[str] | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        trust_remote_code: bool = False,
        keep_parents_in_memory: bool | None = None,
        tokenizer_from: str | None = None,
        check: bool = True,
    ) -> None:
        """`tokenizer_from` (a local model folder, default: the merge's base model, else its first
        parent) supplies the returned model's generation config and special token ids, as in
        `materialize`. `check` runs `check_compatible` first."""
        self.parents = tuple(os.path.abspath(os.fspath(p)) for p in parents)
        self.names = tuple(names) if names is not None else tuple(os.path.basename(p) for p in self.parents)
        if len(self.names) != len(self.parents):
            raise MergeInputError(f"{len(self.names)} names given for {len(self.parents)} parents")
        self.trust_remote_code = trust_remote_code
        self.device = device
        self._torch_dtype = dtype_from_name(dtype)
        if not isinstance(self._torch_dtype, torch.dtype) or not self._torch_dtype.is_floating_point:
            raise MergeInputError(f"dtype must be a floating-point torch dtype name, got {dtype!r}")
        if check:
            check_compatible(self.parents, self.names, trust_remote_code=trust_remote_code)
        self._options = MergeOptions(
            device=device, trust_remote_code=trust_remote_code, quiet=True, read_to_gpu=device != "cpu"
        )
        self._on_accelerator = torch.device(device).type != "cpu"
        self._tokenizer_from = os.path.abspath(tokenizer_from) if tokenizer_from else None
        self._parent_tensors: dict[str, dict[str, torch.Tensor]] = {}
        if keep_parents_in_memory is None:
            keep_parents_in_memory = torch.device(device).type != "cpu"
        if keep_parents_in_memory:
            for folder in self.parents:
                self._parent_tensors[folder] = _read_all_tensors(folder, device)
        # Converted copies (dtype of a merge config other than the stored one), made once.
        self._converted: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        self._model: PreTrainedModel | None = None
        self._model_config: dict | None = None
        self._arch_info: dict[tuple[str, ...], Any] = {}

    @property
    def model(self) -> PreTrainedModel | None:
        """The held model (None before the first merge)."""
        return self._model

    def merge(self, config: Mapping[str, Any], *, random_seed: int | None = None) -> PreTrainedModel:
        """Merge per `config` (a `mergekit_config()` mapping over the same parents) into the held
        model (weights replaced in place, no disk writes) and return it, in eval mode.

        `random_seed` seeds torch's generator for random methods (dare_ties, della, ...) the way
        `mergekit-yaml --random-seed` does, so the same seed gives the tensors `materialize` writes;
        the caller's global random state is left as it was.
        """
        merge_config = validate_merge_config(config)
        if merge_config.tokenizer_source is not None or merge_config.tokenizer is not None:
            raise MergeInputError(
                "in-memory merging keeps the parents' shared vocabulary; a config with "
                "tokenizer_source/tokenizer builds a new one: merge it to disk with materialize()"
            )
        referenced = sorted({os.path.abspath(m.model.path) for m in merge_config.referenced_models()})
        strangers = [path for path in referenced if path not in self.parents]
        if strangers or any(m.lora for m in merge_config.referenced_models()):
            raise MergeInputError(
                f"the config merges {', '.join(strangers) or 'a LoRA adapter'}, which is not one "
                f"of this merger's parents ({', '.join(f'{n}: {p}' for n, p in zip(self.names, self.parents))})"
            )

        key = tuple(referenced)
        if key not in self._arch_info:
            self._arch_info[key] = get_architecture_info(merge_config, self._options)
        arch_info = self._arch_info[key]
        # The output config mergekit would save (the base model's, else the first model's).
        out_config = _model_out_config(merge_config, arch_info, trust_remote_code=self.trust_remote_code)
        model = self._held_model(out_config)

        targets = _plan_in_memory(MergePlanner(merge_config, arch_info, self._options, out_config))

        universe = TaskUniverse(targets)
        handles = [universe.add_task(t) for t in targets]
        cached = {}
        if self._parent_tensors:
            for task in universe.tasks:
                if isinstance(task, LoadTensor):
                    tensor = self._parent_tensor(task)
                    if tensor is not None:
                        cached[universe.get_handle(task)] = tensor
        executor = Executor(
            handles,
            math_device=self.device if self._on_accelerator else "cpu",
            storage_device=self.device if self._on_accelerator else "cpu",
            cached_values=cached,
        )

        tensors = dict(model.state_dict(keep_vars=True))
        written: set[str] = set()
        with _seeded(random_seed, self.device), torch.no_grad():
            for task, value in executor.run(quiet=True):
                if not isinstance(task, ReturnTensor):
                    continue
                name = task.weight_info.name
                if value is None:
                    continue  # an optional tensor no parent has
                if name not in tensors:
                    raise RuntimeError(f"mergekit produced tensor {name}, which the model has no parameter for")
                target = tensors[name]
                if tuple(target.shape) != tuple(value.shape):
                    raise MergeInputError(
                        f"merged tensor {name} has shape {list(value.shape)}, the model's is {list(target.shape)}"
                    )
                target.data.copy_(value)
                written.add(name)
        missing = _unwritten(model, tensors, written)
        if missing:
            # no_init_weights left these uninitialised (or a previous trial's values in them).
            raise RuntimeError(
                f"mergekit's plan produced no value for {', '.join(missing[:5])}"
                f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}"
            )
        return model.eval()

    # ------------------------------------------------------------------------- internals

    def _parent_tensor(self, task: LoadTensor) -> torch.Tensor | None:
        folder = os.path.abspath(task.model.model.path)
        stored = self._parent_tensors.get(folder)
        if stored is None or task.model.lora is not None:
            return None
        for name in [task.tensor, *(task.aliases or ()), *(task.tied_names or ())]:
            if name in stored:
                tensor = stored[name]
                break
        else:
            return None  # left to mergekit's loader (e.g. a checkpoint-format conversion)
        want = dtype_from_name(task.dtype) if task.dtype else None
        if want is None or want == tensor.dtype:
            return tensor
        key = (folder, name, want)
        if key not in self._converted:
            self._converted[key] = tensor.to(dtype=want)
        return self._converted[key]

    def _held_model(self, out_config: PretrainedConfig) -> PreTrainedModel:
        comparable = _comparable(out_config)
        if self._model is None or comparable != self._model_config:
            self._model = _empty_model(out_config, self._torch_dtype, self.device, self.trust_remote_code)
            self._model_config = comparable
            self._set_generation(self._model, out_config)
        return self._model

    def _set_generation(self, model: PreTrainedModel, out_config: PretrainedConfig) -> None:
        donor = self._tokenizer_from or getattr(out_config, "_name_or_path", None)
        if donor and os.path.isfile(os.path.join(donor, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(donor)
        if donor and os.path.isfile(os.path.join(donor, "config.json")):
            donor_config = transformers.AutoConfig.from_pretrained(donor, trust_remote_code=self.trust_remote_code)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if getattr(donor_config, key, None) is not None:
                    setattr(model.config, key, getattr(donor_config, key))


def _plan_in_memory(planner: MergePlanner) -> list[ReturnTensor]:
    """`planner.plan_in_memory()`, done here because mergekit 0.1.5's own raises TypeError ("Can't
    instantiate abstract class Task[Tensor]"): `ReturnTensor.tensor_task` is declared
    `Task[torch.Tensor]`, and pydantic 2 does not accept the planner's `ExecuteMergeMethodTask`
    (a `Task[Optional[Tensor]]`) for it, so it tries to build the abstract class. The same
    `ReturnTensor`s are built without that validation; everything else is mergekit's."""
    try:
        planner._plan()
    except (RuntimeError, ValueError) as err:
        raise MergeInputError(f"mergekit cannot plan this merge: {err}") from err
    return [
        ReturnTensor.model_construct(
            weight_info=weight, tensor_task=task, dtype=weight.force_dtype or planner.config.out_dtype
        )
        for weight, task in planner._tensors
    ]


def _read_all_tensors(folder: str, device: str) -> dict[str, torch.Tensor]:
    shards = {os.path.join(folder, "model.safetensors")}
    if not os.path.isfile(next(iter(shards))):
        with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
            shards = {os.path.join(folder, s) for s in json.load(f)["weight_map"].values()}
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(shards):
        tensors.update(load_file(shard, device=device))
    expected = tensor_shapes(folder)
    if set(expected) != set(tensors):
        raise MergeInputError(f"{folder}: its safetensors index and shards disagree")
    return tensors


def _comparable(config: PretrainedConfig) -> dict:
    return {
        k: v
        for k, v in config.to_dict().items()
        if k not in _VOLATILE_CONFIG_KEYS and not k.endswith("_token_id")
    }


def _empty_model(config: PretrainedConfig, dtype: torch.dtype, device: str, trust_remote_code: bool) -> PreTrainedModel:
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = True
    # Every parameter is overwritten by the first merge (checked there): skip the random init.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval().requires_grad_(False)


def _unwritten(model: PreTrainedModel, tensors: Mapping[str, torch.Tensor], written: set[str]) -> list[str]:
    written_ids = {id(tensors[n]) for n in written}
    # A tied parameter (one tensor under two names) is written once under either name.
    return sorted(n for n, t in tensors.items() if n not in written and id(t) not in written_ids)


@contextlib.contextmanager
def _seeded(seed: int | None, device: str):
    if seed is None:
        yield
        return
    kind = torch.device(device).type
    devices = [torch.device(device).index or 0] if kind == "cuda" else []
    # run_merge seeds with transformers' set_seed (torch, numpy, random, globally); mergekit's
    # random methods draw from torch's generator only, so torch alone is seeded here, inside a
    # fork so the caller's random streams are untouched.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
