"""`alloylm serve`: deploy a run's variants on the current Ray cluster and keep them up until stopped.

`variant_sources` resolves variant names to the run's stage folders; `serve_run` deploys the
application, prints its base URL (and, loudly, whether it is open), and with `blocking=True` waits
until Ctrl-C or SIGTERM, then deletes the application (and Serve itself, if it ran nothing else).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

from alloylm import storage
from alloylm.serve.app import OPEN_SERVER_WARNING, build_serve_app
from alloylm.serve.auth import key_digest, keys_from_env
from alloylm.serve.config import ServeConfig

log = logging.getLogger("alloylm.serve")

_STATUS_POLL_S = 2.0


def variant_sources(config: ServeConfig, run_uri: str, *, require_complete: bool = True) -> dict[str, str]:
    """Variant name -> model folder: `sources` where given, else the run's `<run>/stages/<name>`.

    A stage folder without its manifest is an unfinished stage and is never served: with
    `require_complete`, a ValueError names every such variant.
    """
    from alloylm.layout import RunLayout

    layout = RunLayout(run_uri)
    sources = {name: config.sources.get(name) or layout.stage(name) for name in config.variant_names}
    if require_complete:
        unfinished = [name for name in config.variant_names if name not in config.sources and not storage.is_complete(sources[name])]
        if unfinished:
            raise ValueError(
                f"variant(s) {', '.join(unfinished)} not ready: {', '.join(sources[n] for n in unfinished)} "
                "holds no finished stage (no manifest.json); run the stage first, or name a folder under serve.sources"
            )
    return sources


def base_url(host: str, port: int, route_prefix: str) -> str:
    """The OpenAI base URL clients use, e.g. http://127.0.0.1:8000/v1."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    prefix = "" if route_prefix == "/" else route_prefix
    return f"http://{shown}:{port}{prefix}/v1"


def _http_port(requested: int) -> int:
    """The port Serve's proxies really listen on (a Serve already running keeps its own)."""
    try:
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # a private API: fall back to what was asked for
        return requested


def serve_run(serve_config: ServeConfig, variants: dict[str, str], *, blocking: bool = True) -> str:
    """Deploy `serve_config`'s variants (name -> model folder in `variants`) and return the base URL.

    `variants` adds to or replaces `serve_config.sources`; exactly `serve_config.variant_names`
    are served. Keys in this process's `$ALLOYLM_API_KEYS` are enforced by the server (only their
    digests travel). With `blocking`, the URL is printed and the call returns only after Ctrl-C or
    SIGTERM, having deleted the application.
    """
    from ray import serve

    from alloylm.cluster import connect_ray

    config = serve_config.with_sources(dict(variants)) if variants else serve_config
    app = build_serve_app(config, key_digests=[key_digest(k) for k in keys_from_env()])
    connect_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    port = _http_port(config.port)
    if port != config.port:
        log.warning("Serve already runs on this cluster with HTTP port %d; serving there, not on %d", port, config.port)
    handle = serve.run(app, name=config.app_name, route_prefix=config.route_prefix, blocking=False)
    url = base_url(config.host, port, config.route_prefix)
    _announce(url, config, handle)
    if not blocking:
        return url
    print(url, flush=True)
    _wait_until_stopped(config.app_name)
    _stop(config.app_name)
    return url


def _announce(url: str, config: ServeConfig, handle: Any) -> None:
    models = ", ".join(f"{name} (default)" if name == config.model else name for name in config.variant_names)
    if config.backend == "transformers":
        status = handle.auth_status.remote().result()
    else:
        status = {"open": not (keys_from_env() or config.api_keys_file), "keys": None}
    log.info("AlloyLM serving %s at %s (backend %s)", models, url, config.backend)
    if status["open"]:
        print(OPEN_SERVER_WARNING, file=sys.stderr, flush=True)
    else:
        log.info("API keys required (%s configured)", status["keys"] if status["keys"] is not None else "some")


def _wait_until_stopped(app_name: str) -> None:
    from ray import serve

    def _raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Both signals explicitly: a process started in the background by a non-interactive shell
    # inherits SIGINT as ignored, and Python then installs no KeyboardInterrupt handler for it.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            time.sleep(_STATUS_POLL_S)
            if app_name not in serve.status().applications:
                log.warning("application %r was deleted from the cluster; stopping", app_name)
                return
    except KeyboardInterrupt:
        log.info("stopping application %r", app_name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(app_name: str) -> None:
    """Delete the application; shut Serve down too when nothing else runs on it."""
    from ray import serve

    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()
