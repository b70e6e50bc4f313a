"""`alloylm plan`'s model-state estimate against the tensors a real DeepSpeed engine holds (CPU, fp32).

    .venv/bin/python benchmarks/plan_accuracy.py                 # small-llama, 2 workers, DDP and ZeRO 1-3
    .venv/bin/python benchmarks/plan_accuracy.py --stages 3 --preset tiny-llama

For each ZeRO stage, two gloo processes build the preset, wrap it in `deepspeed.initialize` (torch
AdamW, fp32, as AlloyLM trains on CPU), run one optimizer step and add up, on rank 0, the bytes of
the tensors the engine keeps between steps: the model weights it holds (ZeRO-3: the rank's shards,
`ds_tensor`), the optimizer's own fp32 partition (ZeRO 1/2's `single_partition_of_fp32_groups`,
ZeRO-3's `fp32_partitioned_groups_flat`, when it is not the weights themselves) and Adam's
`exp_avg`/`exp_avg_sq`. Gradients are left out: DeepSpeed frees them after the step. DDP (stage
`none`) is the same count for a plain torch AdamW step in one process. It prints these next to
`alloylm.plan.model_states` (weights + optimizer columns) and the peak RSS of rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile


def _held_bytes(model, optimizer, stage: int | None) -> dict[str, int]:
    weights = 0
    for p in model.parameters():
        tensor = getattr(p, "ds_tensor", None) if stage == 3 else p.data
        weights += tensor.numel() * tensor.element_size()
    inner = getattr(optimizer, "optimizer", optimizer)
    adam = sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )
    master = 0
    if stage in (1, 2):
        master = sum(t.numel() * t.element_size() for t in optimizer.single_partition_of_fp32_groups)
    elif stage == 3:
        ptrs = {getattr(p, "ds_tensor", p).data_ptr() for p in model.parameters()}
        flats = {t.data_ptr() for t in optimizer.fp16_partitioned_groups_flat if t is not None}
        master = sum(
            t.numel() * t.element_size()
            for t in optimizer.fp32_partitioned_groups_flat
            if t.data_ptr() not in ptrs | flats
        )
    return {"weights": weights, "optimizer": master + adam}


def _model(preset: str):
    import torch
    from transformers import AutoModelForCausalLM

    from alloylm.models.presets import preset_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(preset_config(preset, vocab_size=2048))


def _worker(rank: int, world: int, port: int, stage: int, preset: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    from alloylm.warm import use_package_ninja

    use_package_ninja()  # the ninja that built DeepSpeed's CPU op (`make setup`), not a system one
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=_model(preset), config=config)
    ids = torch.randint(0, 2048, (1, 32))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    held = _held_bytes(engine.module, optimizer, stage)
    held["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rank == 0:
        with open(out, "w") as f:
            json.dump(held, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # `destroy_process_group` only drops torch's own reference: DeepSpeed's groups and ZeRO-3's
    # gather handles keep the gloo process group alive into interpreter finalization, where its
    # worker threads can be torn down joinable and abort the process (SIGABRT, "terminate called
    # without an active exception"; pytorch/pytorch#179291). The result is written and both
    # ranks are past the barrier, so leave without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def measure(stage: int | None, *, preset: str = "small-llama", workers: int = 2) -> dict[str, int]:
    """Bytes of weights and optimizer states one rank holds after a step (stage None: plain DDP)."""
    if stage is None:
        import torch

        model = _model(preset)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 2048, (1, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        return _held_bytes(model, optimizer, None)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "held.json")
        mp.spawn(_worker, args=(workers, port, stage, preset, out), nprocs=workers, join=True)
        with open(out) as f:
            return json.load(f)


def estimate(stage: int | None, *, preset: str = "small-llama", workers: int = 2) -> dict[str, float]:
    from alloylm.models.presets import preset_config
    from alloylm.plan import count_parameters, model_states

    memory = model_states(count_parameters(preset_config(preset, vocab_size=2048)), zero_stage=stage, precision="fp32", workers=workers)
    # ZeRO-3's estimate adds the largest layer gathered for compute; between steps it is released.
    gathered = count_parameters(preset_config(preset, vocab_size=2048)).largest_layer * 4 if stage == 3 else 0
    return {"weights": memory.parameters - gathered, "optimizer": memory.optimizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small-llama")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stages", default="none,1,2,3", help="comma-separated: none (DDP), 0, 1, 2, 3")
    args = parser.parse_args()
    print("| stage | weights measured | weights estimated | optimizer measured | optimizer estimated | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for text in args.stages.split(","):
        stage = None if text == "none" else int(text)
        held = measure(stage, preset=args.preset, workers=args.workers)
        est = estimate(stage, preset=args.preset, workers=args.workers)
        rss = held.get("peak_rss_bytes")
        print(
            f"| {text} | {held['weights']:,} | {est['weights']:,.0f} | {held['optimizer']:,} | {est['optimizer']:,.0f} "
            f"| {rss / 2**20:.0f} |" if rss else f"| {text} | {held['weights']:,} | {est['weights']:,.0f} | {held['optimizer']:,} | {est['optimizer']:,.0f} | - |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
