"""Ray Serve LLM's OpenAI ingress with AlloyLM's API keys and limits (backend: vllm).

Imported only where vLLM is installed (Ray's ingress module needs it). Every request that reaches
a model goes through `OpenAiIngress._get_response`, so the check sits there; `GET /v1/models`
stays as Ray serves it (it lists model names only).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

from alloylm.serve.auth import APIKeyCheck
from alloylm.serve.config import LimitsConfig
from alloylm.serve.llm_backend import check_vllm_request
from alloylm.serve.protocol import APIError

log = logging.getLogger("alloylm.serve")


class AuthenticatedOpenAiIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments: dict[str, Any],
        model_cards: dict[str, Any],
        *,
        api_keys_file: str | None = None,
        key_digests: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._auth = APIKeyCheck.from_sources(api_keys_file, extra_digests=key_digests or [])
        self._limits = LimitsConfig.model_validate(limits or {})
        if self._auth.is_open:
            from alloylm.serve.app import OPEN_SERVER_WARNING

            log.warning(OPEN_SERVER_WARNING)

    async def _get_response(self, *, body: Any, call_method: str, raw_request: Any = None):
        header = raw_request.headers.get("authorization") if raw_request is not None else None
        if not self._auth.allows(header):
            raise OpenAIHTTPException(status_code=401, message="Missing or invalid API key.", type="invalid_api_key")
        try:
            check_vllm_request(body, call_method, self._limits)
        except APIError as err:
            raise OpenAIHTTPException(status_code=err.status, message=err.message, type=err.type) from None
        async for response in super()._get_response(body=body, call_method=call_method, raw_request=raw_request):
            yield response
