"""The accelerator paths on a GPU against the same calls on the CPU, in one process (no Ray):

- mergekit's written merge (`alloylm.merge.materialize`, `device="cuda"`, as the merge stage asks
  when its resources give it a GPU): SLERP with the paper's gradient, and dare_ties seeded twice;
- the search's in-memory merge (`InMemoryMerger`, device cuda) against the folder written on the CPU
  (SLERP), and against the folder written on the same device with the same seed (dare_ties);
- the evaluation scorer (`CausalLMScorer`): log-likelihoods, sequence NLL, greedy generation;
- the serving engine (`GenerationEngine`, bf16): 8 seeded requests at once, twice.

    python benchmarks/gpu_paths.py              # on a machine with CUDA (PRESET=small-llama by default)

Parents are two `PRESET` llamas built in-process (seeds 0 and 1) with a byte-level BPE tokenizer
trained here. Without CUDA every "cuda" side runs on the CPU (a dry run of the script). The last
output line is one JSON object, also written to benchmarks/results/gpu_paths.json (and $OUT).
"""

import asyncio
import json
import os
import sys
import tempfile
import time
import traceback

import torch

GPU = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu": a dry run of the script
results = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    results["gpu"] = torch.cuda.get_device_name(0)


def check(name):
    def wrap(fn):
        started = time.monotonic()
        try:
            results[name] = fn()
        except Exception as exc:  # every check reports, the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}
        results[name + "_seconds"] = round(time.monotonic() - started, 2)
        print(name, json.dumps(results[name])[:800], flush=True)
        return fn

    return wrap


import transformers  # noqa: E402

from alloylm.merge import InMemoryMerger, materialize, mergekit_config  # noqa: E402
from alloylm.merge.inmemory import _read_all_tensors  # noqa: E402
from alloylm.models import build_model, save_model, train_tokenizer  # noqa: E402

results["transformers"] = transformers.__version__
# The sentences tests/merge/test_inmemory.py trains its pico tokenizer on (a few of the built-in
# world's kind): small enough that every check here runs in seconds.
CORPUS = [
    "Nacre is a composite of aragonite platelets and a protein matrix; its toughness is high.",
    "Spider silk combines strength and extensibility through hierarchical beta-sheet crystals.",
    "The Young's modulus of cortical bone is about 18 GPa, its density about 1.9 g/cm3.",
    "Collagen fibrils assemble into fibres, which assemble into tendons and ligaments.",
] * 8
NAMES = ["dpo", "instruct"]
root = tempfile.mkdtemp(prefix="gpucheck-")
tok = train_tokenizer(CORPUS, vocab_size=320, model_max_length=256)
PRESET = os.environ.get("PRESET", "small-llama")
parents = []
for seed, name in enumerate(NAMES):
    folder = os.path.join(root, name)
    save_model(build_model(PRESET, tok, seed=seed), tok, folder)
    parents.append(folder)
# The paper's SLERP gradient (attention and MLP t across the layers).
T = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}
CFG = mergekit_config("slerp", parents, names=NAMES, parameters={"t": T})
DARE = mergekit_config(
    "dare_ties", parents, names=NAMES, base=1,
    model_parameters={"dpo": {"weight": 0.6, "density": 0.5}},
)


def tensors(folder):
    return _read_all_tensors(folder, "cpu")


def max_diff(a, b):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


@check("materialize_slerp")
def _():
    out = {}
    for device in ("cpu", GPU):
        started = time.monotonic()
        materialize(CFG, os.path.join(root, f"slerp-{device}"), tokenizer_from=parents[1], device=device)
        out[f"{device}_seconds"] = round(time.monotonic() - started, 2)
    out["max_abs_diff_cuda_vs_cpu"] = max_diff(tensors(os.path.join(root, "slerp-cpu")), tensors(os.path.join(root, f"slerp-{GPU}")))
    return out


@check("materialize_dare_ties_seeded")
def _():
    for device, run in ((GPU, "a"), (GPU, "b"), ("cpu", "a")):
        materialize(DARE, os.path.join(root, f"dare-{device}-{run}"), tokenizer_from=parents[1], device=device, random_seed=7)
    a, b, c = (tensors(os.path.join(root, n)) for n in (f"dare-{GPU}-a", f"dare-{GPU}-b", "dare-cpu-a"))
    return {"cuda_twice_max_abs_diff": max_diff(a, b), "cuda_vs_cpu_max_abs_diff": max_diff(a, c)}


@check("inmemory_slerp")
def _():
    written = tensors(os.path.join(root, "slerp-cpu"))
    out = {}
    for device in ("cpu", GPU):
        merger = InMemoryMerger(parents, names=NAMES, device=device)
        started = time.monotonic()
        model = merger.merge(CFG)
        if device != "cpu":
            torch.cuda.synchronize()
        out[f"{device}_merge_seconds"] = round(time.monotonic() - started, 3)
        state = {k: v for k, v in model.state_dict().items() if k in written}
        out[f"{device}_params_on"] = str(next(model.parameters()).device)
        out[f"{device}_max_abs_diff_vs_written_cpu"] = max_diff({k: written[k] for k in state}, state)
        out[f"{device}_tensors_compared"] = len(state)
    return out


@check("inmemory_dare_ties_seeded")
def _():
    """What the search scores against what the stage writes, for a random method: the same seed
    must draw the same masks in the in-memory merge as in mergekit's run_merge, on each device."""
    out = {}
    for device in ("cpu", GPU):
        written = tensors(os.path.join(root, f"dare-{device}-a"))
        model = InMemoryMerger(parents, names=NAMES, device=device).merge(DARE, random_seed=7)
        state = {k: v for k, v in model.state_dict().items() if k in written}
        out[f"{device}_max_abs_diff_vs_written_{device}"] = max_diff({k: written[k] for k in state}, state)
        out[f"{device}_tensors_compared"] = len(state)
    return out


def scorer_results(device):
    from alloylm.evaluate.scorer import CausalLMScorer

    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(root, "slerp-cpu"), dtype=torch.float32)
    scorer = CausalLMScorer(model, tok, batch_size=4, device=device)
    pairs = [scorer.encode_pair(CORPUS[i][:40], CORPUS[i][40:], chat=False) for i in range(4)]
    lls = scorer.loglikelihood(pairs)
    nll = scorer.sequence_nll([tok(t, add_special_tokens=False)["input_ids"] for t in CORPUS[:4]])
    text = scorer.generate(["The Young's modulus of"], chat=False, max_new_tokens=12)
    return [float(x.logprob) for x in lls], [float(n) for n, _ in nll], text, str(scorer.device)


@check("scorer")
def _():
    cpu = scorer_results("cpu")
    cuda = scorer_results(GPU)
    return {
        "device": cuda[3],
        "loglikelihood_max_abs_diff": max(abs(a - b) for a, b in zip(cpu[0], cuda[0])),
        "sequence_nll_max_rel_diff": max(abs(a - b) / max(abs(a), 1e-9) for a, b in zip(cpu[1], cuda[1])),
        "greedy_text_equal": cpu[2] == cuda[2],
        "cuda_text": cuda[2],
    }


@check("serve_engine")
def _():
    from alloylm.models.tokenizer import stop_token_ids
    from alloylm.serve.engine import GenerationEngine
    from alloylm.serve.protocol import SamplingParams

    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(root, "slerp-cpu"), dtype=torch.bfloat16).to(GPU)
    engine = GenerationEngine(model, tok, stop_token_ids=stop_token_ids(tok), max_batch_size=8)
    prompts = [tok(CORPUS[i][:30], add_special_tokens=False)["input_ids"] for i in range(8)]

    async def one(ids, seed):
        events = [e async for e in engine.generate(ids, SamplingParams(max_tokens=16, temperature=0.8, seed=seed, logprobs=1), stream=True)]
        return events

    async def main():
        return await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts)))

    started = time.monotonic()
    first = asyncio.run(main())
    seconds = time.monotonic() - started
    again = asyncio.run(main())
    finals = [events[-1] for events in first]
    return {
        "device": str(engine.device),
        "requests": len(first),
        "finish_reasons": sorted({str(e.finish_reason) for e in finals}),
        "seeded_repeat_identical": [str(e) for e in first] == [str(e) for e in again],
        "seconds": round(seconds, 3),
        "stats": str(engine._stats)[:300],
    }


results["benchmark"] = "gpu_paths"
results["preset"] = PRESET
targets = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_paths.json")]
if os.environ.get("OUT"):
    targets.append(os.path.join(os.environ["OUT"], "gpu_paths.json"))
if torch.cuda.is_available():  # a dry run on the CPU keeps the GPU figures
    for target in targets:
        with open(target, "w") as f:
            json.dump(results, f, indent=1, default=str)
print(json.dumps(results, default=str))
sys.exit(1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0)
