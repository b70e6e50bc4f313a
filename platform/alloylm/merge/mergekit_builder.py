"""The mergekit YAML of a merge: building it from a method and its parameters, checking it against
mergekit's own registry and schema, and writing/reading it as the file `mergekit-yaml` runs.

The mapping built here is the one artifact every merge path consumes: the in-memory trials of a
search (`InMemoryMerger.merge`), the winner written to disk (`materialize`) and the YAML exported
for users. Merge math is never done here; mergekit does it from this mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from mergekit import merge_methods
from mergekit.architecture import arch_info_for_config
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import BasePolicy, MergeMethod, ParameterScope, ParameterSpec

# The key of a layer-wise gradient that covers every tensor no named filter matches.
DEFAULT_FILTER = "default"
# Top-level keys of a merge config that name a model, replaced by read_mergekit_yaml's stage_dirs.
_MODEL_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})


class MergeInputError(ValueError):
    """Bad merge inputs: an unknown method or parameter, a missing parameter, incompatible parents.

    The message names the problem: the parent (by its stage name), the tensor, the shapes or
    vocabulary sizes, or the parameter.
    """


def known_methods() -> list[str]:
    """The merge methods mergekit has registered, by name (its `merge_method:` values)."""
    return sorted(method.spec.name for method in merge_methods.registered_methods())


def _merge_method(name: str) -> MergeMethod:
    """mergekit's method `name`; MergeInputError listing the known names otherwise."""
    if not isinstance(name, str) or name not in known_methods():
        raise MergeInputError(
            f"unknown merge method {name!r}; mergekit knows: {', '.join(known_methods())}"
        )
    return merge_methods.get(name)


def mergekit_config(
    method: str,
    parents: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    base: int | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Mapping[str, Mapping[str, Any]] | None = None,
    dtype: str = "float32",
    tokenizer_source: str | None = None,
) -> dict:
    """The mergekit YAML mapping (what `mergekit-yaml` reads) merging the local folders `parents`.

    `names` are the parents' display (stage) names, in the same order: they appear in error
    messages and key `model_parameters`. `base` is the index of the base model; methods that need
    one (slerp, task_arithmetic, ties, dare_ties, ...) default to 0, the others to none.
    A parameter value is a number (or bool), a list of anchors interpolated over the layers, or a
    layer-wise gradient ``{"self_attn": [0, 0.5, 1], "mlp": [1, 0.5, 0], "default": 0.5}``
    (filter -> anchors or number; "default" for every other tensor), which becomes mergekit's
    ``[{filter: self_attn, value: [...]}, {filter: mlp, value: [...]}, {value: 0.5}]``.
    SLERP uses the `slices` + `base_model` form of mergekit's documentation (and the paper);
    every other method the `models` form. Raises MergeInputError naming the problem.
    """
    folders = [_parent_folder(p, i) for i, p in enumerate(parents)]
    labels = _names(folders, names)
    if len(folders) < 1:
        raise MergeInputError("a merge needs at least one parent")
    base, method_params, per_model = _checked_settings(method, labels, base, parameters, model_parameters)

    config: dict[str, Any] = {"merge_method": method}
    if base is not None:
        config["base_model"] = folders[base]
    if method == "slerp":
        layers = _layer_count(folders[base if base is not None else 0], labels[base or 0])
        if layers is not None:
            config["slices"] = [
                {
                    "sources": [
                        {"model": folder, "layer_range": [0, layers]}
                        | ({"parameters": params} if params else {})
                        for folder, params in zip(folders, per_model)
                    ]
                }
            ]
    if "slices" not in config:
        config["models"] = [
            {"model": folder} | ({"parameters": params} if params else {})
            for folder, params in zip(folders, per_model)
        ]
    if method_params:
        config["parameters"] = method_params
    config["dtype"] = dtype
    if tokenizer_source is not None:
        config["tokenizer_source"] = tokenizer_source
    validate_merge_config(config)
    return config


def check_merge_settings(
    method: str,
    names: Sequence[str],
    *,
    base: int | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """The checks of `mergekit_config` that need no model folders (the method, the number of
    parents, the base, parameter names and values, required parameters): for a run whose parents
    are not trained yet. Raises MergeInputError naming the problem."""
    _checked_settings(method, [str(n) for n in names], base, parameters, model_parameters)


def _checked_settings(
    method: str,
    labels: list[str],
    base: int | None,
    parameters: Mapping[str, Any] | None,
    model_parameters: Mapping[str, Mapping[str, Any]] | None,
) -> tuple[int | None, dict[str, Any], list[dict[str, Any]]]:
    """(base, method-level settings, per-parent settings) in mergekit's form, every check done."""
    spec = _merge_method(method).spec

    base_policy = spec.contract.base
    if base is None and base_policy == BasePolicy.REQUIRED:
        base = 0
    if base is not None:
        if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base < len(labels):
            raise MergeInputError(
                f"base must be the index of one of the {len(labels)} parents "
                f"({', '.join(labels)}), got {base!r}"
            )
        if base_policy == BasePolicy.FORBIDDEN:
            raise MergeInputError(f"merge method {method!r} takes no base model, got base={base}")
    try:
        spec.contract.validate_ids(list(range(len(labels))), base)
    except ValueError as err:
        raise MergeInputError(
            f"merge method {method!r} cannot merge parents {', '.join(labels)}"
            f"{f' with base {labels[base]!r}' if base is not None else ''}: {err}"
        ) from None

    specs = {p.name: p for p in spec.parameters}
    method_params = {
        key: _mergekit_setting(value, where=f"parameters.{key}", spec=_spec_of(specs, key, method, "parameters"))
        for key, value in (parameters or {}).items()
    }
    unknown_models = sorted(set(model_parameters or {}) - set(labels))
    if unknown_models:
        raise MergeInputError(
            f"model_parameters names {', '.join(map(repr, unknown_models))}, which is not a "
            f"parent; the parents are {', '.join(map(repr, labels))}"
        )
    per_model: list[dict[str, Any]] = []
    for index, label in enumerate(labels):
        converted = {}
        for key, value in ((model_parameters or {}).get(label) or {}).items():
            where = f"model_parameters[{label!r}].{key}"
            param = _spec_of(specs, key, method, where)
            if param.scope == ParameterScope.SHARED:
                # mergekit reads shared parameters from the method level only: a per-model value
                # would be silently ignored.
                raise MergeInputError(
                    f"{where}: {key!r} is a method-level parameter of {method!r}; "
                    "give it in parameters, not per model"
                )
            if param.scope == ParameterScope.NON_BASE and index == base:
                raise MergeInputError(
                    f"{where}: {key!r} does not apply to the base model {label!r} in {method!r} "
                    "(mergekit ignores it there)"
                )
            converted[key] = _mergekit_setting(value, where=where, spec=param)
        per_model.append(converted)
    _check_required(spec.parameters, method, labels, base, method_params, per_model)
    return base, method_params, per_model


def validate_merge_config(config: Mapping[str, Any], *, source: str = "merge config") -> MergeConfiguration:
    """mergekit's MergeConfiguration of `config` (a fresh one: mergekit's planner mutates it).

    MergeInputError, naming `source`, when mergekit's schema rejects it or its method is unknown.
    """
    if not isinstance(config, Mapping):
        raise MergeInputError(f"{source} must be a mapping, got {type(config).__name__}")
    try:
        parsed = MergeConfiguration.model_validate(dict(config))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise MergeInputError(f"{source} is not a valid mergekit config: {problems}") from None
    except RuntimeError as err:
        # mergekit's own validators raise RuntimeError (e.g. both `models` and `slices`).
        raise MergeInputError(f"{source} is not a valid mergekit config: {err}") from None
    try:
        _merge_method(parsed.merge_method)
    except MergeInputError as err:
        raise MergeInputError(f"{source}: {err}") from None
    return parsed


def mergekit_yaml_text(config: Mapping[str, Any], *, random_seed: int | None = None) -> str:
    """`config` as YAML text for `mergekit-yaml`, with a header comment giving the command.

    `random_seed` (for random methods such as dare_ties) goes into that command line: mergekit
    takes it as the `--random-seed` option, not from the YAML.
    """
    validate_merge_config(config)
    seed = f" --random-seed {random_seed}" if random_seed is not None else ""
    header = (
        "# Written by AlloyLM. Reproduce the merge with mergekit:\n"
        f"#   mergekit-yaml THIS_FILE OUTPUT_FOLDER{seed}\n"
    )
    return header + yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=None)


def write_mergekit_yaml(config: Mapping[str, Any], path: str, *, random_seed: int | None = None) -> None:
    """Write `config` as the YAML that `mergekit-yaml path OUT` merges exactly as AlloyLM did
    (with `--random-seed`, named in the file's header, for random methods)."""
    try:
        text = mergekit_yaml_text(config, random_seed=random_seed)
    except MergeInputError as err:
        raise MergeInputError(f"{path}: {err}") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_mergekit_yaml(path: str, *, stage_dirs: Mapping[str, str] | None = None, text: str | None = None) -> dict:
    """A user's mergekit YAML file, as is, with stage names resolved to their local folders.

    A `model:` (or `base_model:`, `tokenizer_source:`) value equal to a key of `stage_dirs` (a stage
    name of the run) becomes that stage's folder. Errors name the file. `text`: the file's content,
    read already where `path` is seen (a merge task on another node may not see it).
    """
    from alloylm import storage

    try:
        # Through storage, as the config check and the fingerprint read it: s3:// and ~ work here too.
        raw = yaml.safe_load(storage.read_text(storage.resolve(path)) if text is None else text)
    except (OSError, storage.StorageError) as err:
        raise MergeInputError(f"cannot read mergekit YAML {path}: {err}") from None
    except yaml.YAMLError as err:
        raise MergeInputError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise MergeInputError(f"{path} must hold a mapping (a mergekit config), got {type(raw).__name__}")
    resolved = _replace_stage_names(raw, dict(stage_dirs or {}))
    validate_merge_config(resolved, source=path)
    return resolved


# ----------------------------------------------------------------------------- helpers


def _parent_folder(parent: str, index: int) -> str:
    if not isinstance(parent, (str, os.PathLike)) or not str(parent):
        raise MergeInputError(f"parent {index} must be a local folder path, got {parent!r}")
    # Absolute: mergekit takes a path that does not exist as a Hugging Face Hub id.
    return os.path.abspath(os.fspath(parent))


def _names(folders: Sequence[str], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [os.path.basename(f.rstrip(os.sep)) or f for f in folders]
    labels = [str(n) for n in names]
    if len(labels) != len(folders):
        raise MergeInputError(f"{len(labels)} names given for {len(folders)} parents")
    if len(set(labels)) != len(labels):
        raise MergeInputError(f"parent names must be distinct, got {labels}")
    return labels


def _spec_of(specs: Mapping[str, ParameterSpec], key: str, method: str, where: str) -> ParameterSpec:
    if key not in specs:
        # mergekit ignores a parameter its method does not declare: a typo would merge silently
        # with the default.
        raise MergeInputError(
            f"{where}: merge method {method!r} has no parameter {key!r}; its parameters are "
            f"{', '.join(sorted(specs)) or '(none)'}"
        )
    return specs[key]


def _scalar(value: Any, *, where: str, spec: ParameterSpec) -> Any:
    if not isinstance(value, (bool, int, float, str)):
        raise MergeInputError(f"{where}: expected a number, got {value!r}")
    try:
        return spec.validate(value)
    except (ValidationError, ValueError, TypeError) as err:
        raise MergeInputError(f"{where}: {value!r} is not a valid {spec.name}: {err}") from None


def _anchors(value: Any, *, where: str, spec: ParameterSpec) -> Any:
    if isinstance(value, (list, tuple)):
        if not value:
            raise MergeInputError(f"{where}: a gradient needs at least one anchor value")
        for i, v in enumerate(value):
            _scalar(v, where=f"{where}[{i}]", spec=spec)
        return list(value)
    _scalar(value, where=where, spec=spec)
    return value


def _mergekit_setting(value: Any, *, where: str, spec: ParameterSpec) -> Any:
    """A parameter value in mergekit's form: scalar, anchor list or [{filter, value}, ...]."""
    if isinstance(value, Mapping):
        conditions = []
        for key, sub in value.items():
            if key == DEFAULT_FILTER:
                continue
            conditions.append({"filter": str(key), "value": _anchors(sub, where=f"{where}.{key}", spec=spec)})
        # mergekit takes the first condition that matches: the catch-all must come last.
        if DEFAULT_FILTER in value:
            conditions.append({"value": _anchors(value[DEFAULT_FILTER], where=f"{where}.{DEFAULT_FILTER}", spec=spec)})
        if not conditions:
            raise MergeInputError(f"{where}: an empty gradient mapping")
        return conditions
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        # Already mergekit's conditional form.
        conditions = []
        for i, cond in enumerate(value):
            if "value" not in cond or set(cond) - {"filter", "value"}:
                raise MergeInputError(f"{where}[{i}]: a condition has keys 'filter' (optional) and 'value', got {sorted(cond)}")
            item = {"value": _anchors(cond["value"], where=f"{where}[{i}].value", spec=spec)}
            if cond.get("filter") is not None:
                item = {"filter": str(cond["filter"])} | item
            conditions.append(item)
        return conditions
    return _anchors(value, where=where, spec=spec)


def _covers_every_tensor(setting: Any) -> bool:
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return any(c.get("filter") in (None, "*") for c in setting)
    return True


def _check_required(
    params: Sequence[ParameterSpec],
    method: str,
    labels: Sequence[str],
    base: int | None,
    method_params: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
) -> None:
    """Fail before any planning when a required parameter has no value for some tensor."""
    for param in params:
        if not param.required:
            continue
        if param.scope == ParameterScope.SHARED:
            if param.name not in method_params:
                raise MergeInputError(f"merge method {method!r} needs parameter {param.name!r} (give it in parameters)")
            if not _covers_every_tensor(method_params[param.name]):
                raise MergeInputError(
                    f"parameters.{param.name}: a gradient by filter needs a {DEFAULT_FILTER!r} "
                    "entry for the tensors no filter matches (embeddings, norms, lm_head)"
                )
            continue
        for index, label in enumerate(labels):
            if param.scope == ParameterScope.NON_BASE and index == base:
                continue
            covered = any(
                param.name in level and _covers_every_tensor(level[param.name])
                for level in (per_model[index], method_params)
            )
            if not covered:
                raise MergeInputError(
                    f"merge method {method!r} needs parameter {param.name!r} for parent {label!r} "
                    f"(give it in model_parameters[{label!r}] or parameters, with a "
                    f"{DEFAULT_FILTER!r} entry if it is a gradient by filter)"
                )


def _layer_count(folder: str, label: str) -> int | None:
    """The layer count of a single-module architecture (for `slices`), or None if not one."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise MergeInputError(f"parent {label!r} ({folder}) is not a model folder: config.json is missing")
    config = ModelReference.model_validate(folder).config()
    arch = arch_info_for_config(config)
    if arch is None or len(arch.modules) != 1:
        return None  # mergekit's planner accepts `slices` only for one-module architectures
    (module,) = arch.modules.values()
    return module.architecture.num_layers(config)


def _plain(value: Any) -> Any:
    """`value` as plain dicts/lists/scalars, so YAML needs no Python-specific tags."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def referenced_models(value: Any, key: str | None = None) -> set[str]:
    """Every model a mergekit config names (`model`, `base_model`, a tokenizer `source`), as an
    absolute path where it is a path; of `model+lora`, the model (the adapter is not a parent)."""
    if isinstance(value, dict):
        return set().union(*(referenced_models(v, k) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(referenced_models(v, key) for v in value))
    if key not in _MODEL_KEYS or not isinstance(value, str) or value in ("base", "union"):  # tokenizer sources, not models
        return set()
    model = value.split("+", 1)[0]
    return {os.path.abspath(model) if os.path.isabs(model) or os.path.exists(model) else model}


def _replace_stage_names(value: Any, stage_dirs: Mapping[str, str], key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _replace_stage_names(v, stage_dirs, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_stage_names(v, stage_dirs, key) for v in value]
    if key in _MODEL_KEYS and isinstance(value, str) and value in stage_dirs:
        return os.path.abspath(stage_dirs[value])
    return value
