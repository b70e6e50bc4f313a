"""One artifact lifecycle for the tokenizer, data sets, stages and evaluations.

    fp = fingerprint("stage", settings, parent_fp, ...)
    done = up_to_date(uri, fp)          # the manifest of an unchanged artifact: skip the work
    if done: return done
    with begin(uri, fp, config) as artifact:
        ... write into artifact.staging_uri ...
        return artifact.commit({...})     # resolved config, then the manifest last

`fingerprint` hashes what determines an artifact's content (its config slice and its inputs'
fingerprints); `begin` stages the writes (`storage.begin_artifact`: nothing half-written is ever
taken for a result, a finished artifact with other inputs is not overwritten unless
`overwrite: true`); `commit` writes `resolved_config.yaml` and then `manifest.json`, which carries
the fingerprint. Storage is imported on first use: the run config imports `fingerprint`, and
loading a config stays free of the S3 stack.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

log = logging.getLogger("alloylm")

if TYPE_CHECKING:
    from alloylm.config import RunConfig


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able inputs: equal inputs, equal fingerprint, on every machine."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def input_versions(uris: dict[str, str]) -> dict[str, str]:
    """The build (`created_at`) of each finished artifact of the run, by name (name -> URI given),
    for `up_to_date`. By name, not URI: a run copied elsewhere (local to S3) is the same run."""
    from alloylm import storage

    versions = {}
    for name, uri in uris.items():
        manifest = storage.read_manifest(uri)
        if manifest and manifest.get("created_at"):
            versions[name] = str(manifest["created_at"])
    return versions


def build_key(fp: str, inputs: dict[str, str]) -> str:
    """What names the work folders of one build of an artifact (its Ray Train run, its Tune
    experiment): the fingerprint, and the builds of its inputs when it has any, so that a stage
    rebuilt on a parent built again starts afresh instead of resuming work done on the old one."""
    return fingerprint(fp, inputs) if inputs else fp


def up_to_date(uri: str, fp: str, inputs: dict[str, str] | None = None) -> dict | None:
    """The manifest of the finished artifact at `uri` when it was made from the same inputs, else None.

    `inputs` (`input_versions` of the run's own artifacts it is made from, recorded in its manifest
    under that key): a parent built again under the same fingerprint (deleted and retrained; on a
    GPU that gives other weights) makes its children out of date too. A manifest written before
    these were recorded is judged by its fingerprint alone.
    """
    from alloylm import storage

    manifest = storage.read_manifest(uri)
    if not manifest or manifest.get("fingerprint") != fp:
        return None
    recorded = manifest.get("inputs")
    if inputs is not None and recorded is not None and recorded != inputs:
        changed = sorted(set(recorded) ^ set(inputs) | {k for k in recorded if k in inputs and recorded[k] != inputs[k]})
        log.warning("%s was made from an earlier build of %s: not up to date", uri, ", ".join(changed))
        return None
    return manifest


class Building:
    """An artifact being written: write under `staging_uri`, then `commit` once."""

    def __init__(self, artifact: Any, fp: str, config: RunConfig | None) -> None:
        self._artifact = artifact
        self.fingerprint = fp
        self._config = config

    @property
    def staging_uri(self) -> str:
        return self._artifact.staging_uri

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the resolved run config, then publish with the manifest (fingerprint included) last."""
        from alloylm import storage

        if self._config is not None:
            storage.write_text(storage.join(self.staging_uri, "resolved_config.yaml"), self._config.resolved_yaml())
        return self._artifact.commit({**manifest, "fingerprint": self.fingerprint})


@contextmanager
def begin(uri: str, fp: str, config: RunConfig | None = None, *, overwrite: bool | None = None) -> Iterator[Building]:
    """Stage a new version of the artifact at `uri` (see `storage.begin_artifact`)."""
    from alloylm import storage

    allowed = overwrite if overwrite is not None else bool(config is not None and config.overwrite)
    with storage.begin_artifact(uri, overwrite=allowed) as artifact:
        yield Building(artifact, fp, config)
