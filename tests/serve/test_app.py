"""Tests of alloylm.serve: the config, the batching engine, and the OpenAI API over real HTTP.

The HTTP tests drive a Ray Serve application on the session's local Ray cluster with the official
`openai` client (and raw HTTP where the client hides the wire format). The models are tiny and
untrained, so their text is noise: the tests check the protocol, batching, limits and auth, not
quality. `min_tokens` (vLLM's extension, which AlloyLM honours) pins answer lengths where a test
needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest
import torch
import yaml
from pydantic import ValidationError

from alloylm.models import build_model, save_model, train_tokenizer
from alloylm.serve import API_KEYS_ENV, ServeConfig
from alloylm.serve.auth import APIKeyCheck, key_digest, keys_from_env, keys_from_file
from alloylm.serve.detokenizer import IncrementalText
from alloylm.serve.engine import GenerationEngine
from alloylm.serve.protocol import APIError, SamplingParams

REPO = Path(__file__).resolve().parents[2]
SERVING = REPO / "serving"
KEY = "test-key-1"
_SENTENCES = [
    f"Material {i} has a toughness of {i * 3 % 17} MPa and a modulus of {i * 7 % 23} GPa; "
    f"organism {i % 11} grows it in {i % 5 + 2} hierarchical levels."
    for i in range(300)
]
_CHAT = [
    {"role": "system", "content": "You answer questions about biological materials."},
    {"role": "user", "content": "What is nacre made of?"},
]


# -------------------------------------------------------------------------------------------
# Models (built once per module) and the engine
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_SENTENCES, vocab_size=600)


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory) -> dict[str, str]:
    """Two variants of one tiny Llama (different seeds), saved as Hugging Face folders."""
    root = tmp_path_factory.mktemp("serve-models")
    dirs = {}
    for name, seed in (("merged", 0), ("dpo", 1)):
        dirs[name] = str(root / name)
        save_model(build_model("tiny-llama", tokenizer, seed=seed), tokenizer, dirs[name])
    return dirs


def test_a_default_max_tokens_is_cut_to_the_contexts_room_and_a_given_one_is_not():
    # As vLLM: a request that set no limit gets what the context has room for after its prompt;
    # one that set max_tokens past the context gets a 400 naming it (test_bad_requests_get_openai_errors).
    from types import SimpleNamespace

    from alloylm.serve.app import ModelServer

    room_for = ModelServer.func_or_class._room_for
    server = SimpleNamespace(context_length=100)
    default = SamplingParams(max_tokens=8, max_tokens_param=None)
    assert room_for(server, default, 95).max_tokens == 5
    assert room_for(server, default, 50) is default
    given = SamplingParams(max_tokens=8)
    assert room_for(server, given, 95) is given


def test_a_prompt_that_fills_the_context_may_be_scored_but_not_continued(tokenizer):
    """lm-eval's rolling log-likelihood sends windows of exactly max_length tokens with echo and
    max_tokens 0: they were refused as leaving no room, though nothing is generated."""
    from types import SimpleNamespace

    from alloylm.serve.app import GenerationRequest, ModelServer
    from alloylm.serve.config import LimitsConfig

    server = SimpleNamespace(context_length=16, vocab_size=len(tokenizer), limits=LimitsConfig(max_prompt_tokens=64), tokenizer=tokenizer)
    prompt_ids = ModelServer.func_or_class._prompt_ids
    full = list(range(5, 21))  # 16 ids: the whole context
    score = GenerationRequest(kind="completion", params=SamplingParams(max_tokens=0, prompt_logprobs=0), prompts=(full,), echo=True)
    assert [ids for ids, _ in prompt_ids(server, score)] == [full]
    for params in (SamplingParams(max_tokens=1), SamplingParams(max_tokens=0, max_tokens_param=None)):
        with pytest.raises(APIError, match="which leaves no room"):
            prompt_ids(server, GenerationRequest(kind="completion", params=params, prompts=(full,)))
    with pytest.raises(APIError, match="the prompt has 17"):
        prompt_ids(server, GenerationRequest(kind="completion", params=SamplingParams(max_tokens=0), prompts=([*full, 5],)))
    # And the engine scores such a prompt: a model whose context is 16 positions, 16 ids.
    model = build_model("tiny-llama", tokenizer, seed=0, max_position_embeddings=16)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[], max_batch_size=2)
    (events,) = _collect(engine, [(full, SamplingParams(max_tokens=0, prompt_logprobs=0), 0.0)])
    prompt_logprobs = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    assert events[-1].finish_reason == "length" and len(prompt_logprobs) == 16 and prompt_logprobs[0].logprob is None


def test_a_stopped_engine_answers_503_and_keeps_its_error_text_in_the_log(model_dirs):
    """A streamed answer sent the engine's fatal error text to the client (a CUDA message, a path),
    and a whole answer became a 500 naming Ray's wrapper; now both get a 503 to retry (Serve's
    health check replaces the replica), with the error's kind only."""
    from alloylm.serve.app import GenerationRequest, ModelServer, _error_from_fields

    server = ModelServer.func_or_class("merged", model_dirs["merged"], ServeConfig.model_validate({"model": "merged"}))
    try:
        server.engine._fatal = RuntimeError("CUDA error at /secret/weights/path")  # what the engine thread sets as it dies
        request = GenerationRequest(kind="completion", params=SamplingParams(max_tokens=4), prompts=("Material 3 has",))
        whole = asyncio.run(server.complete(request))["error"]

        async def streamed():
            return [event async for event in server.stream(request)]

        first, *rest = asyncio.run(streamed())
        assert "prompt_tokens" in first and len(rest) == 1
        for error in (whole, rest[0]["error"]):
            assert (error["status"], error["code"]) == (503, "overloaded"), error
            assert "RuntimeError" in error["message"] and "secret" not in error["message"], error
        assert _error_from_fields(whole).headers == {"Retry-After": "1"}
    finally:
        server.engine.close()


def test_a_client_that_leaves_at_the_role_chunk_cancels_its_generation():
    """The chat stream's first chunks (the role) were sent before the try whose finally cancels the
    replica's generation, so a client gone by then left it generating to max_tokens."""
    from alloylm.serve.app import _sse_chunks

    class Events:
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            await asyncio.sleep(3600)  # the replica is still generating

        def cancel(self):
            Events.cancelled = True

    async def leave_after_the_first_chunk():
        chunks = _sse_chunks(Events(), kind="chat", request_id="r", model="m", prompt_tokens=3, choices=2, include_usage=False)
        first = await chunks.__anext__()
        await chunks.aclose()
        return first

    first = asyncio.run(leave_after_the_first_chunk())
    assert json.loads(first.decode().removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert Events.cancelled


def _collect(engine: GenerationEngine, requests: list[tuple[list[int], SamplingParams, float]], stream=False):
    """Run requests (prompt ids, params, arrival delay in s) through `engine` concurrently."""

    async def one(ids, params, delay):
        await asyncio.sleep(delay)
        events = [event async for event in engine.generate(ids, params, stream=stream)]
        return events

    async def run():
        return await asyncio.gather(*(one(*request) for request in requests))

    return asyncio.run(run())


def test_scoring_prompts_admitted_together_are_prefilled_within_a_logits_budget(tokenizer):
    """Scoring keeps every position's logits; prompts admitted in one step were prefilled as one
    batch however large (an lm-eval batch of 32 x 2,048 tokens over a 128k vocabulary is 33 GB)."""
    model = build_model("tiny-llama", tokenizer, seed=0)
    prompts = [tokenizer(text)["input_ids"] for text in ("Material 3 has a toughness", "Nacre", "The modulus of bone is 20 GPa")]
    results = {}
    for budget in (1 << 28, 1):  # room for all three; for none (each row alone is a part of its own)
        engine = GenerationEngine(model, tokenizer, stop_token_ids=[], max_batch_size=8, batch_wait_timeout_s=0.5, max_scoring_logits=budget)
        try:
            events = _collect(engine, [(ids, SamplingParams(max_tokens=0, prompt_logprobs=2), 0.0) for ids in prompts])
            results[budget] = ([e[-1].prompt_logprobs for e in events], engine.stats().prefills)
        finally:
            engine.close()
    (whole, one_prefill), (parts, three_prefills) = results.values()
    assert (one_prefill, three_prefills) == (1, 3)
    for a, b in zip(whole, parts):
        assert [t.token for t in a] == [t.token for t in b]
        assert all(x.logprob is None and y.logprob is None or abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a, b))


def test_engine_batched_greedy_matches_generate_one_by_one(tokenizer):
    # Staggered arrivals join a running batch (left-padded, KV caches joined); each answer must
    # equal transformers' own greedy generate on that prompt alone. tiny-mistral's prompt is longer
    # than its sliding window (128), which the joined full cache must still respect.
    for preset, long_prompt in (("tiny-llama", 40), ("tiny-mistral", 200)):
        model = build_model(preset, tokenizer, seed=0)
        prompts = [
            tokenizer("Material 3 has")["input_ids"],
            tokenizer(" ".join(_SENTENCES[:long_prompt]))["input_ids"][:long_prompt * 4],
            tokenizer("x")["input_ids"],
        ]
        expected = []
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            expected.append(out[0, len(ids) :].tolist())
        engine = GenerationEngine(model, tokenizer, stop_token_ids=[], max_batch_size=8)
        try:
            results = _collect(
                engine, [(ids, SamplingParams(max_tokens=24, temperature=0.0), 0.02 * i) for i, ids in enumerate(prompts)]
            )
        finally:
            engine.close()
        assert len(prompts[1]) > 128 or preset == "tiny-llama"
        for ids, want, events in zip(prompts, expected, results):
            (final,) = events
            assert final.finish_reason == "length" and final.completion_tokens == 24
            assert final.text == tokenizer.decode(want, skip_special_tokens=True), (preset, len(ids))


def test_top_p_samples_only_from_the_head_of_the_distribution(tokenizer):
    """Nucleus sampling: at temperature 1 the engine draws only among the most probable tokens whose
    mass first reaches top_p. With top_p between p1 and p1 + p2 that is exactly the top two tokens
    (read here from the model's own next-token distribution), both drawn over 48 seeds; with
    top_p = 1 other tokens come too; with top_p below p1, only the greedy token."""
    model = build_model("tiny-llama", tokenizer, seed=0)
    prompt = tokenizer("Material 5 has")["input_ids"]
    with torch.no_grad():
        probs = model(torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
    (p1, p2, p3), (t1, t2, _) = probs.topk(3)
    assert p1 / p2 > 1.001 and p2 / p3 > 1.001  # no near-tie that batching noise could reorder
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[], max_batch_size=16)

    def drawn(top_p: float) -> set[int]:
        # logprobs=0: each event names the token it drew (the sampling itself is the same)
        params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=seed, logprobs=0) for seed in range(48)]
        return {final.logprobs[0].token for (final,) in _collect(engine, [(prompt, p, 0.0) for p in params])}

    try:
        head = drawn(float(p1 + p2 / 2))
        everything = drawn(1.0)
        greedy = drawn(float(p1 / 2))
    finally:
        engine.close()
    assert head == {int(t1), int(t2)}
    assert everything - {int(t1), int(t2)}
    assert greedy == {int(t1)}


def test_a_failed_generation_step_tells_the_client_its_kind_not_its_text(tokenizer, monkeypatch):
    model = build_model("tiny-llama", tokenizer, seed=0)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[], max_batch_size=4)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory at /secret/path/model.bin")

    monkeypatch.setattr(model, "forward", broken)
    try:
        ((final,),) = _collect(engine, [(tokenizer("Material 3 has")["input_ids"], SamplingParams(max_tokens=4), 0.0)])
    finally:
        engine.close()
    assert final.finish_reason == "error"
    assert final.text == "generation failed (RuntimeError); the server's log has the details"


def test_engine_honours_each_requests_own_parameters(tokenizer):
    model = build_model("tiny-llama", tokenizer, seed=0)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[1, 4], max_batch_size=16)
    prompt = tokenizer("Material 5 has")["input_ids"]
    try:
        lengths = [3, 9, 17, 30, 5, 12]
        requests = [(prompt, SamplingParams(max_tokens=n, min_tokens=n, temperature=1.0, seed=n), 0.0) for n in lengths]
        results = _collect(engine, requests)
        stats = engine.stats()
    finally:
        engine.close()
    # Every request stopped at its own max_tokens, whatever its batch-mates asked for ...
    assert [events[-1].completion_tokens for events in results] == lengths
    assert all(events[-1].finish_reason == "length" for events in results)
    # ... and they did share batches: fewer steps than tokens.
    assert stats.largest_batch > 1
    assert stats.steps < sum(lengths)


def _model_that_always_says(tokenizer, token_id: int):
    """A tiny-llama whose every step prefers `token_id` by far."""
    model = build_model("tiny-llama", tokenizer, seed=0)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token_id] = 1e4
    model.lm_head = head
    return model


def test_engine_stops_at_stop_tokens_unless_min_tokens(tokenizer):
    # A model whose every step prefers <|end_of_text|> (id 1) by far.
    model = _model_that_always_says(tokenizer, tokenizer.eos_token_id)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[tokenizer.eos_token_id], max_batch_size=4)
    ids = tokenizer("Material 1")["input_ids"]
    try:
        (plain,), (held,) = _collect(
            engine,
            [
                (ids, SamplingParams(max_tokens=20, temperature=0.0), 0.0),
                (ids, SamplingParams(max_tokens=20, temperature=0.0, min_tokens=5), 0.0),
            ],
        )
    finally:
        engine.close()
    assert (plain.finish_reason, plain.completion_tokens, plain.text) == ("stop", 1, "")
    # The stop token is masked for the first 5 tokens, then chosen at once.
    assert (held.finish_reason, held.completion_tokens) == ("stop", 6)


def test_engine_stop_strings_wait_for_min_tokens(tokenizer):
    """A stop string counts only after min_tokens, as a stop token does (it stopped at once)."""
    (comma,) = tokenizer(",", add_special_tokens=False)["input_ids"]
    model = _model_that_always_says(tokenizer, comma)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[tokenizer.eos_token_id], max_batch_size=4)
    ids = tokenizer("Material 1")["input_ids"]
    try:
        (plain,), (held,) = _collect(
            engine,
            [
                (ids, SamplingParams(max_tokens=20, temperature=0.0, stop=[","]), 0.0),
                (ids, SamplingParams(max_tokens=20, temperature=0.0, stop=[","], min_tokens=5), 0.0),
            ],
        )
    finally:
        engine.close()
    assert (plain.finish_reason, plain.completion_tokens, plain.text) == ("stop", 1, "")
    assert (held.finish_reason, held.completion_tokens, held.text) == ("stop", 6, ",,,,,")


def _sentencepiece_style_tokenizer():
    """A Llama-2/Mistral-style tokenizer: Metaspace pre-tokenizer and decoder (prepend_scheme "first")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.train_from_iterator(["The capital of France is Paris, and of Italy Rome."] * 50,
                             trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_an_answer_keeps_the_space_a_sentencepiece_decoder_drops_at_the_start():
    """Mistral's and Llama 2's decoders drop a text's first leading space: decoded alone, a
    completion of "The capital of France is" read "Paris", and prompt + answer "isParis"."""
    from alloylm.serve.detokenizer import decode_continuation

    tok = _sentencepiece_style_tokenizer()
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    answer = tok("The capital of France is Paris", add_special_tokens=False)["input_ids"][len(prompt):]
    assert tok.decode(answer) == "Paris"  # what decoding the answer alone gives
    assert decode_continuation(tok, prompt[-5:], answer) == " Paris"
    streamed = IncrementalText(tok, context=prompt[-5:])
    assert "".join(streamed.push(t) for t in answer) + streamed.finish() == " Paris"

    model = _model_that_always_says(tok, answer[0])
    engine = GenerationEngine(model, tok, stop_token_ids=[tok.eos_token_id], max_batch_size=2)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0)
        (whole,), (streamed,) = _collect(engine, [(prompt, params, 0.0)]), _collect(engine, [(prompt, params, 0.0)], stream=True)
    finally:
        engine.close()
    first = tok.decode(answer[:1], skip_special_tokens=True)
    assert whole[-1].text == "".join(e.text for e in streamed) == " " + first


def test_logprob_tokens_keep_the_space_a_sentencepiece_decoder_drops_at_the_start():
    """A logprob's token text is decoded after the tokens before it, as the answer is: decoded alone,
    Mistral's and Llama 2's decoders dropped its leading space ("Paris" for " Paris"), and the
    tokens' texts did not add up to the answer (`text_offset` disagreed with the text)."""
    from types import SimpleNamespace

    from alloylm.serve.app import ModelServer
    from alloylm.serve.protocol import TokenLogprob

    tok = _sentencepiece_style_tokenizer()
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    full = tok("The capital of France is Paris, and of Italy Rome.", add_special_tokens=False)["input_ids"]
    answer = full[len(prompt):]
    server = object.__new__(ModelServer.func_or_class)  # its logprob formatting only: no model
    server.tokenizer, server._token_texts, server._context_text = tok, {}, ((), "")
    entries = [TokenLogprob(t, -0.5, ((t, -0.5),)) for t in answer]

    def asked(kind: str) -> SimpleNamespace:
        return SimpleNamespace(kind=kind, params=SimpleNamespace(logprobs=1))

    completion = server._logprobs(asked("completion"), entries, previous=prompt)
    assert "".join(completion["tokens"]) == " Paris, and of Italy Rome."
    assert completion["tokens"][0].startswith(" ") and list(completion["top_logprobs"][0]) == [completion["tokens"][0]]
    assert completion["text_offset"] == [sum(len(t) for t in completion["tokens"][:i]) for i in range(len(answer))]
    chat = server._logprobs(asked("chat"), entries, previous=prompt)
    assert [c["token"] for c in chat["content"]] == completion["tokens"]
    # Streamed in two pieces, the second after the first's tokens: the same texts.
    first = server._logprobs(asked("completion"), entries[:2], previous=prompt)
    rest = server._logprobs(asked("completion"), entries[2:], previous=[*prompt, *answer[:2]], offset=sum(map(len, first["tokens"])))
    assert first["tokens"] + rest["tokens"] == completion["tokens"]
    assert first["text_offset"] + rest["text_offset"] == completion["text_offset"]


def test_engine_seeds_reproduce_and_differ(tokenizer):
    model = build_model("tiny-llama", tokenizer, seed=0)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[], max_batch_size=4)
    ids = tokenizer("Material 8 has")["input_ids"]
    try:
        texts = [
            _collect(engine, [(ids, SamplingParams(max_tokens=16, temperature=1.0, seed=seed), 0.0)])[0][-1].text
            for seed in (7, 7, 8)
        ]
    finally:
        engine.close()
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_engine_drops_a_cancelled_sequence(tokenizer):
    model = build_model("tiny-llama", tokenizer, seed=0)
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[1, 4], max_batch_size=1)
    ids = tokenizer("Material 2")["input_ids"]

    async def run():
        long = engine.generate(ids, SamplingParams(max_tokens=1500, min_tokens=1500, temperature=0.0))
        first = await long.__anext__()
        await long.aclose()  # the client went away
        # With one batch slot, this request is only served once the cancelled one has left it.
        return first, [e async for e in engine.generate(ids, SamplingParams(max_tokens=4, min_tokens=4))]

    try:
        first, short = asyncio.run(run())
        stats = engine.stats()
    finally:
        engine.close()
    assert first.finish_reason is None
    assert short[-1].finish_reason == "length" and short[-1].completion_tokens == 4
    assert stats.tokens_generated < 200  # far from the 1500 the cancelled request asked for


def test_incremental_text_holds_back_stop_prefixes_and_split_characters(tokenizer):
    text = "Nacre é 🙂 tough; STOP here"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Without stop strings: the pieces join to the text, and no piece carries half a character.
    plain = IncrementalText(tokenizer)
    pieces = [plain.push(i) for i in ids] + [plain.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # With a stop string spread over several tokens: nothing from it is ever released.
    stopped = IncrementalText(tokenizer, ("STOP",))
    released = ""
    for i in ids:
        released += stopped.push(i)
        assert "S" not in released  # not even the start of "STOP" before it is complete
        if stopped.stopped:
            break
    released += stopped.finish()
    assert stopped.stopped and released == "Nacre é 🙂 tough; "

    # min_tokens: a stop string inside the first min_tokens tokens does not stop (vLLM's rule).
    text = "a; b; c; d; e; f; g; h"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    early = IncrementalText(tokenizer, (";",), min_tokens=5)
    released = "".join(early.push(i) for i in ids if not early.stopped) + early.finish()
    first_tokens = tokenizer.decode(ids[:5])
    assert early.stopped and released.startswith(first_tokens) and ";" not in released[len(first_tokens):]
    assert released.count(";") == first_tokens.count(";") >= 2, (released, first_tokens)


# -------------------------------------------------------------------------------------------
# Config, auth and the shipped Serve configs
# -------------------------------------------------------------------------------------------


def test_serve_config_defaults_and_checks():
    config = ServeConfig()
    assert config.variant_names == ["merged"] and config.backend == "transformers"
    assert ServeConfig(model="dpo", variants=["merged", "dpo"]).variant_names == ["dpo", "merged"]
    bad = [
        ({"model": "sft", "variants": ["merged", "dpo"]}, "must be one of variants"),
        ({"variants": ["merged", "merged"]}, "listed twice"),
        ({"deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "must not exceed"),
        ({"deployment": {"num_replicas": 2, "autoscaling": {}}}, "not both"),
        ({"batching": {"max_batch_size": 128}}, "a batch could never fill"),
        ({"limits": {"max_tokens": 10, "default_max_tokens": 20}}, "must not exceed"),
        ({"vllm": {"engine_kwargs": {"trust_remote_code": True}}}, "trust_remote_code"),
        ({"route_prefix": "api/"}, "route_prefix"),
        ({"backend": "tgi"}, "transformers"),
        ({"batching": {"max_batch": 4}}, "Extra inputs are not permitted"),
    ]
    for data, message in bad:
        with pytest.raises(ValidationError, match=message):
            ServeConfig.model_validate(data)
    with pytest.raises(ValidationError):
        config.port = 9000  # frozen


def test_variant_sources_resolve_to_finished_stage_folders(tmp_path):
    from alloylm.serve import variant_sources

    config = ServeConfig(model="merged", variants=["merged", "instruct"], sources={"instruct": "org/instruct-model"})
    assert variant_sources(config, "s3://bucket/runs/quick", require_complete=False) == {
        "merged": "s3://bucket/runs/quick/stages/merged",
        "instruct": "org/instruct-model",
    }
    run = tmp_path / "quick"
    (run / "stages" / "merged").mkdir(parents=True)
    with pytest.raises(ValueError, match="merged not ready"):  # no manifest: an unfinished stage
        variant_sources(config, str(run))
    (run / "stages" / "merged" / "manifest.json").write_text("{}")
    assert variant_sources(config, str(run))["merged"] == str(run / "stages" / "merged")


def test_api_keys_from_env_and_file(tmp_path):
    assert keys_from_env({API_KEYS_ENV: " a1 ,, b2 ,"}) == ["a1", "b2"]
    assert keys_from_env({}) == []
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated 2026-01\nfile-key\n\n  other-key  \n")
    assert keys_from_file(str(key_file)) == ["file-key", "other-key"]
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no API key"):
        keys_from_file(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot be read"):
        keys_from_file(str(tmp_path / "missing"))
    check = APIKeyCheck.from_sources(str(key_file), extra_digests=[key_digest("driver-key")], environ={API_KEYS_ENV: "env-key"})
    assert check.key_count == 4 and not check.is_open
    for header in ("Bearer file-key", "bearer other-key", "Bearer env-key", "Bearer driver-key"):
        assert check.allows(header), header
    for header in (None, "", "Bearer", "Bearer wrong", "Basic file-key", "file-key"):
        assert not check.allows(header), header
    assert APIKeyCheck([]).is_open and APIKeyCheck([]).allows(None)


def _shipped_apps() -> list[tuple[str, dict]]:
    """(file, application) for every application of every Serve config under serving/."""
    apps = []
    for path in sorted(SERVING.rglob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        if "spec" in document:  # a RayService fragment: its serveConfigV2 is a YAML string
            document = yaml.safe_load(document["spec"]["serveConfigV2"])
        for app in document["applications"]:
            apps.append((path.name, app))
    return apps


def test_every_shipped_serve_config_builds():
    from ray.serve import Application

    from alloylm.serve.app import build_app
    from alloylm.serve.llm_backend import VLLMUnavailableError, vllm_available

    apps = _shipped_apps()
    assert {name for name, _ in apps} >= {"serve_config.yaml", "serve_config_vllm.yaml", "rayservice_serve_config.yaml"}
    for name, app in apps:
        assert app["import_path"] == "alloylm.serve.app:build_app", name
        config = ServeConfig.model_validate(app["args"])
        assert not config.missing_sources(), name
        if config.backend == "vllm" and not vllm_available():
            with pytest.raises(VLLMUnavailableError, match="vLLM"):
                build_app(app["args"])
        else:
            assert isinstance(build_app(app["args"]), Application), name
    with pytest.raises(ValueError, match="invalid AlloyLM serve args: batching.max_batch_size"):
        build_app({"batching": {"max_batch_size": 0}})
    with pytest.raises(ValueError, match="no model folder for variant"):
        build_app({"model": "merged"})


def test_vllm_llm_configs_follow_ray_serve_llm_schema():
    from alloylm.serve.llm_backend import llm_configs, openai_app_args, validate_llm_config

    config = ServeConfig.model_validate(
        {
            "variants": ["merged", "instruct"],
            "sources": {"merged": "s3://bucket/run/stages/merged/", "instruct": "org/instruct"},
            "backend": "vllm",
            "deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "max_ongoing_requests": 96},
            "vllm": {"accelerator_type": "H100", "tensor_parallel_size": 2, "max_model_len": 4096, "engine_kwargs": {"enable_prefix_caching": True}},
        }
    )
    configs = llm_configs(config)
    assert [c["model_loading_config"]["model_id"] for c in configs] == ["merged", "instruct"]
    merged = validate_llm_config(configs[0])
    assert merged.model_id == "merged"
    assert merged.model_loading_config.model_source.bucket_uri == "s3://bucket/run/stages/merged"
    assert configs[1]["model_loading_config"]["model_source"] == "org/instruct"
    kwargs = configs[0]["engine_kwargs"]
    assert kwargs["trust_remote_code"] is False and kwargs["tensor_parallel_size"] == 2 and kwargs["max_model_len"] == 4096
    assert kwargs["enable_prefix_caching"] is True and configs[0]["accelerator_type"] == "H100"
    # A chat request without max_tokens is held to limits.max_tokens by vLLM's own generation
    # default (it ran to the room left in max_model_len); a smaller one the config gives stands.
    assert kwargs["override_generation_config"] == {"max_new_tokens": config.limits.max_tokens}
    smaller = config.model_copy(update={"vllm": config.vllm.model_copy(update={"engine_kwargs": {
        "override_generation_config": {"max_new_tokens": 64, "temperature": 0.7}}})})
    assert llm_configs(smaller)[0]["engine_kwargs"]["override_generation_config"] == {"max_new_tokens": 64, "temperature": 0.7}
    assert configs[0]["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    assert configs[0]["deployment_config"]["max_ongoing_requests"] == 96
    assert openai_app_args(config) == {"llm_configs": configs}
    with pytest.raises(ValueError, match="Invalid deployment config"):
        validate_llm_config({**configs[0], "deployment_config": {"max_ongoing_requests": -5}})


def test_vllm_backend_passes_scoring_fields_within_alloylms_limits():
    # vLLM serves logprobs, echo, max_tokens 0 and n itself; the ingress holds them to `limits`.
    # Ray Serve LLM's request classes need vLLM to import, so plain objects with its field names
    # stand for them here.
    from types import SimpleNamespace

    from alloylm.serve.config import LimitsConfig
    from alloylm.serve.llm_backend import check_vllm_request, llm_configs
    from alloylm.serve.protocol import APIError

    limits = LimitsConfig(max_tokens=64, default_max_tokens=16, max_n=4, max_logprobs=5)

    def completion(**fields):
        return SimpleNamespace(**{"n": 1, "logprobs": None, "echo": False, "max_tokens": 16, **fields})

    def chat(**fields):
        return SimpleNamespace(**{"n": 1, "logprobs": False, "top_logprobs": None, "echo": False, "max_tokens": None, "max_completion_tokens": 8, **fields})

    for body, method in (
        (completion(logprobs=5, echo=True, max_tokens=0), "completions"),
        (completion(n=4, logprobs=1, max_tokens=64), "completions"),
        (chat(logprobs=True, top_logprobs=20, n=4), "chat"),
        (SimpleNamespace(input="x"), "embeddings"),
    ):
        check_vllm_request(body, method, limits)
    for body, method, param in (
        (completion(logprobs=6), "completions", "logprobs"),
        (completion(n=5), "completions", "n"),
        (completion(max_tokens=0), "completions", "max_tokens"),
        (completion(max_tokens=65), "completions", "max_tokens"),
        (chat(echo=True), "chat", "echo"),
        (chat(top_logprobs=3), "chat", "top_logprobs"),
        (chat(max_completion_tokens=100), "chat", "max_tokens"),
        (completion(stop=["a", "b", "c", "d", "e"]), "completions", "stop"),
    ):
        with pytest.raises(APIError) as err:
            check_vllm_request(body, method, limits)
        assert (err.value.status, err.value.param) == (400, param), body
    check_vllm_request(completion(stop="one string"), "completions", limits)  # a string is one stop sequence
    config = ServeConfig.model_validate({"model": "m", "sources": {"m": "org/m"}, "backend": "vllm", "limits": {"max_logprobs": 5}})
    assert llm_configs(config)[0]["engine_kwargs"]["max_logprobs"] == 20  # chat's top_logprobs reach 20


# -------------------------------------------------------------------------------------------
# The application over HTTP
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_port(ray_cluster, ray_processes):
    """Ray Serve on a free loopback port, shut down when this module is done."""
    from ray import serve

    (port,) = ray_processes.free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def api_url(serve_port, model_dirs) -> str:
    """The main app: variants merged (default) and dpo, API keys from $ALLOYLM_API_KEYS."""
    from alloylm.serve import serve_run

    config = ServeConfig.model_validate(
        {
            "model": "merged",
            "variants": ["merged", "dpo"],
            "port": serve_port,
            "batching": {"max_batch_size": 16},
            "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 32},
            "ingress": {"num_cpus": 0.1},
            "limits": {"max_prompt_tokens": 128, "max_tokens": 256, "default_max_tokens": 8, "max_n": 4},
        }
    )
    # Read by serve_run in this process; only the keys' digests reach the (already running) cluster.
    os.environ[API_KEYS_ENV] = f"{KEY}, test-key-2"
    try:
        return serve_run(config, model_dirs, blocking=False)
    finally:
        del os.environ[API_KEYS_ENV]


@pytest.fixture
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url, api_key=KEY, max_retries=0)


def _stats(variant: str, app: str = "alloylm") -> dict:
    from ray import serve

    return serve.get_deployment_handle(f"model-{variant}", app_name=app).stats.remote().result()


def _raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one plain HTTP request; path is relative to the base URL."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port)
    try:
        connection.request(method, parsed.path + path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def test_models_lists_every_variant(client):
    assert [m.id for m in client.models.list().data] == ["merged", "dpo"]
    assert client.models.retrieve("dpo").id == "dpo"


def test_completion(client, tokenizer):
    prompt = "Material 4 has a toughness of"
    response = client.completions.create(model="merged", prompt=prompt, max_tokens=12, extra_body={"min_tokens": 12})
    (choice,) = response.choices
    assert response.object == "text_completion" and response.model == "merged" and response.id.startswith("cmpl-")
    assert isinstance(choice.text, str) and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_a_request_without_model_gets_the_default_variant(api_url):
    status, _, body = _raw(api_url, "POST", "/completions", json.dumps({"prompt": "Material"}).encode(), _auth())
    answer = json.loads(body)
    assert status == 200 and answer["model"] == "merged"
    assert answer["usage"]["completion_tokens"] <= 8  # limits.default_max_tokens


def test_chat_applies_the_models_chat_template(client, tokenizer):
    response = client.chat.completions.create(model="dpo", messages=_CHAT, max_tokens=6, extra_body={"min_tokens": 6})
    (choice,) = response.choices
    templated = tokenizer.apply_chat_template(_CHAT, add_generation_prompt=True, tokenize=False)
    assert templated.endswith("<|im_start|>assistant\n")
    assert response.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert response.object == "chat.completion" and response.model == "dpo"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert (choice.finish_reason, response.usage.completion_tokens) == ("length", 6)


def test_greedy_and_seeded_sampling_are_reproducible(client):
    def text(**kwargs):
        return client.completions.create(model="merged", prompt="Silk", max_tokens=10, extra_body={"min_tokens": 10}, **kwargs).choices[0].text

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=1, seed=3) == text(temperature=1, seed=3)
    assert text(temperature=1, seed=3) != text(temperature=1, seed=4)


def test_two_variants_answer_side_by_side(client):
    answers = {
        model: client.completions.create(model=model, prompt="Nacre is", max_tokens=10, temperature=0, extra_body={"min_tokens": 10})
        for model in ("merged", "dpo")
    }
    assert {name: a.model for name, a in answers.items()} == {"merged": "merged", "dpo": "dpo"}
    assert answers["merged"].choices[0].text != answers["dpo"].choices[0].text  # different weights


def test_each_variant_answers_with_its_own_weights(client, model_dirs, tokenizer):
    # Routing: the HTTP greedy answer of each variant is transformers' greedy generate on that
    # variant's own folder (a swap of dpo and merged would fail here).
    from transformers import AutoModelForCausalLM

    prompt = "Nacre is"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    for variant in ("merged", "dpo"):
        served = client.completions.create(model=variant, prompt=prompt, max_tokens=8, temperature=0, extra_body={"min_tokens": 8})
        model = AutoModelForCausalLM.from_pretrained(model_dirs[variant]).eval()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        local = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert served.choices[0].text == local, variant


def test_stop_strings_cut_the_text(client):
    # The same min_tokens in both requests: the end-of-text token is masked alike, so both take the
    # same greedy path; a stop string counts only after the first min_tokens tokens (vLLM's rule).
    def complete(**kwargs):
        return client.completions.create(model="merged", prompt="Bone", max_tokens=24, temperature=0, extra_body={"min_tokens": 12}, **kwargs).choices[0]

    whole = complete(logprobs=1)
    full, offsets = whole.text, whole.logprobs.text_offset
    after = offsets[12] - offsets[0]  # where the 13th token's text starts
    # the first two characters from there on that do not occur earlier in the text
    start = next(i for i in range(after, len(full) - 1) if full.index(full[i : i + 2]) == i)
    stop = full[start : start + 2]
    cut = complete(stop=[stop, "never-in-this-text"])
    assert cut.finish_reason == "stop"
    assert cut.text == full[:start]


def test_streaming_completion_arrives_incrementally(client):
    kwargs = dict(model="merged", prompt="Collagen", max_tokens=200, temperature=0, extra_body={"min_tokens": 200})
    whole = client.completions.create(**kwargs).choices[0].text
    stream = client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = iter(stream)
    first = next(c for c in chunks if c.choices and c.choices[0].text)
    # The first piece of text is here while the server is still generating the rest.
    assert _stats("merged")["running"] >= 1
    rest = list(chunks)
    texts = [first.choices[0].text] + [c.choices[0].text for c in rest if c.choices]
    assert len([t for t in texts if t]) > 10
    assert "".join(texts) == whole
    finishes = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert rest[-1].choices == [] and rest[-1].usage.completion_tokens == 200


def test_streaming_chat_chunks(client):
    chunks = list(client.chat.completions.create(model="dpo", messages=_CHAT, max_tokens=16, stream=True, extra_body={"min_tokens": 16}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == "dpo" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "length"
    assert any(c.choices[0].delta.content for c in chunks[1:-1])


def test_stream_wire_format_is_sse_ending_with_done(api_url):
    body = json.dumps({"model": "merged", "prompt": "Keratin", "max_tokens": 8, "min_tokens": 8, "stream": True}).encode()
    status, headers, raw = _raw(api_url, "POST", "/completions", body, _auth())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [block for block in raw.decode().split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_sixteen_parallel_requests_are_answered_and_batched(api_url):
    before = _stats("merged")

    async def run():
        client = openai.AsyncOpenAI(base_url=api_url, api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(
                *(
                    client.completions.create(model="merged", prompt=f"Material {i}", max_tokens=24 + i, extra_body={"min_tokens": 24 + i})
                    for i in range(16)
                )
            )
        finally:
            await client.close()

    answers = asyncio.run(run())
    after = _stats("merged")
    # Each got exactly its own max_tokens: no batch-mate's length imposed on it.
    assert [a.usage.completion_tokens for a in answers] == [24 + i for i in range(16)]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    steps = after["steps"] - before["steps"]
    assert tokens == sum(24 + i for i in range(16))
    assert steps < tokens / 2, f"{steps} decoding steps for {tokens} tokens: requests were not batched"


# ----------------------------------------------------------------------------- scoring and n


@pytest.fixture(scope="module")
def merged_model(model_dirs):
    """The served `merged` variant loaded here, to check the server's numbers against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dirs["merged"]).eval()


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(token i | tokens before i) for i >= 1, from one unbatched forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_echo_with_max_tokens_0_scores_the_prompt(client, tokenizer, merged_model):
    ids = tokenizer("Material 12 has a toughness of 2 MPa")["input_ids"]
    response = client.completions.create(model="merged", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    (choice,) = response.choices
    logprobs = choice.logprobs
    assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 0)
    assert logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = _reference_logprobs(merged_model, ids)
    assert torch.allclose(torch.tensor(logprobs.token_logprobs[1:]), reference, atol=1e-4)
    for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        # The 2 most likely tokens, plus the prompt's own where it is not among them.
        assert len(top) in (2, 3) and top[token] == value
        assert max(top.values()) >= value
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))]


def test_logprobs_of_generated_tokens_and_echo_with_generation(client, tokenizer, merged_model):
    prompt = "Nacre is"
    ids = tokenizer(prompt)["input_ids"]
    greedy = client.completions.create(model="merged", prompt=prompt, max_tokens=5, temperature=0, logprobs=1, extra_body={"min_tokens": 5})
    (choice,) = greedy.choices
    assert len(choice.logprobs.tokens) == greedy.usage.completion_tokens == 5
    assert "".join(choice.logprobs.tokens) == choice.text
    # Greedy: each token is the most likely one, so its logprob is the top one's.
    assert all(value == max(top.values()) for value, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))
    # lm-eval's request: echo, 1 new token, logprobs 1; the prompt part equals a plain forward pass.
    echoed = client.completions.create(model="merged", prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=1).choices[0]
    assert echoed.text.startswith(prompt) and len(echoed.logprobs.tokens) == len(ids) + 1
    reference = _reference_logprobs(merged_model, ids)
    assert torch.allclose(torch.tensor(echoed.logprobs.token_logprobs[1 : len(ids)]), reference, atol=1e-4)
    assert echoed.logprobs.tokens[-1] == choice.logprobs.tokens[0]
    assert abs(echoed.logprobs.token_logprobs[-1] - choice.logprobs.token_logprobs[0]) < 1e-4


def test_streamed_logprobs_cover_every_token(client):
    kwargs = dict(model="merged", prompt="Silk fibroin", max_tokens=12, temperature=0, logprobs=1, extra_body={"min_tokens": 12})
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kwargs) if c.choices]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((p.tokens for p in streamed), []) == whole.logprobs.tokens
    assert sum((p.token_logprobs for p in streamed), []) == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert sum((p.text_offset for p in streamed), []) == whole.logprobs.text_offset
    echo = [c for c in client.completions.create(stream=True, echo=True, max_tokens=0, model="merged", prompt="Silk fibroin", logprobs=0) if c.choices]
    assert echo[0].choices[0].text == "Silk fibroin" and echo[0].choices[0].logprobs.token_logprobs[0] is None
    assert echo[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_in_chat_shape(client):
    response = client.chat.completions.create(
        model="dpo", messages=_CHAT, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0, extra_body={"min_tokens": 4}
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert entry.bytes == list(entry.token.encode())
    assert client.chat.completions.create(model="dpo", messages=_CHAT, max_tokens=2).choices[0].logprobs is None


def test_n_choices_differ_and_usage_counts_them_all(client, tokenizer):
    response = client.completions.create(model="merged", prompt="Bone", n=3, max_tokens=8, temperature=1, extra_body={"min_tokens": 8})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.text for c in response.choices}) == 3
    # Every choice's tokens count; the prompt's count once, as OpenAI counts them.
    assert response.usage.completion_tokens == 24 and response.usage.prompt_tokens == len(tokenizer("Bone")["input_ids"])
    seeded = [client.completions.create(model="merged", prompt="Bone", n=2, seed=5, max_tokens=6, extra_body={"min_tokens": 6}) for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert seeded[0].choices[0].text != seeded[0].choices[1].text
    # A batch of prompts: choices are numbered prompt-major, each prompt's prompt tokens counted once.
    batch = client.completions.create(model="merged", prompt=["Bone", "Nacre is"], n=2, max_tokens=3, temperature=0, extra_body={"min_tokens": 3})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text and batch.choices[2].text == batch.choices[3].text
    assert batch.usage.completion_tokens == 12
    chat = client.chat.completions.create(model="dpo", messages=_CHAT, n=2, max_tokens=5, extra_body={"min_tokens": 5})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10


def test_streamed_n_choices_arrive_by_index(client):
    chunks = list(client.chat.completions.create(model="dpo", messages=_CHAT, n=2, max_tokens=6, stream=True, stream_options={"include_usage": True}, extra_body={"min_tokens": 6}))
    pieces = {0: [], 1: []}
    finishes = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        pieces[choice.index].append(choice.delta.content or "")
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 12


def test_sixteen_scoring_requests_share_prefills(api_url, tokenizer):
    async def run():
        client = openai.AsyncOpenAI(base_url=api_url, api_key=KEY, max_retries=0)
        try:
            return await asyncio.gather(
                *(
                    client.completions.create(model="merged", prompt=_SENTENCES[i], max_tokens=0, echo=True, logprobs=1)
                    for i in range(16)
                )
            )
        finally:
            await client.close()

    # The fewest prefills of up to 3 rounds: how many requests reach the idle replica within its
    # 5 ms batch wait depends on the 2 shared cores (8 prefills once in a full suite, from another
    # test's load); requests prefilled one by one give 16 in every round.
    counts = []
    while len(counts) < 3 and (not counts or min(counts) >= 16 / 2):
        before = _stats("merged")
        answers = asyncio.run(run())
        after = _stats("merged")
        assert [len(a.choices[0].logprobs.tokens) for a in answers] == [len(tokenizer(_SENTENCES[i])["input_ids"]) for i in range(16)]
        assert after["sequences_started"] - before["sequences_started"] == 16
        counts.append(after["prefills"] - before["prefills"])
    assert min(counts) < 16 / 2, f"{counts} prefills for 16 scoring requests in each round: they were not batched"


# ----------------------------------------------------------------------------- lm-evaluation-harness


def _lm_eval(args: list[str], out: Path) -> list[dict]:
    """Run the `lm_eval` command line (as the README shows it) and return its logged samples."""
    env = {**os.environ, "OPENAI_API_KEY": KEY}  # lm-eval's local-* models send it as the bearer key
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), *args, "--log_samples", "--output_path", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    (samples,) = out.rglob("samples_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_lm_eval_local_completions_scores_as_alloylm_does(api_url, model_dirs, tmp_path):
    # The same items, the same model: lm-eval through the server's log-likelihoods, and AlloyLM's
    # own multiple-choice suite in process, must choose the same option for every item.
    from alloylm.evaluate.benchmark import BenchmarkItem
    from alloylm.evaluate.lm_eval_export import export_lm_eval_task
    from alloylm.evaluate.multiple_choice import option_requests, score_multiple_choice
    from alloylm.evaluate.scorer import CausalLMScorer

    items = [
        BenchmarkItem(
            id=f"q{i}", split="test", type="multiple_choice", question=f"What is the toughness of material {i}?",
            answer=f"{i * 3 % 17} MPa", choices=tuple(f"{(i * 3 + k) % 17} MPa" for k in range(4)), answer_index=0,
        )
        for i in range(10)
    ]  # fmt: skip
    task = export_lm_eval_task(items, str(tmp_path / "task"), splits=("test",))
    model_args = (
        f"model=merged,base_url={api_url}/completions,tokenizer_backend=huggingface,"
        f"tokenizer={model_dirs['merged']},add_bos_token=True,max_length=128"
    )
    samples = _lm_eval(
        ["--model", "local-completions", "--model_args", model_args, "--tasks", "alloylm_domain_mc",
         "--include_path", str(Path(task["yaml"]).parent), "--batch_size", "8"],
        tmp_path / "out",
    )  # fmt: skip
    # The logged samples hold each option's (logprob, is_greedy) as strings.
    served = {s["doc"]["id"]: [float(resp[0][0]) for resp in s["resps"]] for s in samples}

    scorer = CausalLMScorer.load(model_dirs["merged"])
    prompt = lambda question: scorer.prompt(question, chat=False)  # noqa: E731
    loglikelihoods = [
        scorer.loglikelihood([scorer.encode_pair(c, o, chat=False) for c, o in option_requests(item, chat=False, prompt=prompt)])
        for item in items
    ]
    _, details = score_multiple_choice(items, loglikelihoods)
    assert sorted(served) == sorted(d["id"] for d in details)
    for detail in details:
        assert served[detail["id"]] == pytest.approx(detail["loglikelihoods"], abs=1e-4), detail["id"]
        assert max(range(4), key=served[detail["id"]].__getitem__) == detail["predicted"]
        sample = next(s for s in samples if s["doc"]["id"] == detail["id"])
        assert sample["acc"] == float(detail["correct"])


def test_lm_eval_local_chat_completions_runs_a_generation_task(api_url, tmp_path):
    data = tmp_path / "task" / "gen.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"question": f"Name material {i}.", "answer": f"Material {i}"}) + "\n" for i in range(3)))
    (data.parent / "gen.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "alloylm_chat_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
                "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )  # fmt: skip
    samples = _lm_eval(
        ["--model", "local-chat-completions", "--model_args", f"model=dpo,base_url={api_url}/chat/completions",
         "--tasks", "alloylm_chat_gen", "--include_path", str(data.parent), "--apply_chat_template"],
        tmp_path / "out",
    )  # fmt: skip
    assert len(samples) == 3
    assert all(isinstance(s["resps"][0][0], str) for s in samples)


def test_no_log_holds_an_api_key_or_authorization_value(api_url, client):
    import ray

    client.completions.create(model="merged", prompt="Secret", max_tokens=2)
    wrong = "Bearer sk-wrong-secret-7f3a"
    assert _raw(api_url, "POST", "/completions", json.dumps({"prompt": "x"}).encode(), {"Authorization": wrong})[0] == 401
    time.sleep(1)  # log lines are flushed by the replicas' and the controller's own loggers
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert any((logs / "serve").glob("replica_alloylm_*")), "no replica log to search"
    for secret in (KEY, "test-key-2", "sk-wrong-secret-7f3a"):
        assert not _files_containing(logs, secret.encode()), secret


def test_a_hundred_clients_that_leave_free_their_batch_slots(api_url):
    # 100 streaming requests, each dropped after its first chunk: their sequences must leave the
    # engine (not run to max_tokens), and the server must serve as fast afterwards as before.
    import aiohttp

    from alloylm.serve.loadgen import run_load

    def rate(model: str) -> float:
        # a request left waiting (a leak that holds every slot) fails the test instead of hanging it
        result = asyncio.run(run_load(api_url, model=model, concurrency=8, requests=24, max_tokens=16, min_tokens=16, api_key=KEY, timeout_s=120))
        assert result.errors == 0
        return result.tokens_per_s

    def rates() -> tuple[float, float]:
        """(dpo's rate, that of `merged`, an equal model whose streams nobody leaves), each the best
        of 2 rounds taken in turns: what else runs on the 2 shared cores slows both alike."""
        dpo, merged = zip(*((rate("dpo"), rate("merged")) for _ in range(2)))
        return max(dpo), max(merged)

    before_dpo, before_merged = rates()
    before = _stats("dpo")
    body = json.dumps({"model": "dpo", "prompt": "Leave", "max_tokens": 200, "min_tokens": 200, "stream": True})

    async def leave_after_first_chunk(session: aiohttp.ClientSession) -> bool:
        async with session.post(api_url + "/completions", data=body, headers=_auth()) as response:
            if response.status != 200:
                return False
            async for line in response.content:
                if line.startswith(b"data: "):
                    return True  # leaving the block closes the connection mid-stream
        return False

    async def leave_all() -> list[bool]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100, force_close=True)) as session:
            return await asyncio.gather(*(leave_after_first_chunk(session) for _ in range(100)))

    started = sum(asyncio.run(leave_all()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (_stats("dpo")["running"] or _stats("dpo")["waiting"]):
        time.sleep(0.5)
    after = _stats("dpo")
    assert (after["running"], after["waiting"]) == (0, 0), after
    assert started >= 90, f"only {started} of 100 streams started"  # a few may be refused as overload
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert generated < started * 200 / 4, f"{generated} tokens for {started} abandoned streams: they kept generating"
    # dpo against the untouched replica, the best of up to 3 measurements: dpo's own rate fell to
    # 0.70x once and to 0.57-0.63x in all 3 measurements once in a full suite (965 against 1542
    # tokens/s) with nothing left running in the engine, and passed alone. Serve's request slots
    # left taken keep dpo low against merged (32 streams held open beside the measurement: 0.36-0.52x);
    # 24 of the 32 held open cost a batch of 8 nothing (passed), and nothing here counts Serve's
    # slots themselves. The models are equal, so a lucky ratio before does not raise the bar past
    # 1; and dpo's own rate must stay above half, for what would slow both (a spinning proxy).
    bar = 0.8 * min(before_dpo / before_merged, 1.0)
    measured = []
    while len(measured) < 3 and (not measured or max(d / m for d, m in measured) < bar):
        measured.append(rates())
    assert max(d / m for d, m in measured) >= bar, (before_dpo, before_merged, measured)
    assert max(d for d, _ in measured) >= 0.5 * before_dpo, (before_dpo, measured)


@pytest.mark.slow
def test_a_replica_killed_under_load_fails_fast_and_is_replaced(serve_port, model_dirs):
    # 16 clients send while the model replica's process is SIGKILLed: requests in flight get an
    # OpenAI-shaped 5xx/503 or are retried by Serve (none hangs), Serve starts a new replica, and
    # requests succeed again.
    from ray import serve
    from ray._private import state

    from alloylm.serve import serve_run

    config = ServeConfig.model_validate(
        {"model": "merged", "app_name": "crash", "route_prefix": "/crash", "port": serve_port,
         "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 32}, "ingress": {"num_cpus": 0.1}}
    )  # fmt: skip
    url = serve_run(config, {"merged": model_dirs["merged"]}, blocking=False)

    def replica_pids() -> set[int]:
        return {
            info["Pid"] for info in state.actors().values()
            if info["ActorClassName"] == "ServeReplica:crash:model-merged" and info["State"] == "ALIVE"
        }  # fmt: skip

    (pid,) = replica_pids()
    outcomes: list[tuple[float, float, int, bytes]] = []  # (sent, answered, status, body)
    killed_at: list[float] = []

    async def client_loop(session, stop_at: float) -> None:
        body = json.dumps({"model": "merged", "prompt": "Load", "max_tokens": 24, "min_tokens": 24})
        while time.monotonic() < stop_at:
            sent = time.monotonic()
            async with session.post(url + "/completions", data=body, headers=_auth("x")) as response:
                outcomes.append((sent, time.monotonic(), response.status, await response.read()))
            if killed_at and outcomes[-1][2] == 200 and outcomes[-1][0] > killed_at[0]:
                return  # recovered

    async def scenario() -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=30)  # a request that hangs fails the test
        async with aiohttp.ClientSession(timeout=timeout) as session:
            stop_at = time.monotonic() + 60
            clients = [asyncio.create_task(client_loop(session, stop_at)) for _ in range(16)]
            await asyncio.sleep(1.5)
            killed_at.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)
            await asyncio.gather(*clients)

    try:
        asyncio.run(scenario())
        failures = [(status, raw) for _, _, status, raw in outcomes if status != 200]
        before = [o for o in outcomes if o[1] < killed_at[0]]
        assert before and all(o[2] == 200 for o in before)
        # Requests in flight at the kill: those the replica had accepted fail with a 5xx; those
        # Serve's router had not yet placed (its reserve_slot step) it retries on the new replica,
        # so they may succeed (a CI run saw none fail). Either way none may hang.
        spanning = [o for o in outcomes if o[0] < killed_at[0] < o[1]]
        assert spanning, "the kill did not hit a request in flight"
        assert all(o[2] == 200 or o[2] >= 500 for o in spanning), [o[2] for o in spanning]
        for status, raw in failures:
            assert status >= 500, (status, raw[:300])
            error = json.loads(raw)["error"]
            assert error["message"] and error["type"] == "server_error", error
        recovered = min(o[1] for o in outcomes if o[2] == 200 and o[0] > killed_at[0])
        recovery_s = recovered - killed_at[0]
        print(
            f"recovery after the replica was killed: {recovery_s:.1f} s; {len(spanning)} requests in flight,"
            f" {len(failures)} failed"
        )
        assert recovery_s <= 30, recovery_s
        assert replica_pids() and pid not in replica_pids()
    finally:
        serve.delete("crash")


# ----------------------------------------------------------------------------- fuzzing


def _fuzz_bodies():
    """Request bodies a careless or hostile client might send: wrong types, huge, negative and
    non-finite numbers, odd unicode, long strings, deep nesting, and bytes that are not JSON."""
    from hypothesis import strategies as st

    scalars = (
        st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
        | st.sampled_from(["", "\x00", "\ud7ff\ue000\U0010ffff", "🧪" * 50, "x" * 5000, "merged", "dpo"])
    )  # fmt: skip
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    deep = st.integers(min_value=1, max_value=3000).map(lambda depth: "[" * depth + "]" * depth)
    fields = st.sampled_from(
        ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
         "stream", "stream_options", "logprobs", "top_logprobs", "echo", "min_tokens", "logit_bias", "best_of", "suffix"]
    )  # fmt: skip
    # Mostly sensible values so that many bodies get past parsing, with one field gone wrong.
    sensible = st.fixed_dictionaries(
        {"model": st.sampled_from(["merged", "dpo"]), "max_tokens": st.integers(0, 4), "prompt": st.text(min_size=1, max_size=30),
         "messages": st.just([{"role": "user", "content": "hi"}])}
    )  # fmt: skip
    mutated = st.tuples(sensible, st.dictionaries(fields, values, max_size=3)).map(lambda pair: {**pair[0], **pair[1]})
    as_json = (mutated | st.dictionaries(fields, values, max_size=6) | values).map(
        lambda body: json.dumps(body, allow_nan=True).encode()
    )
    return st.tuples(st.sampled_from(["/completions", "/chat/completions"]), as_json | deep.map(str.encode) | st.binary(max_size=200))


def test_fuzzed_bodies_get_openai_errors_never_a_crash(api_url):
    from hypothesis import HealthCheck, given, settings

    seen = {"count": 0, "ok": 0}

    @settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_fuzz_bodies())
    def check(request):
        path, body = request
        status, _, raw = _raw(api_url, "POST", path, body, _auth())
        seen["count"] += 1
        assert status < 500 or status == 503, (status, body[:300], raw[:300])
        if status == 200:
            seen["ok"] += 1
            if raw.startswith(b"data: "):  # streamed: every event is JSON, the last [DONE]
                events = [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]
                assert events[-1] == "[DONE]" and all(isinstance(json.loads(e), dict) for e in events[:-1])
            else:
                assert json.loads(raw)["object"] in ("text_completion", "chat.completion")
        else:
            answer = json.loads(raw)
            error = answer["error"]
            assert isinstance(error["message"], str) and error["message"] and error["type"], answer

    check()
    assert seen["count"] >= 300 and seen["ok"] > 0, seen  # some bodies were valid and answered
    assert _raw(api_url.removesuffix("/v1"), "GET", "/health")[0] == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
        ("/chat/completions", {"model": "sft", "messages": _CHAT}, 404, "model", "model_not_found"),
        ("/completions", {"model": "merged", "prompt": "x", "max_tokens": 257}, 400, "max_tokens", None),
        ("/chat/completions", {"model": "dpo", "messages": _CHAT, "max_completion_tokens": 1000}, 400, "max_completion_tokens", None),
        ("/completions", {"model": "merged", "prompt": "Material " * 150}, 400, "prompt", "context_length_exceeded"),
        ("/completions", {"model": "merged", "prompt": [5, 6, 100000]}, 400, "prompt", None),
        ("/completions", {"model": "merged", "prompt": "x", "temperature": 3}, 400, "temperature", None),
        ("/completions", {"model": "merged", "prompt": "x", "n": 5}, 400, "n", None),
        ("/chat/completions", {"model": "dpo", "messages": _CHAT, "n": 5}, 400, "n", None),
        ("/completions", {"model": "merged", "prompt": "x", "logprobs": 6}, 400, "logprobs", None),
        ("/completions", {"model": "merged", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
        ("/chat/completions", {"model": "dpo", "messages": _CHAT, "echo": True}, 400, "echo", "unsupported_parameter"),
        ("/chat/completions", {"model": "dpo", "messages": _CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
        ("/completions", {"model": "merged", "prompt": ["x"] * 65}, 400, "prompt", None),
        ("/completions", {"model": "merged", "prompt": "x", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
        ("/completions", {"model": "merged", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ("/completions", {"model": "merged", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", None),
        ("/completions", {"model": "merged"}, 400, "prompt", None),
        ("/chat/completions", {"model": "dpo", "messages": []}, 400, "messages", None),
        ("/chat/completions", {"model": "dpo", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
        # A lone surrogate reached the tokenizer and was a 500; stream_options without stream was ignored.
        ("/chat/completions", {"model": "dpo", "messages": [{"role": "user", "content": "a\ud800"}]}, 400, "messages.0.content", None),
        ("/completions", {"model": "merged", "prompt": "\udfff"}, 400, "prompt", None),
        ("/completions", {"model": "merged", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
        ("/completions", {"model": "merged", "prompt": "x", "stop": ["x" * 257]}, 400, "stop", None),
    ],
)
def test_bad_requests_get_openai_errors(api_url, path, body, status, param, code):
    got, _, raw = _raw(api_url, "POST", path, json.dumps(body).encode(), _auth())
    error = json.loads(raw)["error"]
    assert got == status, error
    assert error["param"] == param and error["code"] == code
    assert error["type"] in ("invalid_request_error", "not_found_error") and error["message"]


def test_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="orpo", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="dpo", messages=_CHAT, max_tokens=5000)
    assert too_long.value.body["param"] == "max_tokens"
    # The client sends a `None` argument as null: "not given", as OpenAI documents these fields.
    answer = client.completions.create(model="merged", prompt="x", max_tokens=2, temperature=None, top_p=None, n=None)
    assert len(answer.choices) == 1


def test_malformed_bodies_get_400(api_url):
    for body in (b"{not json", b"[1, 2]", b""):
        status, _, raw = _raw(api_url, "POST", "/completions", body, _auth())
        assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error", body
    status, _, raw = _raw(api_url, "POST", "/completions", b"x" * 1_000_001, _auth())
    assert status == 413 and "larger than" in json.loads(raw)["error"]["message"]


def test_auth_failures_get_401(api_url):
    with pytest.raises(openai.AuthenticationError) as denied:
        openai.OpenAI(base_url=api_url, api_key="wrong-key", max_retries=0).models.list()
    assert denied.value.status_code == 401
    assert denied.value.body["code"] == "invalid_api_key"
    assert "wrong-key" not in json.dumps(denied.value.body)  # a key is never echoed
    for headers in ({}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"}):
        status, answer_headers, raw = _raw(api_url, "POST", "/chat/completions", json.dumps({"messages": _CHAT}).encode(), headers)
        assert status == 401 and answer_headers.get("www-authenticate") == "Bearer", headers
        assert json.loads(raw)["error"]["code"] == "invalid_api_key"
    # The second key works too; the health check needs none.
    assert openai.OpenAI(base_url=api_url, api_key="test-key-2", max_retries=0).models.list().data
    status, _, raw = _raw(api_url.removesuffix("/v1"), "GET", "/health")
    assert status == 200 and json.loads(raw) == {"status": "ok"}


def test_unknown_paths_get_json_404(api_url):
    status, _, raw = _raw(api_url, "GET", "/engines", headers=_auth())
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"


# -------------------------------------------------------------------------------------------
# Overload: a second application with room for one request and no queue
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_app(serve_port, model_dirs) -> tuple[str, str]:
    """An open app (no keys) whose one model replica holds one request and queues one more."""
    from alloylm.serve import serve_run

    config = ServeConfig.model_validate(
        {
            "model": "merged",
            "app_name": "tight",
            "route_prefix": "/tight",
            "port": serve_port,
            "batching": {"max_batch_size": 1},
            "deployment": {"num_cpus": 0.25, "max_ongoing_requests": 1, "max_queued_requests": 1},
            "ingress": {"num_cpus": 0.1},
        }
    )
    assert API_KEYS_ENV not in os.environ
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        url = serve_run(config, {"merged": model_dirs["merged"]}, blocking=False)
    return url, stderr.getvalue()


def test_open_server_says_so_loudly(tight_app):
    url, stderr = tight_app
    assert url.endswith("/tight/v1")
    assert "THIS ALLOYLM SERVER IS OPEN" in stderr
    assert openai.OpenAI(base_url=url, api_key="anything", max_retries=0).models.list().data[0].id == "merged"


def test_overload_is_503_and_clears_when_the_client_leaves(tight_app):
    url, _ = tight_app
    before = _stats("merged", app="tight")

    async def scenario():
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
        try:
            holder = await client.completions.create(
                model="merged", prompt="Hold", max_tokens=1000, temperature=0, stream=True, extra_body={"min_tokens": 1000}
            )
            async for chunk in holder:
                if chunk.choices and chunk.choices[0].text:
                    break  # the replica's one slot is taken now

            async def attempt(prompt):
                try:
                    return await client.completions.create(model="merged", prompt=prompt, max_tokens=3, extra_body={"min_tokens": 3})
                except openai.APIStatusError as err:
                    return err

            # One of these waits in the queue (room for one), the other is turned away at once.
            attempts = [asyncio.create_task(attempt(prompt)) for prompt in ("One", "Two")]
            await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
            await holder.close()  # the client goes away: its sequence must leave the engine
            return await asyncio.gather(*attempts)
        finally:
            await client.close()

    outcomes = asyncio.run(scenario())
    rejected = [o for o in outcomes if isinstance(o, openai.APIStatusError)]
    answered = [o for o in outcomes if not isinstance(o, openai.APIStatusError)]
    assert len(rejected) == 1 and len(answered) == 1, outcomes
    (error,) = rejected
    assert error.status_code == 503 and error.response.headers.get("retry-after") == "1"
    assert error.body["code"] == "overloaded" and error.body["type"] == "server_error"
    assert answered[0].usage.completion_tokens == 3
    generated = _stats("merged", app="tight")["tokens_generated"] - before["tokens_generated"]
    assert generated < 600, f"{generated} tokens: the abandoned request kept generating"


# -------------------------------------------------------------------------------------------
# `alloylm serve`'s blocking mode: up until Ctrl-C, then gone
# -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_signal",
    [
        # Ctrl-C, sent to a server started in the background by a script: such a process inherits
        # SIGINT as ignored, which once left it serving after the signal.
        pytest.param(signal.SIGINT, id="SIGINT"),
        # What Kubernetes and `ray job stop` send.
        pytest.param(signal.SIGTERM, id="SIGTERM"),
    ],
)
def test_serve_run_serves_until_interrupted(model_dirs, stop_signal, ray_processes):
    (port,) = ray_processes.free_ports(1)
    script = textwrap.dedent(
        f"""
        from alloylm.serve import ServeConfig, serve_run
        config = ServeConfig.model_validate({{"port": {port}, "deployment": {{"num_cpus": 0.25}}, "ingress": {{"num_cpus": 0.1}}}})
        serve_run(config, {{"merged": {model_dirs["merged"]!r}}}, blocking=True)
        print("stopped", flush=True)
        """
    )
    ray_tmp = tempfile.mkdtemp(prefix="alr-", dir="/tmp")
    # Its own local Ray cluster (not this session's), in a temp dir of its own; the key comes from
    # the environment, as `alloylm serve` reads it.
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update({API_KEYS_ENV: "blocking-key", "RAY_TMPDIR": ray_tmp})
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # detached, as with setsid
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` in a script
    )
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/v1", proc.stderr.read()[-3000:] if not url else url
        client = openai.OpenAI(base_url=url, api_key="blocking-key", max_retries=0)
        assert client.completions.create(model="merged", prompt="Up", max_tokens=2).usage.prompt_tokens > 0
        sent = time.monotonic()
        proc.send_signal(stop_signal)
        out, err = proc.communicate(timeout=60)
        stopped_s = time.monotonic() - sent
        assert proc.returncode == 0 and out.strip().splitlines()[-1] == "stopped", err[-3000:]
        # Nothing was in flight, so no replica waited out its graceful shutdown (20 s by default):
        # a bound by that, not by wall-clock speed, which a busy machine stretches (10.1 s once).
        grace = ServeConfig.model_validate({}).deployment.graceful_shutdown_timeout_s
        assert stopped_s < grace, f"stopping took {stopped_s:.1f} s, as long as a replica's graceful shutdown ({grace} s)"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        # The key is in no log: not the driver's output, not any log of its Ray cluster.
        assert "blocking-key" not in out + err
        assert not _files_containing(Path(ray_tmp), b"blocking-key")
        # No Ray process of its cluster is left behind (they all ran in its process group).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.5)
        assert not _group_alive(proc.pid), subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            ray_processes.stop(marker=ray_tmp, pgid=proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group `pgid`."""
    listing = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return any(not state.startswith("Z") for state in listing)


# -------------------------------------------------------------------------------------------
# `serve deploy` of the shipped config on a cluster started with `ray start --head`
# -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_deploy_config_on_a_ray_start_cluster(model_dirs, tmp_path, ray_processes):
    bin_dir = Path(sys.executable).parent
    # A short temp dir of our own: Ray's socket paths must stay under the OS limit (107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="alr-", dir="/tmp")
    names = ("gcs", "dashboard", "client", "agent", "agent_grpc", "runtime_env", "metrics", "http")
    ports = dict(zip(names, ray_processes.free_ports(len(names))))
    # Ray 2.60's CLI talks to a token-authenticated cluster.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [
        str(bin_dir / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={ports['gcs']}",
        f"--dashboard-port={ports['dashboard']}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--metrics-export-port={ports['metrics']}", "--num-cpus=2", "--disable-usage-stats",
    ]
    # A session of its own: every process of this cluster lands in one process group, which is
    # what gets stopped at the end (never `ray stop`, which would stop other clusters too).
    start = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        start_out, start_err = start.communicate()
        assert start.returncode == 0, (start_out + start_err)[-3000:]
        keys = tmp_path / "api-keys"
        keys.write_text("# test keys\ndeploy-key\n")
        document = yaml.safe_load((SERVING / "serve_config.yaml").read_text())
        document["http_options"] = {"host": "127.0.0.1", "port": ports["http"]}
        document["proxy_location"] = "HeadOnly"
        args = document["applications"][0]["args"]
        args["sources"] = {name: model_dirs["dpo" if name == "dpo" else "merged"] for name in args["variants"]}
        args["api_keys_file"] = str(keys)
        args["deployment"].update(num_cpus=0.25, autoscaling={"min_replicas": 1, "max_replicas": 1})
        args["ingress"] = {"num_cpus": 0.1}
        config_path = tmp_path / "serve_config.yaml"
        config_path.write_text(yaml.safe_dump(document))
        address = f"http://127.0.0.1:{ports['dashboard']}"
        serve_cli = str(bin_dir / "serve")
        deployed = subprocess.run([serve_cli, "deploy", str(config_path), "-a", address], env=env, capture_output=True, text=True)
        assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-3000:]
        app_status = "DEPLOYING"
        while app_status != "RUNNING":  # deploying is asynchronous; poll until it settles
            time.sleep(2)
            report = subprocess.run([serve_cli, "status", "-a", address], env=env, capture_output=True, text=True).stdout
            app_status = ((yaml.safe_load(report) or {}).get("applications") or {}).get("alloylm", {}).get("status", "")
            assert app_status != "DEPLOY_FAILED", report
        url = f"http://127.0.0.1:{ports['http']}/v1"
        client = openai.OpenAI(base_url=url, api_key="deploy-key", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["merged", "dpo", "instruct"]
        answer = client.chat.completions.create(model="instruct", messages=_CHAT, max_tokens=4, extra_body={"min_tokens": 4})
        assert answer.usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="not-the-key", max_retries=0).models.list()
        subprocess.run([serve_cli, "shutdown", "-y", "-a", address], env=env, capture_output=True, text=True)
    finally:
        ray_processes.stop(marker=temp_dir, pgid=start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
