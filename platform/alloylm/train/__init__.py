"""Training stages on Ray Train: CPT, SFT, DPO and ORPO with DeepSpeed or DDP, full or LoRA.

Each method is one module with `max_steps(stage, job, world_size)` and
`build_trainer(stage, job, model, tokenizer, arguments)`; `STAGE_TRAINERS` maps the stage kind to it.
"""

from __future__ import annotations

from types import ModuleType


def _methods() -> dict[str, ModuleType]:
    from alloylm.train import cpt, dpo, orpo, sft

    return {"cpt": cpt, "sft": sft, "dpo": dpo, "orpo": orpo}


class _LazyRegistry(dict):
    """The registry, imported on first use: the method modules import TRL, which is slow."""

    def __missing__(self, kind: str) -> ModuleType:
        methods = _methods()
        if kind not in methods:
            raise KeyError(f"unknown training stage kind {kind!r}; known: {', '.join(sorted(methods))}")
        self.update(methods)
        return methods[kind]


STAGE_TRAINERS: dict[str, ModuleType] = _LazyRegistry()
