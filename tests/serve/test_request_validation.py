"""Request validation and response bodies of the OpenAI protocol, without a server.

tests/serve/test_app.py sends bad requests through HTTP for a few fields (temperature, n, logprobs,
echo, messages.0.role, token limits); here every field AlloyLM checks or refuses is named in its
error, and the bodies the server answers with have OpenAI's shape, logprobs included.
"""

from __future__ import annotations

import json

import pytest

from alloylm.serve.config import LimitsConfig

from alloylm.serve.protocol import (
    SSE_DONE,
    APIError,
    LOGPROB_FLOOR,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingParams,
    TokenLogprob,
    bad_request,
    check_choice_fields,
    chat_choice,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_choice,
    completion_chunk,
    completion_id,
    completion_logprobs,
    completion_response,
    error_body,
    model_list,
    parse_request,
    sampling_params,
    sse,
    usage,
    usage_chunk,
)

CHAT = [{"role": "user", "content": "hi"}]


def completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, json.dumps({"prompt": "x"} | fields).encode())


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, json.dumps({"messages": CHAT} | fields).encode())


def rejected(model, body) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as err:
        parse_request(model, raw)
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    return err.value


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "stream": "sometimes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
        ({"prompt": "x", "stop": 7}, "stop"),
        ({"prompt": "x", "logit_bias": {"5": "high"}}, "logit_bias.5"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": "x", "echo": "yes please"}, "echo"),
    ],
)
def test_a_bad_completion_field_is_named(body, param):
    error = rejected(CompletionRequest, body)
    assert error.param == param
    assert error.message.startswith(f"{param}: ")
    assert error.body()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "top_p": 2}, "top_p"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        # A bad part is named by its message's content: pydantic reports the union's first member
        # (str) first, so the part's own key is not reached.
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": 5}]}, "messages.1.content"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"messages": "hi"}, "messages"),
        ({"messages": CHAT, "response_format": "json"}, "response_format"),
        ({"messages": CHAT, "tools": {"a": 1}}, "tools"),
    ],
)
def test_a_bad_chat_field_is_named(body, param):
    error = rejected(ChatCompletionRequest, body)
    assert error.param == param
    assert error.message.startswith(f"{param}: ")


def test_a_part_that_is_not_text_is_named_as_such():
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    error = rejected(ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, image]}]})
    assert error.param == "messages.0.content"
    assert error.message == "messages.0.content: part 1: only text parts are supported (got type 'image_url')"


def test_errors_do_not_echo_the_request_values():
    error = rejected(CompletionRequest, {"prompt": "x", "temperature": "secret-value-123"})
    assert error.param == "temperature"
    assert "secret-value-123" not in error.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the request body is not valid JSON: "),
        (b"\xff\xfe", "the request body is not valid JSON: "),
        (b"[1, 2]", "the request body must be a JSON object"),
        (b"null", "the request body must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused_without_a_param(body, message):
    error = rejected(CompletionRequest, body)
    assert error.message.startswith(message) and (error.message == message or message.endswith(": "))
    assert error.param is None


def test_deeply_nested_bodies_get_400():
    deep = b"[" * 5000 + b"]" * 5000
    assert rejected(CompletionRequest, deep).message == "the request body is nested too deeply"
    assert rejected(CompletionRequest, b'{"prompt": "x", "stop": ' + deep + b"}").message == "the request body is nested too deeply"


def test_a_missing_required_field_is_named():
    assert rejected(CompletionRequest, {"model": "m"}).message == "prompt: Field required"
    assert rejected(ChatCompletionRequest, {"model": "m"}).param == "messages"


def test_unknown_fields_are_ignored_and_defaults_apply():
    request = completion(some_future_field=1, model="dpo")
    assert request.model == "dpo"
    assert (request.temperature, request.top_p, request.n, request.min_tokens, request.max_tokens) == (1.0, 1.0, 1, 0, None)
    assert request.stream is False and request.seed is None
    assert request.unsupported() is None
    assert chat(another_new_field={"x": 1}).unsupported() is None


def test_boundary_values_are_accepted():
    request = completion(temperature=0, top_p=1, min_tokens=0, max_tokens=1)
    assert (request.temperature, request.top_p, request.max_tokens) == (0.0, 1.0, 1)
    assert completion(temperature=2, top_p=0.01).temperature == 2.0


# ----------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"best_of": 2}, "best_of"),
        ({"suffix": "tail"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -0.5}, "frequency_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"top_k": 40}, "top_k"),
        ({"min_p": 0.1}, "min_p"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"ignore_eos": 0}, "ignore_eos"),
        ({"stop_token_ids": [2]}, "stop_token_ids"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
        # vLLM's extensions that were accepted and ignored, so the client believed it got them
        ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"length_penalty": 0.8}, "length_penalty"),
        ({"allowed_token_ids": [5, 6]}, "allowed_token_ids"),
        ({"bad_words": ["x"]}, "bad_words"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 64}, "truncate_prompt_tokens"),
        ({"max_completion_tokens": 8}, "max_completion_tokens"),  # a chat field: completions fell back to the default length
    ],
)
def test_completion_fields_this_server_cannot_honour_are_named(fields, field):
    assert completion(**fields).unsupported() == field


@pytest.mark.parametrize(
    "fields",
    [
        {"best_of": 1}, {"best_of": None}, {"suffix": ""}, {"echo": False}, {"echo": True}, {"logprobs": 0},
        {"logprobs": 5}, {"logit_bias": {}}, {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"n": 1}, {"n": 3},
        {"top_k": -1}, {"top_k": 0}, {"min_p": 0.0}, {"repetition_penalty": 1.0}, {"ignore_eos": False}, {"stop_token_ids": []},
        {"include_stop_str_in_output": False}, {"skip_special_tokens": True}, {"spaces_between_special_tokens": True},
        {"use_beam_search": False}, {"length_penalty": 1.0}, {"allowed_token_ids": []}, {"bad_words": []},
    ],  # fmt: skip
)
def test_completion_fields_at_their_neutral_values_are_accepted(fields):
    assert completion(**fields).unsupported() is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"echo": True}, "echo"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"logit_bias": {"1": -100}}, "logit_bias"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"top_k": 5}, "top_k"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ],
)
def test_chat_fields_this_server_cannot_honour_are_named(fields, field):
    assert chat(**fields).unsupported() == field


@pytest.mark.parametrize(
    "fields",
    [
        {"logprobs": False},
        {"tools": []},
        {"tool_choice": "none"},
        {"response_format": {"type": "text"}},
        {"response_format": {}},
        {"response_format": {"json_schema": {"name": "x"}}},  # no type: text
        {"top_logprobs": None},
        {"logprobs": True, "top_logprobs": 20},
        {"n": 3},
        {"functions": []},
        {"function_call": "none"},
        {"modalities": ["text"]},
        {"chat_template_kwargs": {}},
        {"add_generation_prompt": True},
        {"continue_final_message": False},
    ],
)
def test_chat_fields_at_their_neutral_values_are_accepted(fields):
    assert chat(**fields).unsupported() is None


def test_the_first_unsupported_field_is_named_when_there_are_several():
    assert completion(best_of=2, suffix="s").unsupported() == "best_of"
    assert completion(suffix="s", presence_penalty=1).unsupported() == "suffix"
    assert chat(echo=True, tools=[{"type": "function"}]).unsupported() == "echo"
    assert chat(tools=[{"type": "function"}], presence_penalty=2).unsupported() == "tools"
    assert completion(presence_penalty=1, frequency_penalty=1).unsupported() == "presence_penalty"
    assert completion(frequency_penalty=1, logit_bias={"1": 1}).unsupported() == "frequency_penalty"


# ----------------------------------------------------------------------------- what a request asks


def test_prompts_are_one_text_one_list_of_ids_or_a_batch_of_them():
    assert completion(prompt="hello").prompts() == ["hello"]
    assert completion(prompt=["hello"]).prompts() == ["hello"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[5, 6, 7]).prompts() == [[5, 6, 7]]
    assert completion(prompt=[[5, 6]]).prompts() == [[5, 6]]
    assert completion(prompt=[[5, 6], [7]]).prompts() == [[5, 6], [7]]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "the prompt is empty"),
        ([], "the prompt is empty"),
        ([""], "the prompt is empty"),
        ([[]], "the prompt is empty"),
        (["a", ""], "prompt 1 of the batch is empty"),
        ([[1], []], "prompt 1 of the batch is empty"),
    ],
)
def test_empty_prompts_are_refused_naming_prompt(prompt, message):
    with pytest.raises(APIError) as err:
        completion(prompt=prompt).prompts()
    assert (err.value.status, err.value.param, err.value.message) == (400, "prompt", message)


def test_stop_strings_and_usage_option():
    assert completion().stop_strings == ()
    assert completion(stop="\n").stop_strings == ("\n",)
    assert completion(stop=["a", "b"]).stop_strings == ("a", "b")
    assert completion().include_usage is False
    assert completion(stream_options={}).include_usage is False
    assert completion(stream_options={"include_usage": True}).include_usage is True


def test_the_newer_token_limit_wins_over_the_older_name():
    assert chat().token_limit is None
    assert chat(max_tokens=7).token_limit == 7
    assert chat(max_completion_tokens=5).token_limit == 5
    assert chat(max_tokens=7, max_completion_tokens=5).token_limit == 5


def test_conversation_maps_developer_to_system_and_joins_text_parts():
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ]
    )
    assert request.conversation() == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


def test_requests_are_frozen():
    request = completion()
    with pytest.raises(Exception):
        request.temperature = 0.5  # type: ignore[misc]


# ----------------------------------------------------------------------------- answers


def test_errors_have_openais_shape():
    assert error_body("boom", type="server_error") == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    error = bad_request("too long", "prompt", "context_length_exceeded")
    assert (error.status, error.headers, str(error)) == (400, {}, "too long")
    assert error.body() == {
        "error": {"message": "too long", "type": "invalid_request_error", "param": "prompt", "code": "context_length_exceeded"}
    }
    busy = APIError(503, "busy", type="overloaded", headers={"Retry-After": "1"})
    assert busy.body()["error"]["type"] == "overloaded" and busy.headers == {"Retry-After": "1"}


def test_usage_totals_the_tokens():
    assert usage(7, 5) == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_completion_and_chat_bodies():
    choices = [completion_choice(0, "hi", "stop"), completion_choice(1, "ho", "length", {"tokens": []})]
    body = completion_response(request_id="cmpl-1", model="m", choices=choices, prompt_tokens=3, completion_tokens=2)
    assert body["object"] == "text_completion" and body["id"] == "cmpl-1" and body["model"] == "m"
    assert body["choices"] == [
        {"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None},
        {"index": 1, "text": "ho", "finish_reason": "length", "logprobs": {"tokens": []}},
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    body = chat_response(request_id="c-1", model="m", choices=[chat_choice(0, "yo", "length")], prompt_tokens=1, completion_tokens=4)
    assert body["object"] == "chat.completion" and body["id"] == "c-1" and body["model"] == "m"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "length", "logprobs": None}]
    assert body["usage"]["total_tokens"] == 5
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000


def test_stream_chunks():
    assert completion_chunk(request_id="i", model="m", created=5, text="a", finish_reason=None) == {
        "id": "i", "object": "text_completion", "created": 5, "model": "m",
        "choices": [{"index": 0, "text": "a", "finish_reason": None, "logprobs": None}],
    }  # fmt: skip
    assert completion_chunk(request_id="i", model="m", created=5, text="a", finish_reason=None, index=3, logprobs={"x": 1})["choices"] == [
        {"index": 3, "text": "a", "finish_reason": None, "logprobs": {"x": 1}}
    ]
    assert chat_chunk(request_id="i", model="m", created=5, delta={"content": "a"}, finish_reason="stop") == {
        "id": "i", "object": "chat.completion.chunk", "created": 5, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop", "logprobs": None}],
    }  # fmt: skip
    for kind, obj in (("completion", "text_completion"), ("chat", "chat.completion.chunk")):
        assert usage_chunk(kind=kind, request_id="i", model="m", created=5, prompt_tokens=2, completion_tokens=3) == {
            "id": "i", "object": obj, "created": 5, "model": "m", "choices": [],
            "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
        }  # fmt: skip


TEXTS = {1: "<s>", 7: "The", 8: " cat", 9: " sat", 10: " mat"}
SEEN: list[tuple[int, tuple[int, ...]]] = []  # (token, the tokens before it) asked of _text_of


def _text_of(token: int, previous) -> str:
    SEEN.append((token, tuple(previous)))
    return TEXTS[token]


def test_completion_logprobs_in_openais_legacy_shape():
    entries = [
        TokenLogprob(1, None),  # a prompt's first token: nothing predicts it
        TokenLogprob(7, -1.5, ((7, -1.5), (8, -2.0))),
        TokenLogprob(8, -3.0, ((9, -0.5),)),  # not among the top 1: added, so k + 1 entries
        TokenLogprob(9, float("-inf"), ()),  # JSON has no -inf
    ]
    SEEN.clear()
    body = completion_logprobs(entries, _text_of, offset=4, previous=[5])
    # Each token, and each alternative at its position, is decoded after the tokens before it.
    assert SEEN[:4] == [(1, (5,)), (7, (5, 1)), (7, (5, 1)), (8, (5, 1))] and SEEN[-1] == (9, (5, 1, 7, 8))
    assert body == {
        "tokens": ["<s>", "The", " cat", " sat"],
        "token_logprobs": [None, -1.5, -3.0, LOGPROB_FLOOR],
        "top_logprobs": [None, {"The": -1.5, " cat": -2.0}, {" sat": -0.5, " cat": -3.0}, {" sat": LOGPROB_FLOOR}],
        "text_offset": [4, 7, 10, 14],
    }
    json.dumps(body, allow_nan=False)


def test_chat_logprobs_in_openais_chat_shape():
    entries = [TokenLogprob(7, -0.25, ((7, -0.25), (10, -2.5))), TokenLogprob(8, -1.0, ())]
    assert chat_logprobs(entries, _text_of) == {
        "content": [
            {
                "token": "The", "logprob": -0.25, "bytes": [84, 104, 101],
                "top_logprobs": [
                    {"token": "The", "logprob": -0.25, "bytes": [84, 104, 101]},
                    {"token": " mat", "logprob": -2.5, "bytes": [32, 109, 97, 116]},
                ],
            },
            {"token": " cat", "logprob": -1.0, "bytes": [32, 99, 97, 116], "top_logprobs": []},
        ]
    }  # fmt: skip


LIMITS = LimitsConfig(max_tokens=64, default_max_tokens=16, max_n=4, max_logprobs=5)


@pytest.mark.parametrize(
    ("build", "fields", "param", "message"),
    [
        (completion, {"n": 5}, "n", "n is 5; this server allows at most 4"),
        (chat, {"n": 5}, "n", "n is 5; this server allows at most 4"),
        (completion, {"logprobs": 6}, "logprobs", "logprobs is 6; this server allows at most 5"),
        (completion, {"max_tokens": 0}, "max_tokens", "max_tokens: 0 generates nothing"),
        (completion, {"max_tokens": 65}, "max_tokens", "max_tokens is 65; this server allows at most 64"),
        (chat, {"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs: true"),
        (chat, {"echo": True}, "echo", "'echo' is not supported by this server"),
        (chat, {"max_completion_tokens": 65}, "max_completion_tokens", "max_completion_tokens is 65"),
        (completion, {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
        (completion, {"stop": [""]}, "stop", "stop sequences must not be empty"),
        (completion, {"max_tokens": 3, "min_tokens": 4}, "min_tokens", "min_tokens (4) exceeds max_tokens (3)"),
        (completion, {"stop": ["x" * 257]}, "stop", "a stop sequence may be at most 256 characters long"),
        (completion, {"stream_options": {"include_usage": True}}, "stream_options", "stream_options is allowed only with stream: true"),
        (chat, {"stream": False, "stream_options": {}}, "stream_options", "stream_options is allowed only with stream: true"),
    ],
)
def test_sampling_params_refuse_what_the_limits_forbid(build, fields, param, message):
    with pytest.raises(APIError) as err:
        sampling_params(build(**fields), LIMITS)
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.message.startswith(message)


def test_sampling_params_carry_logprobs_echo_and_defaults():
    params = sampling_params(completion(logprobs=2, echo=True, max_tokens=0, seed=3, stop="\n", temperature=0), LIMITS)
    assert params == SamplingParams(max_tokens=0, temperature=0, seed=3, stop=("\n",), logprobs=2, prompt_logprobs=2)
    assert sampling_params(completion(logprobs=0), LIMITS).prompt_logprobs is None  # no echo: prompt not scored
    assert sampling_params(completion(echo=True), LIMITS).prompt_logprobs is None  # echo text only
    assert sampling_params(completion(), LIMITS).max_tokens == 16
    assert sampling_params(chat(logprobs=True), LIMITS).logprobs == 0
    assert sampling_params(chat(logprobs=True, top_logprobs=20, max_tokens=7), LIMITS).logprobs == 20
    assert sampling_params(chat(), LIMITS).logprobs is None


def test_the_params_say_which_field_set_max_tokens_or_that_none_did():
    # None: the server's default, which a long prompt may shorten to the context's room.
    assert sampling_params(completion(), LIMITS).max_tokens_param is None
    assert sampling_params(completion(max_tokens=5), LIMITS).max_tokens_param == "max_tokens"
    assert sampling_params(chat(max_completion_tokens=5, max_tokens=9), LIMITS).max_tokens_param == "max_completion_tokens"
    assert sampling_params(chat(stream=True, stream_options={"include_usage": True}), LIMITS).max_tokens_param is None
    assert sampling_params(completion(stop=["x" * 256]), LIMITS).stop == ("x" * 256,)


@pytest.mark.parametrize(
    ("build", "field"),
    [(completion, f) for f in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "min_tokens", "echo", "logprobs", "max_tokens", "stop", "seed")]
    + [(chat, f) for f in ("temperature", "top_p", "n", "stream", "logprobs", "top_logprobs", "max_completion_tokens", "tools")],
)
def test_an_explicit_null_means_not_given(build, field):
    # OpenAI documents these as "or null", and its Python client sends `temperature=None` as null.
    assert build(**{field: None}) == build()


def test_a_required_field_given_as_null_is_still_named():
    assert rejected(ChatCompletionRequest, {"messages": None}).param == "messages"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "a\\ud800b"}', "prompt"),
        (b'{"prompt": ["ok", "\\udfff"]}', "prompt.1"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}', "messages.0.content.0.text"),
        (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop.0"),
    ],
)
def test_text_that_is_not_unicode_is_a_400_naming_the_field(body, param):
    # A lone surrogate passes JSON and pydantic but no tokenizer can encode it (it was a 500).
    model = ChatCompletionRequest if b"messages" in body else CompletionRequest
    error = rejected(model, body)
    assert (error.status, error.param) == (400, param) and "unpaired UTF-16 surrogate" in error.message
    # A pair that spells one character is Unicode: accepted.
    assert parse_request(CompletionRequest, b'{"prompt": "\\ud83d\\ude00"}').prompt == "\U0001F600"


def test_each_choice_gets_its_own_seed():
    params = SamplingParams(max_tokens=4, seed=10)
    assert [params.for_choice(j).seed for j in range(3)] == [10, 11, 12]
    assert SamplingParams(max_tokens=4).for_choice(2).seed is None


def test_server_sent_events():
    assert sse({"a": 1, "b": [1, 2]}) == b'data: {"a":1,"b":[1,2]}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_ids_and_model_list():
    a, b = completion_id("completion"), completion_id("completion")
    assert a.startswith("cmpl-") and len(a) == 5 + 32 and a != b
    assert completion_id("chat").startswith("chatcmpl-")
    assert model_list(["dpo", "merged"], 9) == {
        "object": "list",
        "data": [
            {"id": "dpo", "object": "model", "created": 9, "owned_by": "alloylm"},
            {"id": "merged", "object": "model", "created": 9, "owned_by": "alloylm"},
        ],
    }


# ----------------------------------------------------------------------------- limits at their bounds, and what each field carries


def test_parse_request_answers_a_validators_recursion_and_a_whole_body_error_with_400():
    """parse_request takes any model: a RecursionError while validating is a 400 (not a 500), and an
    error of the whole body (a model validator's: no field in its location) has no param."""
    from pydantic import BaseModel, model_validator

    class Deep(BaseModel):
        @model_validator(mode="before")
        @classmethod
        def walk(cls, data):
            raise RecursionError("maximum recursion depth exceeded")

    class Whole(BaseModel):
        a: int = 0

        @model_validator(mode="after")
        def refuse(self):
            raise ValueError("the body as a whole is wrong")

    error = rejected(Deep, {"x": 1})
    assert (error.message, error.param) == ("the request body is nested too deeply", None)
    error = rejected(Whole, {"a": 1})
    assert (error.message, error.param) == ("the body as a whole is wrong", None)


def test_limits_are_inclusive():
    params = sampling_params(completion(n=4, logprobs=5, max_tokens=64, stop=["a", "b", "c", "d"]), LIMITS)
    assert (params.max_tokens, params.logprobs, params.stop) == (64, 5, ("a", "b", "c", "d"))
    assert sampling_params(chat(n=4, max_completion_tokens=64), LIMITS).max_tokens == 64


def test_the_default_n_is_one_choice():
    check_choice_fields(chat=False, limits=LimitsConfig(max_n=1))  # n defaults to 1: within max_n 1
    with pytest.raises(APIError, match="n is 2; this server allows at most 1"):
        check_choice_fields(chat=False, limits=LimitsConfig(max_n=1), n=2)


def test_echo_on_chat_is_refused_by_the_shared_check():
    """The vLLM backend calls check_choice_fields directly, with a chat request's `echo`."""
    with pytest.raises(APIError) as err:
        check_choice_fields(chat=True, limits=LIMITS, echo=True)
    assert err.value.body() == {
        "error": {"message": "'echo' is not supported by this server", "type": "invalid_request_error", "param": "echo", "code": "unsupported_parameter"}
    }


def test_unsupported_fields_are_refused_with_openais_code():
    with pytest.raises(APIError) as err:
        sampling_params(completion(best_of=3), LIMITS)
    assert (err.value.message, err.value.param, err.value.code) == ("'best_of' is not supported by this server", "best_of", "unsupported_parameter")


def test_a_chat_token_limit_is_named_as_the_client_gave_it():
    with pytest.raises(APIError) as err:
        sampling_params(chat(max_tokens=65), LIMITS)
    assert (err.value.param, err.value.message) == ("max_tokens", "max_tokens is 65; this server allows at most 64")


def test_sampling_params_carry_top_p_and_min_tokens_and_chat_scores_no_prompt():
    params = sampling_params(completion(top_p=0.5, min_tokens=2, max_tokens=8), LIMITS)
    assert params == SamplingParams(max_tokens=8, top_p=0.5, min_tokens=2)
    chat_params = sampling_params(chat(top_p=0.25, min_tokens=3, logprobs=True, top_logprobs=2), LIMITS)
    assert chat_params == SamplingParams(max_tokens=16, top_p=0.25, min_tokens=3, logprobs=2, prompt_logprobs=None, max_tokens_param=None)
    assert chat_params.prompt_logprobs is None


def test_a_last_chunk_carries_its_finish_reason():
    chunk = completion_chunk(request_id="i", model="m", created=5, text="", finish_reason="length", index=1)
    assert chunk["choices"] == [{"index": 1, "text": "", "finish_reason": "length", "logprobs": None}]


def test_nan_logprobs_are_floored_and_offsets_start_at_zero():
    body = completion_logprobs([TokenLogprob(7, float("nan"), ((8, float("nan")),)), TokenLogprob(8, -1.0)], _text_of)
    assert body == {
        "tokens": ["The", " cat"],
        "token_logprobs": [LOGPROB_FLOOR, -1.0],
        "top_logprobs": [{" cat": LOGPROB_FLOOR, "The": LOGPROB_FLOOR}, {" cat": -1.0}],
        "text_offset": [0, 3],
    }


def test_chat_logprob_bytes_replace_what_utf8_cannot_encode():
    """A token text holding a lone surrogate (no UTF-8 form) gets '?' in its bytes, not an error."""
    texts = {1: "a\ud800", 2: "é"}
    body = chat_logprobs([TokenLogprob(1, -0.5, ((2, -1.0),))], lambda token, previous: texts[token])
    assert body == {
        "content": [
            {"token": "a\ud800", "logprob": -0.5, "bytes": [97, 63], "top_logprobs": [{"token": "é", "logprob": -1.0, "bytes": [195, 169]}]}
        ]
    }
