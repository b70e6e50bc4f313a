"""The `serve:` section of a run config, also the `args` of a Ray Serve `import_path` application.

One schema for both: `alloylm serve CONFIG` reads it from the run config (variant names resolve to
the run's stage folders), and `serve deploy` / a KubeRay RayService pass it as the application's
`args` to `alloylm.serve.app:build_app`, where `sources` names each variant's model folder.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alloylm.schema import ConfigModel

# Variant names are API model ids: stage names (lower case) or names given under `sources`.
VARIANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
API_KEYS_ENV = "ALLOYLM_API_KEYS"


class _Frozen(ConfigModel):
    """Unknown keys are errors; a built config never changes (alloylm.schema.ConfigModel)."""


class BatchingConfig(_Frozen):
    """Continuous batching in each model replica: sequences join and leave the running batch."""

    max_batch_size: int = Field(
        32,
        ge=1,
        le=1024,
        description=(
            "Most sequences decoded together in one forward pass. 1 turns batching off (requests are "
            "generated one after another), which is the unbatched baseline of the load benchmark."
        ),
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        le=1,
        description=(
            "When the replica is idle, how long the first request waits for others to arrive so "
            "their prompts are prefilled together. Requests arriving while a batch runs join it at "
            "the next decoding step without waiting."
        ),
    )


class AutoscalingConfig(_Frozen):
    """Ray Serve autoscaling of a deployment, driven by ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle deployment scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="How long load must stay high before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="How long load must stay low before removing a replica.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas ({self.min_replicas}) "
                f"and max_replicas ({self.max_replicas})"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        """The `autoscaling_config` dict Ray Serve takes."""
        return self.model_dump(exclude_none=True)


class ModelDeploymentConfig(_Frozen):
    """Ray Serve options of each variant's model deployment (one deployment per variant)."""

    num_replicas: int = Field(1, ge=1, description="Fixed replica count; ignored when `autoscaling` is set.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Scale replicas with load instead of a fixed count.")
    num_cpus: float = Field(
        1.0, ge=0, description="CPUs reserved per replica (fractions allowed, e.g. 0.5 on a small machine)."
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; with a GPU the model runs on CUDA.")
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description=(
            "Requests one replica holds at once (being generated or waiting for a batch slot). "
            "Ray Serve queues the rest at the caller: the backpressure limit."
        ),
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description=(
            "Requests queued for this deployment beyond the replicas' max_ongoing_requests; past it "
            "the API answers 503 (overloaded) at once. -1: no limit."
        ),
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between replica health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails the replica.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="On shutdown or downscale, how long a replica may finish its requests."
    )

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_limit(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or at least 1 (Ray Serve allows no 0)")
        return value

    @model_validator(mode="after")
    def _one_replica_setting(self) -> ModelDeploymentConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("give either `num_replicas` or `autoscaling`, not both")
        return self

    def to_serve(self) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(...)` / `Deployment.options(...)`."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class IngressConfig(_Frozen):
    """The HTTP front deployment: authentication, request checks, routing to a variant."""

    num_replicas: int = Field(1, ge=1, description="Ingress replicas (it holds no model, so it is light).")
    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per ingress replica.")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one ingress replica holds at once (it mostly waits on model replicas)."
    )


class LimitsConfig(_Frozen):
    """Bounds on what one request may ask for; a request past them gets a 400."""

    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt, in tokens (after the chat template).")
    max_tokens: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    default_max_tokens: int = Field(
        256, ge=1, description="`max_tokens` of a request that gives none (completions and chat alike)."
    )
    max_request_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body, checked before the body is parsed."
    )
    max_stop_sequences: int = Field(4, ge=0, description="Most `stop` strings in one request (OpenAI allows 4).")
    max_stop_chars: int = Field(256, ge=1, description="Longest `stop` string, in characters.")
    max_n: int = Field(8, ge=1, le=128, description="Largest `n` (choices per prompt) a request may ask for.")
    max_logprobs: int = Field(
        5,
        ge=0,
        le=20,
        description=(
            "Largest `logprobs` of a /v1/completions request (alternatives per token; OpenAI's legacy API "
            "allows 5). Chat's `top_logprobs` goes up to 20, as OpenAI's."
        ),
    )
    max_prompts: int = Field(
        64,
        ge=1,
        le=4096,
        description="Most prompts in one /v1/completions request (lm-eval sends its batches as one request).",
    )

    @model_validator(mode="after")
    def _default_within_bound(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self


class VLLMBackendConfig(_Frozen):
    """Settings of the Ray Serve LLM (vLLM) backend; used only with `backend: vllm`."""

    accelerator_type: str | None = Field(
        None, description="GPU type every replica needs, e.g. H100, A100, L4 (Ray's accelerator names)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    max_model_len: int | None = Field(None, ge=16, description="Context length vLLM reserves KV cache for.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights and activations dtype in vLLM.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments, passed as given (trust_remote_code may not be set).",
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _no_remote_code(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("trust_remote_code"):
            raise ValueError("trust_remote_code is never enabled when serving: AlloyLM serves safetensors models only")
        reserved = sorted(
            {"model", "tokenizer", "tensor_parallel_size", "max_model_len", "dtype", "gpu_memory_utilization"} & value.keys()
        )
        if reserved:
            raise ValueError(f"set {', '.join(reserved)} with the dedicated fields, not in engine_kwargs")
        return value


BEST = "best"  # `model: best`: the variant the run's validation comparison chose


class ChosenVariant(_Frozen):
    """Why the default variant is the one served: the run's validation comparison chose it."""

    variant: str = Field(pattern=VARIANT_PATTERN, description="The chosen variant.")
    score: float | None = Field(None, description="Its validation score.")
    split: Literal["validation"] = Field("validation", description="Chosen on validation, never on test.")
    score_definition: str | None = Field(None, description="What the score is (suites and weights).")
    within_noise: list[str] = Field(default_factory=list, description="Variants whose score differs from it by less than noise.")


class ServeConfig(_Frozen):
    """How a run's models are served: an OpenAI-compatible HTTP API on Ray Serve."""

    model: str = Field(
        "merged",
        description=(
            "The default variant: the one a request without a `model` field gets. `best`: the variant with "
            "the best validation score of the run's evaluation (`alloylm run` writes <run>/eval/best.json); "
            "requests may also name it `best`."
        ),
        pattern=VARIANT_PATTERN,
    )
    variants: list[str] = Field(
        default_factory=list,
        description=(
            "Variants to load side by side, selected by a request's `model` field (e.g. [merged, dpo, "
            "instruct]); empty means just `model`. Each is a stage of the run or a name under `sources`."
        ),
    )
    sources: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Variant name -> model folder (local path, s3:// URI or Hugging Face id). `alloylm serve` "
            "fills in the run's stage folders; a `serve deploy` config names every variant here."
        ),
    )
    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description=(
            "transformers: AlloyLM's own continuously batched generation (CPU or GPU). vllm: Ray Serve "
            "LLM with vLLM (GPU clusters with vLLM installed)."
        ),
    )
    app_name: str = Field("alloylm", description="Ray Serve application name.", pattern=VARIANT_PATTERN)
    route_prefix: str = Field("/", description="HTTP path the application is mounted at; the API is under <prefix>/v1.")
    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP proxy listens on (`alloylm serve` only; 0.0.0.0 exposes it to the network).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (`alloylm serve` only; `serve deploy` sets http_options).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype in the transformers backend; auto keeps the saved one."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Torch CPU threads per model replica (default: what Ray gives the replica)."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Continuous batching.")
    deployment: ModelDeploymentConfig = Field(
        default_factory=ModelDeploymentConfig, description="Replicas, resources, backpressure and health checks of each variant."
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="The HTTP front deployment.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Bounds on prompts and generation.")
    api_keys_file: str | None = Field(
        None,
        description=(
            f"File with one API key per line (e.g. a mounted Kubernetes Secret), read by the ingress. "
            f"Keys are also read from ${API_KEYS_ENV} (comma-separated). With neither, the API is open."
        ),
    )
    vllm: VLLMBackendConfig = Field(default_factory=VLLMBackendConfig, description="Ray Serve LLM settings (backend: vllm).")
    chosen: ChosenVariant | None = Field(
        None, description="Filled by `alloylm serve` for `model: best`: which variant was chosen, on which split, and its score."
    )

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(VARIANT_PATTERN, name):
                raise ValueError(f"variant name {name!r} must match {VARIANT_PATTERN}")
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"variants listed twice: {', '.join(duplicates)}")
        return value

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            if not re.match(VARIANT_PATTERN, name):
                raise ValueError(f"sources: variant name {name!r} must match {VARIANT_PATTERN}")
            if not isinstance(source, str) or not source.strip():
                raise ValueError(f"sources.{name}: a model folder is needed")
        return value

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str) -> str:
        if not value.startswith("/") or (len(value) > 1 and value.endswith("/")):
            raise ValueError(f"route_prefix must start with '/' and not end with one (got {value!r})")
        return value

    @model_validator(mode="after")
    def _default_is_served(self) -> ServeConfig:
        if self.variants and self.model not in self.variants:
            raise ValueError(f"model {self.model!r} (the default variant) must be one of variants: {', '.join(self.variants)}")
        if self.deployment.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"deployment.max_ongoing_requests ({self.deployment.max_ongoing_requests}) is below "
                f"batching.max_batch_size ({self.batching.max_batch_size}): a batch could never fill"
            )
        return self

    @property
    def variant_names(self) -> list[str]:
        """The variants served, the default first."""
        names = self.variants or [self.model]
        return [self.model] + [name for name in names if name != self.model]

    def missing_sources(self) -> list[str]:
        """Variants with no model folder under `sources`."""
        return [name for name in self.variant_names if name not in self.sources]

    def with_chosen(self, chosen: ChosenVariant) -> ServeConfig:
        """`model: best` resolved: the chosen variant becomes the default (and replaces `best` in variants)."""
        data = self.model_dump()
        variants = [chosen.variant if v == BEST else v for v in self.variants]
        data.update(model=chosen.variant, variants=list(dict.fromkeys(variants)), chosen=chosen.model_dump())
        return ServeConfig.model_validate(data)

    def with_sources(self, sources: dict[str, str]) -> ServeConfig:
        """A copy whose `sources` are updated with `sources` (validated again)."""
        data = self.model_dump()
        data["sources"] = {**self.sources, **sources}
        return ServeConfig.model_validate(data)
