"""Serving: an OpenAI-compatible HTTP API for a run's model variants on Ray Serve.

`ServeConfig` (the run config's `serve:` section and the `args` of `alloylm.serve.app:build_app`)
imports light; `serve_run`, `variant_sources` and `build_app` load Ray Serve on first use.
"""

from __future__ import annotations

from typing import Any

from alloylm.serve.config import API_KEYS_ENV, ServeConfig

__all__ = ["API_KEYS_ENV", "ServeConfig", "build_app", "serve_run", "variant_sources"]

_LAZY = {
    "build_app": "alloylm.serve.app",
    "serve_run": "alloylm.serve.run",
    "variant_sources": "alloylm.serve.run",
}


def __getattr__(name: str) -> Any:
    # Importing Ray Serve and FastAPI costs seconds; a run config that only validates
    # `serve:` should not pay it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alloylm.serve' has no attribute {name!r}")
