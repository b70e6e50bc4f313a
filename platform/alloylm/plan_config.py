"""The `cluster:` section of a run config: the GPU cluster `alloylm plan` sizes the stages for.

Kept apart from `alloylm.plan` (which imports torch, transformers and DeepSpeed) so that loading a
run config stays light. `alloylm plan --gpus/--gpu-memory-gib/--nodes/--mfu/--gpu-tflops` override it.
"""

from __future__ import annotations

from pydantic import Field

from alloylm.schema import Frozen


class ClusterConfig(Frozen):
    """The target cluster of a run: how many GPUs, how much memory each, how fast."""

    gpus: int = Field(8, ge=0, description="GPUs per node (0: a CPU cluster; memory checks are skipped).")
    nodes: int = Field(1, ge=1, description="Nodes of the cluster.")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory of one GPU in GiB (null: unknown; `alloylm run` then skips the fit check)."
    )
    gpu_tflops: float = Field(
        312.0, gt=0, description="Peak dense 16-bit TFLOPS of one GPU (312: A100; 989: H100 SXM)."
    )
    mfu: float = Field(0.4, gt=0, le=1, description="Model FLOPs utilisation assumed for time estimates.")

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.nodes
