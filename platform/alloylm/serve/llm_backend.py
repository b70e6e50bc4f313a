"""The GPU backend: the same `ServeConfig` turned into Ray Serve LLM (`ray.serve.llm`, vLLM) configs.

`llm_configs(config)` gives one `LLMConfig` mapping per variant (model id = variant name), checked
against Ray Serve LLM's own `LLMConfig` schema, which imports without vLLM; `openai_app_args`
wraps them as the `args` of `import_path: ray.serve.llm:build_openai_app`; `build_vllm_app` builds
the application, behind an ingress that enforces AlloyLM's API keys and `limits` (`max_tokens`,
`n`, `logprobs`, `echo`; `check_vllm_request`), and fails with a clear message where vLLM is not
installed (as on CPU machines). vLLM itself serves `logprobs`, `echo`, `max_tokens: 0` and `n`, so
those fields pass through to it unchanged once they are within the limits.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from alloylm.serve.config import LimitsConfig, ServeConfig

# OpenAI's chat API allows top_logprobs up to 20; vLLM must keep that many per position.
CHAT_TOP_LOGPROBS = 20


class VLLMUnavailableError(RuntimeError):
    """backend: vllm was chosen where vLLM is not installed."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _model_source(source: str) -> str | dict[str, str]:
    # Ray Serve LLM downloads remote folders itself when given as a mirror config.
    if source.startswith(("s3://", "gs://", "abfss://", "azure://")):
        return {"bucket_uri": source.rstrip("/")}
    return source


def llm_configs(config: ServeConfig) -> list[dict[str, Any]]:
    """One Ray Serve LLM `LLMConfig` (as a plain mapping) per served variant."""
    missing = config.missing_sources()
    if missing:
        raise ValueError(f"no model folder for variant(s) {', '.join(missing)}: name each under `sources`")
    settings = config.vllm
    engine_kwargs: dict[str, Any] = {
        **settings.engine_kwargs,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "dtype": settings.dtype,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        # A served model runs no code shipped with its weights.
        "trust_remote_code": False,
        # vLLM refuses logprobs above this; the ingress holds completions to limits.max_logprobs.
        "max_logprobs": max(settings.engine_kwargs.get("max_logprobs", 0), config.limits.max_logprobs, CHAT_TOP_LOGPROBS),
    }
    if settings.max_model_len is not None:
        engine_kwargs["max_model_len"] = settings.max_model_len
    # A chat request without max_tokens would run to the room left in max_model_len, past
    # limits.max_tokens (the ingress can bound only the lengths a request gives). vLLM's
    # `override_generation_config` `max_new_tokens` is its default for such requests and (vLLM
    # 0.29, which Ray 2.60 pins, with generation_config auto or vllm) a ceiling for every request,
    # fitted to the room the prompt leaves, so nothing that fits is refused. A smaller value the
    # config gives stands.
    generation = dict(settings.engine_kwargs.get("override_generation_config") or {})
    generation["max_new_tokens"] = min(generation.get("max_new_tokens", config.limits.max_tokens), config.limits.max_tokens)
    engine_kwargs["override_generation_config"] = generation
    deployment = config.deployment.to_serve()
    # Ray Serve LLM sizes each replica's resources (GPUs, placement group) from engine_kwargs and
    # accelerator_type, so only the scheduling-independent options are passed on.
    deployment.pop("ray_actor_options")
    configs = []
    for name in config.variant_names:
        llm_config: dict[str, Any] = {
            "model_loading_config": {"model_id": name, "model_source": _model_source(config.sources[name])},
            "engine_kwargs": dict(engine_kwargs),
            "deployment_config": dict(deployment),
        }
        if settings.accelerator_type:
            llm_config["accelerator_type"] = settings.accelerator_type
        validate_llm_config(llm_config)
        configs.append(llm_config)
    return configs


def validate_llm_config(llm_config: dict[str, Any]) -> Any:
    """Check `llm_config` against Ray Serve LLM's `LLMConfig`; a ValueError says what is wrong.

    Returns the validated `LLMConfig`. Its module needs no vLLM (ray.serve.llm's public module
    does, so the class is imported from where Ray defines it).
    """
    from pydantic import ValidationError
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    try:
        return LLMConfig.model_validate(llm_config)
    except ValidationError as err:
        raise ValueError(f"invalid Ray Serve LLM config for {llm_config['model_loading_config']}: {err}") from None


def openai_app_args(config: ServeConfig) -> dict[str, Any]:
    """`args` for `import_path: ray.serve.llm:build_openai_app` (Ray's own, unauthenticated ingress)."""
    return {"llm_configs": llm_configs(config)}


def build_vllm_app(config: ServeConfig, *, key_digests: list[str] | tuple[str, ...] = ()):
    """The Ray Serve LLM application for `config`, behind AlloyLM's API-key check."""
    configs = llm_configs(config)
    if not vllm_available():
        raise VLLMUnavailableError(
            "backend: vllm needs vLLM, which is not installed here. Install it on the GPU cluster's "
            "image (`pip install 'ray[llm]==<your Ray version>'`, which brings a matching vLLM), or "
            "use backend: transformers, which runs everywhere."
        )
    from ray.serve.llm import build_openai_app

    return build_openai_app(
        {
            "llm_configs": configs,
            "ingress_cls_config": {
                "ingress_cls": "alloylm.serve.vllm_ingress:AuthenticatedOpenAiIngress",
                "ingress_extra_kwargs": {
                    "api_keys_file": config.api_keys_file,
                    "key_digests": list(key_digests),
                    "limits": config.limits.model_dump(),
                },
            },
        }
    )


def check_vllm_request(body: Any, call_method: str, limits: LimitsConfig) -> None:
    """AlloyLM's bounds on a request bound for vLLM (`body` is Ray Serve LLM's request object, with
    OpenAI's field names): `max_tokens`, `n`, `logprobs`, `top_logprobs`, `echo`, `max_tokens: 0`
    and the number of `stop` strings. Raises `APIError` (400, naming the field) as AlloyLM's own
    backend does. A request that gives no length is left to vLLM's default, which vLLM fits to
    the room the prompt leaves (an explicit default here would be refused where it does not fit),
    and which `llm_configs` bounds by `limits.max_tokens` (vLLM's `override_generation_config`)."""
    from alloylm.serve.protocol import bad_request, check_choice_fields

    if call_method not in ("completions", "chat"):
        return
    given = [getattr(body, name, None) for name in ("max_completion_tokens", "max_tokens")]
    max_tokens = next((value for value in given if value is not None), None)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}", "max_tokens")
    stop = getattr(body, "stop", None)
    if stop is not None and not isinstance(stop, str) and len(stop) > limits.max_stop_sequences:
        raise bad_request(f"at most {limits.max_stop_sequences} stop sequences are allowed", "stop")
    check_choice_fields(
        chat=call_method == "chat",
        limits=limits,
        n=getattr(body, "n", None),
        logprobs=getattr(body, "logprobs", None),
        top_logprobs=getattr(body, "top_logprobs", None),
        echo=getattr(body, "echo", None),
        max_tokens=getattr(body, "max_tokens", None),
    )
