"""OpenAI compatibility, proven with the official ``openai`` Python SDK against the real stack.

Every request parameter of ``/v1/chat/completions`` and ``/v1/completions`` is driven through
``client.chat.completions.create`` / ``client.completions.create``, in stream and non-stream mode
where it applies, and its effect is checked, not just its acceptance. docs/compatibility.md maps
each field to the test here that proves it.

The tiny random model makes near-uniform logits (every raw logprob is about -5.5), which the
tests use: a penalty or bias of ±2 outweighs any difference between two tokens, so its effect
on a greedy answer is certain.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.conformance.support import (
    HELLO,
    MODEL,
    PROMPT,
    ChatStream,
    CompletionStream,
    chat,
    chat_text,
    client_for,
    complete,
)

REPLACEMENT = "\ufffd"
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


def token_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return int(ids[0])


def both(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str | None, Any]:
    """Run a deterministic chat request non-streamed and streamed; they must agree exactly.

    Returns (text, finish_reason, non-stream response)."""
    r = chat(client, **kwargs)
    s = ChatStream(client, **kwargs)
    assert s.text == r.choices[0].message.content
    assert s.finish[0] == r.choices[0].finish_reason
    return str(r.choices[0].message.content), r.choices[0].finish_reason, r


def chat_tokens(client: openai.OpenAI, stream: bool, **kwargs: Any) -> list[str]:
    """The chosen tokens (via logprobs) of choice 0."""
    if stream:
        return [e.token for e in ChatStream(client, logprobs=True, **kwargs).logprobs[0]]
    return [e.token for e in chat(client, logprobs=True, **kwargs).choices[0].logprobs.content]


@pytest.fixture(scope="module")
def greedy24(conf_stack: str) -> str:
    """The greedy answer to HELLO in 24 tokens, the baseline several tests compare with."""
    return both(client_for(conf_stack), max_tokens=24, **GREEDY)[0]


def chat_logprobs(client: openai.OpenAI, stream: bool, **kwargs: Any) -> list[Any]:
    """The logprobs entries of choice 0."""
    if stream:
        return list(ChatStream(client, logprobs=True, **kwargs).logprobs[0])
    return list(chat(client, logprobs=True, **kwargs).choices[0].logprobs.content)


# ---- sampling ---------------------------------------------------------------------------------


def test_temperature_zero_is_greedy_and_repeatable(client: openai.OpenAI) -> None:
    first, _, r = both(client, max_tokens=24, **GREEDY)
    second, _, _ = both(client, max_tokens=24, **GREEDY)
    assert first == second and first
    assert r.usage.completion_tokens >= 1


def test_temperature_two_is_accepted(client: openai.OpenAI, greedy24: str) -> None:
    hot, finish, _ = both(client, max_tokens=24, temperature=2.0, seed=5)
    assert finish in ("stop", "length") and hot != greedy24


def test_top_p(client: openai.OpenAI, greedy24: str) -> None:
    greedy = greedy24
    # Nucleus sampling always keeps the most likely token: a tiny top_p is greedy at any temperature.
    narrow, _, _ = both(client, max_tokens=24, temperature=1.5, top_p=1e-6, seed=3)
    assert narrow == greedy
    wide, _, _ = both(client, max_tokens=24, temperature=1.0, top_p=0.9, seed=3)
    assert wide != greedy


def test_seed_reproduces_and_differs(client: openai.OpenAI) -> None:
    a, _, _ = both(client, max_tokens=16, temperature=1.0, seed=1234)
    b, _, _ = both(client, max_tokens=16, temperature=1.0, seed=1234)
    c, _, _ = both(client, max_tokens=16, temperature=1.0, seed=4321)
    assert a == b and a != c


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_presence_and_frequency_penalties(client: openai.OpenAI, penalty: str, stream: bool) -> None:
    plain = chat_tokens(client, stream, max_tokens=30, extra_body=NO_EOS, **GREEDY)
    # -2 rewards what was said: after the first token, greedy decoding repeats it forever.
    rewarded = chat_tokens(client, stream, max_tokens=30, extra_body=NO_EOS, **GREEDY, **{penalty: -2.0})
    assert rewarded == [plain[0]] * 30
    # +2 punishes it: no token comes twice (tokens shown as U+FFFD are distinct byte tokens).
    punished = chat_tokens(client, stream, max_tokens=30, extra_body=NO_EOS, **GREEDY, **{penalty: 2.0})
    words = [t for t in plain if t != REPLACEMENT]
    assert len(set(words)) < len(words), "precondition: plain greedy repeats itself"
    words = [t for t in punished if t != REPLACEMENT]
    assert len(set(words)) == len(words), punished
    assert len(punished) == 30


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_logit_bias(client: openai.OpenAI, tokenizer: Any, stream: bool) -> None:
    lazy = token_id(tokenizer, " lazy")
    forced = chat_tokens(client, stream, max_tokens=6, logit_bias={str(lazy): 100}, extra_body=NO_EOS, **GREEDY)
    assert forced == [" lazy"] * 6
    text = (ChatStream(client, max_tokens=6, logit_bias={str(lazy): 100}, extra_body=NO_EOS, **GREEDY).text
            if stream else chat_text(client, max_tokens=6, logit_bias={str(lazy): 100}, extra_body=NO_EOS, **GREEDY))
    assert text == " lazy" * 6
    # -100 bans the token greedy decoding would pick first.
    plain = chat_tokens(client, stream, max_tokens=1, **GREEDY)
    banned = token_id(tokenizer, plain[0])
    assert chat_tokens(client, stream, max_tokens=1, logit_bias={str(banned): -100}, **GREEDY) != plain


def test_top_k(client: openai.OpenAI, greedy24: str) -> None:
    top1, _, _ = both(client, max_tokens=24, temperature=1.5, seed=9, extra_body={"top_k": 1})
    assert top1 == greedy24
    # -1 and 0 mean "off": the same seeded draw as without top_k.
    seeded = chat_text(client, max_tokens=24, temperature=1.0, seed=9)
    assert chat_text(client, max_tokens=24, temperature=1.0, seed=9, extra_body={"top_k": -1}) == seeded
    assert seeded != greedy24
    # Every token drawn under top_k=5 is among the 5 most likely (raw logprobs, temperature 1).
    for stream in (False, True):
        content = chat_logprobs(client, stream, max_tokens=40, temperature=1.0, seed=9, top_logprobs=5,
                                extra_body={**NO_EOS, "top_k": 5})
        assert all(e.logprob >= e.top_logprobs[4].logprob - 1e-6 for e in content)
    unlimited = chat_logprobs(client, False, max_tokens=40, temperature=1.0, seed=9, top_logprobs=5,
                              extra_body=NO_EOS)
    assert any(e.logprob < e.top_logprobs[4].logprob for e in unlimited)  # precondition


def test_min_p(client: openai.OpenAI, greedy24: str) -> None:
    # min_p=1 keeps only tokens as likely as the most likely one.
    strict, _, _ = both(client, max_tokens=24, temperature=1.5, seed=4, extra_body={"min_p": 1.0})
    assert strict == greedy24

    def below(min_p: float, content: list[Any]) -> int:
        """Chosen tokens less likely than min_p x the top token (temperature 1: raw = filtered)."""
        return sum(1 for e in content if e.logprob < e.top_logprobs[0].logprob + math.log(min_p) - 1e-4)

    kwargs: dict[str, Any] = {"max_tokens": 40, "temperature": 1.0, "seed": 4, "top_logprobs": 1}
    assert below(0.9, chat_logprobs(client, False, extra_body=NO_EOS, **kwargs)) > 0  # precondition
    for stream in (False, True):
        assert below(0.9, chat_logprobs(client, stream, extra_body={**NO_EOS, "min_p": 0.9}, **kwargs)) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_repetition_penalty(client: openai.OpenAI, stream: bool) -> None:
    plain = chat_tokens(client, stream, max_tokens=30, extra_body=NO_EOS, **GREEDY)
    neutral = chat_tokens(client, stream, max_tokens=30, extra_body={**NO_EOS, "repetition_penalty": 1.0}, **GREEDY)
    assert neutral == plain
    strong = chat_tokens(client, stream, max_tokens=30, extra_body={**NO_EOS, "repetition_penalty": 10.0}, **GREEDY)
    words = [t for t in strong if t != REPLACEMENT]
    assert strong != plain and len(set(words)) == len(words), strong


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_ignore_eos_and_min_tokens(client: openai.OpenAI, tokenizer: Any, stream: bool) -> None:
    eos = {str(tokenizer.eos_token_id): 100}

    def run(**extra: Any) -> tuple[str, str | None, int]:
        kwargs: dict[str, Any] = {"max_tokens": 12, "logit_bias": eos, "extra_body": extra, **GREEDY}
        if stream:
            s = ChatStream(client, stream_options={"include_usage": True}, **kwargs)
            return s.text, s.finish[0], s.usage.completion_tokens
        r = chat(client, **kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    # EOS pushed to the top: the answer ends at once.
    text, finish, _ = run()
    assert (text, finish) == ("", "stop")
    # ignore_eos: EOS is never chosen, the answer runs to max_tokens.
    text, finish, tokens = run(ignore_eos=True)
    assert finish == "length" and tokens == 12 and text
    # min_tokens: EOS is banned for the first 5 tokens only.
    text, finish, tokens = run(min_tokens=5)
    assert finish == "stop" and tokens >= 5 and text


def test_sampling_fields_on_completions(client: openai.OpenAI) -> None:
    """The sampling fields behave the same on /v1/completions (stream and not)."""
    kwargs: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 21,
                              "presence_penalty": 0.5, "frequency_penalty": 0.5,
                              "extra_body": {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}}
    a = complete(client, **kwargs).choices[0].text
    b = CompletionStream(client, **kwargs).text
    greedy = complete(client, max_tokens=16, **GREEDY).choices[0].text
    assert a == b and a != greedy
    top1 = complete(client, max_tokens=16, temperature=1.0, seed=2, extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy


# ---- validation: out of range values --------------------------------------------------------

OUT_OF_RANGE: list[tuple[str, dict[str, Any]]] = [
    ("temperature", {"temperature": 3}),
    ("temperature", {"temperature": -0.5}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.5}),
    ("n", {"n": 0}),
    ("presence_penalty", {"presence_penalty": 3}),
    ("frequency_penalty", {"frequency_penalty": -3}),
    ("logit_bias", {"logit_bias": {"5": 200}}),
    ("logit_bias", {"logit_bias": {"not-a-token": 1}}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("top_logprobs", {"top_logprobs": 2}),  # without logprobs
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_completion_tokens", {"max_completion_tokens": 0}),
    ("seed", {"seed": "x"}),
    ("top_k", {"extra_body": {"top_k": -2}}),
    ("min_p", {"extra_body": {"min_p": 2}}),
    ("repetition_penalty", {"extra_body": {"repetition_penalty": 0}}),
    ("min_tokens", {"extra_body": {"min_tokens": -1}}),
    ("ignore_eos", {"extra_body": {"ignore_eos": "yes"}}),
]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(("param", "kwargs"), OUT_OF_RANGE, ids=[f"{p}-{i}" for i, (p, _) in enumerate(OUT_OF_RANGE)])
def test_chat_out_of_range_is_400_naming_param(
    client: openai.OpenAI, param: str, kwargs: dict[str, Any], stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        if stream:
            ChatStream(client, **kwargs)
        else:
            chat(client, **kwargs)
    assert err.value.status_code == 400
    assert err.value.param == param, err.value.message
    assert err.value.type == "invalid_request_error"
    assert err.value.message


COMPLETION_OUT_OF_RANGE: list[tuple[str, dict[str, Any]]] = [
    ("temperature", {"temperature": 3}),
    ("logprobs", {"logprobs": 6}),
    ("n", {"n": 0}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("prompt", {"prompt": []}),
    ("prompt", {"prompt": [1, "a"]}),
    ("echo", {"echo": "yes"}),
    ("top_k", {"extra_body": {"top_k": -2}}),
]


@pytest.mark.parametrize(("param", "kwargs"), COMPLETION_OUT_OF_RANGE,
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(COMPLETION_OUT_OF_RANGE)])
def test_completions_out_of_range_is_400_naming_param(
    client: openai.OpenAI, param: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, **kwargs)
    assert err.value.param == param, err.value.message


# ---- n, stop, max_tokens -----------------------------------------------------------------------


def test_n_chat_choices_have_distinct_indexes(client: openai.OpenAI) -> None:
    r = chat(client, n=3, max_tokens=8, temperature=1.0, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 3
    s = ChatStream(client, n=3, max_tokens=8, temperature=1.0, seed=3)
    assert s.texts == {c.index: c.message.content for c in r.choices}
    assert s.roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert set(s.finish) == {0, 1, 2}
    # OpenAI streams one choice per chunk.
    assert all(len(chunk.choices) == 1 for chunk in s.chunks)


def test_n_completions_choices_per_prompt(client: openai.OpenAI) -> None:
    prompts = ["The capital", "Numbers: 1 2"]
    r = complete(client, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=8)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    s = CompletionStream(client, prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=8)
    assert s.texts == {c.index: c.text for c in r.choices}
    assert set(s.finish) == {0, 1, 2, 3}


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_stop_string_and_list(client: openai.OpenAI, stream: bool) -> None:
    full = chat_text(client, max_tokens=40, extra_body=NO_EOS, **GREEDY)
    run = (lambda **kw: ChatStream(client, **kw).text) if stream else (lambda **kw: chat_text(client, **kw))
    for start in (4, 12):
        stop = full[start:start + 2]
        expected = full[: full.find(stop)]
        assert run(max_tokens=40, stop=stop, extra_body=NO_EOS, **GREEDY) == expected
        four = [stop, "zz-never", "qq-never", "xx-never"]
        text = run(max_tokens=40, stop=four, extra_body=NO_EOS, **GREEDY)
        assert text == expected and stop not in text
    r = chat(client, max_tokens=40, stop=[full[12:14]], extra_body=NO_EOS, **GREEDY)
    assert r.choices[0].finish_reason == "stop"


def test_stop_on_completions(client: openai.OpenAI) -> None:
    full = complete(client, max_tokens=40, extra_body=NO_EOS, **GREEDY).choices[0].text
    stop = full[8:10]
    expected = full[: full.find(stop)]
    r = complete(client, max_tokens=40, stop=stop, extra_body=NO_EOS, **GREEDY)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    s = CompletionStream(client, max_tokens=40, stop=[stop, "never-appears"], extra_body=NO_EOS, **GREEDY)
    assert (s.text, s.finish[0]) == (expected, "stop")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_length_and_exact_usage(client: openai.OpenAI, field: str) -> None:
    limit = {field: 9}
    r = chat(client, extra_body=NO_EOS, **limit, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 9
    assert r.usage.total_tokens == r.usage.prompt_tokens + 9
    s = ChatStream(client, extra_body=NO_EOS, stream_options={"include_usage": True}, **limit, **GREEDY)
    assert s.finish[0] == "length" and s.usage.completion_tokens == 9
    assert s.usage.prompt_tokens == r.usage.prompt_tokens
    assert s.chunks[-1].choices == [] and all(c.usage is None for c in s.chunks[:-1])


def test_max_tokens_on_completions(client: openai.OpenAI) -> None:
    r = complete(client, max_tokens=7, extra_body=NO_EOS, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    s = CompletionStream(client, max_tokens=7, extra_body=NO_EOS, stream_options={"include_usage": True}, **GREEDY)
    assert s.finish[0] == "length" and s.chunks[-1].usage.completion_tokens == 7
    assert s.chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


# ---- logprobs -------------------------------------------------------------------------------


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=16, logprobs=True, top_logprobs=3, extra_body=NO_EOS, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 16
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0
        # `bytes` are the token's own bytes: its text's UTF-8 when it holds whole characters; a token
        # holding part of one decodes to U+FFFD (see test_chat_logprob_bytes_rebuild_split_characters).
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
        top = entry.top_logprobs
        assert len(top) == 3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert all(bytes(t.bytes).decode(errors="replace") == t.token and t.logprob <= 0 for t in top)
        # Greedy: the chosen token is the most likely one (raw logprobs, nothing adjusts them).
        assert entry.logprob == top[0].logprob and entry.token == top[0].token
    # logprobs without top_logprobs: the chosen token only.
    bare = chat(client, max_tokens=4, logprobs=True, **GREEDY).choices[0].logprobs.content
    assert bare and all(e.top_logprobs == [] for e in bare)
    # Not asked: null.
    assert chat(client, max_tokens=4, **GREEDY).choices[0].logprobs is None


def test_chat_logprobs_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 16, "logprobs": True, "top_logprobs": 2, "extra_body": NO_EOS, **GREEDY}
    r = chat(client, **kwargs)
    s = ChatStream(client, **kwargs)
    assert s.logprobs[0] == r.choices[0].logprobs.content
    assert all(c.logprobs is None for chunk in s.chunks for c in chunk.choices if c.finish_reason)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_chat_logprob_tokens_concatenate_to_text(client: openai.OpenAI, tokenizer: Any, stream: bool) -> None:
    # Steer the random model onto whole-character (ASCII) tokens, where tokens add up to the text.
    words = [" lazy", " fox", " dog", " today", " more"]
    bias = {str(token_id(tokenizer, w)): 100 for w in words}
    kwargs: dict[str, Any] = {"max_tokens": 12, "logit_bias": bias, "logprobs": True, "top_logprobs": 1,
                              "presence_penalty": 2.0, "extra_body": NO_EOS, **GREEDY}
    if stream:
        s = ChatStream(client, **kwargs)
        text, content = s.text, s.logprobs[0]
    else:
        choice = chat(client, **kwargs).choices[0]
        text, content = choice.message.content, choice.logprobs.content
    assert "".join(e.token for e in content) == text
    assert b"".join(bytes(e.bytes) for e in content) == text.encode()
    assert {e.token for e in content} == set(words)  # presence_penalty cycles through all five


def test_chat_logprob_bytes_rebuild_split_characters(client: openai.OpenAI, tokenizer: Any) -> None:
    # 'é' is the two byte-tokens C3 A9: a seeded draw between just those two spells 'é' several times.
    lead, trail = tokenizer.convert_tokens_to_ids(["Ã", "©"])
    r = chat(client, max_tokens=12, temperature=1.0, seed=5, logprobs=True,
             logit_bias={str(lead): 100, str(trail): 100}, extra_body=NO_EOS)
    text = r.choices[0].message.content
    assert "é" in text
    joined = b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content)
    assert joined.decode("utf-8", errors="replace").rstrip(REPLACEMENT) == text.rstrip(REPLACEMENT)


def test_completions_logprobs(client: openai.OpenAI, tokenizer: Any) -> None:
    # Special tokens are kept out here: see test_completions_text_offset_with_special_tokens.
    no_specials = {str(i): -100 for i in tokenizer.all_special_ids}
    kwargs: dict[str, Any] = {"max_tokens": 12, "logprobs": 2, "logit_bias": no_specials, "extra_body": NO_EOS,
                              **GREEDY}
    choice = complete(client, **kwargs).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    # text_offset follows the text sent: a whole-character token spans exactly its own text, up to
    # the next offset; a token holding part of a character ('\ufffd') adds text only once the
    # character is complete.
    assert lp.text_offset[0] == 0
    ends = [*lp.text_offset[1:], len(choice.text)]
    for token, logprob, top, at, end in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, ends,
                                            strict=True):
        assert logprob <= 0 and at <= end
        if REPLACEMENT not in token:
            assert choice.text[at:end] == token
        # A dict token -> logprob: two entries, fewer when two tokens decode to the same text.
        assert isinstance(top, dict) and 1 <= len(top) <= 2
        assert logprob <= max(top.values())  # raw logprobs: logit_bias does not change them
    s = CompletionStream(client, **kwargs)
    assert s.text == choice.text
    assert (s.tokens[0], s.token_logprobs[0], s.top_logprobs[0]) == (lp.tokens, lp.token_logprobs, lp.top_logprobs)
    assert s.text_offset[0] == lp.text_offset  # see also ..._stream_and_non_stream_agree
    assert complete(client, max_tokens=3).choices[0].logprobs is None
    # logprobs=0: the chosen tokens' logprobs, no alternatives.
    zero = complete(client, max_tokens=3, logprobs=0, **GREEDY).choices[0].logprobs
    assert len(zero.tokens) == 3 and all(t == {} for t in zero.top_logprobs)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_completions_text_offset_indexes_text(client: openai.OpenAI, tokenizer: Any, stream: bool) -> None:
    bias = {str(token_id(tokenizer, w)): 100 for w in (" lazy", " fox", " dog")}
    kwargs: dict[str, Any] = {"max_tokens": 6, "logprobs": 1, "logit_bias": bias, "presence_penalty": 2.0,
                              "extra_body": NO_EOS, **GREEDY}
    if stream:
        s = CompletionStream(client, **kwargs)
        text, tokens, offsets = s.text, s.tokens[0], s.text_offset[0]
    else:
        choice = complete(client, **kwargs).choices[0]
        text, tokens, offsets = choice.text, choice.logprobs.tokens, choice.logprobs.text_offset
    assert "".join(tokens) == text and set(tokens) == {" lazy", " fox", " dog"}  # logit_bias steers
    assert all(text[at:].startswith(token) for token, at in zip(tokens, offsets, strict=True))


def test_completions_text_offset_stream_and_non_stream_agree(client: openai.OpenAI, tokenizer: Any) -> None:
    # Greedy with +100 on ' lazy' and on '<|im_start|>', frequency_penalty 2: the two alternate.
    bias = {str(token_id(tokenizer, " lazy")): 100, str(tokenizer.bos_token_id): 100}
    kwargs: dict[str, Any] = {"max_tokens": 6, "logprobs": 0, "logit_bias": bias, "frequency_penalty": 2.0,
                              "extra_body": NO_EOS, **GREEDY}
    choice = complete(client, **kwargs).choices[0]
    s = CompletionStream(client, **kwargs)
    assert choice.text == s.text == " lazy" * 3
    assert s.tokens[0] == choice.logprobs.tokens and tokenizer.bos_token in s.tokens[0]
    assert sorted(s.text_offset[0]) == [0, 0, 5, 5, 10, 10]  # holds today (order depends on who goes first)
    assert choice.logprobs.text_offset == s.text_offset[0]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_echo_returns_prompt_and_completion(client: openai.OpenAI, stream: bool) -> None:
    plain = complete(client, max_tokens=8, **GREEDY).choices[0].text
    if stream:
        echoed = CompletionStream(client, max_tokens=8, echo=True, **GREEDY).text
    else:
        echoed = complete(client, max_tokens=8, echo=True, **GREEDY).choices[0].text
    assert echoed == PROMPT + plain


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_echo_with_logprobs_covers_the_prompt(client: openai.OpenAI, tokenizer: Any, stream: bool) -> None:
    lazy = token_id(tokenizer, " lazy")
    kwargs: dict[str, Any] = {"max_tokens": 3, "echo": True, "logprobs": 1, "logit_bias": {str(lazy): 100},
                              "extra_body": NO_EOS, **GREEDY}
    if stream:
        s = CompletionStream(client, **kwargs)
        text, tokens, logprobs, offsets = s.text, s.tokens[0], s.token_logprobs[0], s.text_offset[0]
    else:
        choice = complete(client, **kwargs).choices[0]
        lp = choice.logprobs
        text, tokens, logprobs, offsets = choice.text, lp.tokens, lp.token_logprobs, lp.text_offset
    assert text == PROMPT + " lazy" * 3
    # OpenAI's shape: the prompt's tokens first, the very first with a null logprob (no context).
    assert "".join(tokens) == text
    assert len(tokens) == len(tokenizer.encode(PROMPT, add_special_tokens=False)) + 3
    assert logprobs[0] is None and all(v is not None and v <= 0 for v in logprobs[1:])
    assert all(text[at:].startswith(t) for t, at in zip(tokens, offsets, strict=True))


# ---- completions prompt forms, suffix, best_of -------------------------------------------------


def test_completions_prompt_forms(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    other = "Numbers: 1 2"
    other_ids = tokenizer.encode(other, add_special_tokens=False)
    kwargs: dict[str, Any] = {"max_tokens": 8, "extra_body": NO_EOS, **GREEDY}
    single = complete(client, prompt=PROMPT, **kwargs)
    assert single.usage.prompt_tokens == len(ids)
    texts = [c.text for c in complete(client, prompt=[PROMPT, other], **kwargs).choices]
    assert texts[0] == single.choices[0].text and len(texts) == 2
    by_ids = complete(client, prompt=ids, **kwargs)
    assert by_ids.choices[0].text == single.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    lists = complete(client, prompt=[ids, other_ids], **kwargs)
    assert [c.text for c in lists.choices] == texts
    assert lists.usage.prompt_tokens == len(ids) + len(other_ids)
    streamed = CompletionStream(client, prompt=[ids, other_ids], **kwargs)
    assert [streamed.texts[0], streamed.texts[1]] == texts


def test_suffix_and_best_of(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, max_tokens=2, suffix="!")
    assert err.value.param == "suffix" and err.value.code == "unsupported_parameter"
    assert complete(client, max_tokens=2, suffix="").choices
    r = complete(client, max_tokens=2, n=2, best_of=2)
    assert len(r.choices) == 2
    assert len(complete(client, max_tokens=2, best_of=1).choices) == 1
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, max_tokens=2, n=1, best_of=3)
    assert err.value.param == "best_of" and err.value.code == "unsupported_parameter"


# ---- accepted and ignored, refused ------------------------------------------------------------

IGNORED: dict[str, Any] = {
    "user": "user-1234",
    "metadata": {"purpose": "conformance"},
    "store": False,
    "service_tier": "auto",
    "parallel_tool_calls": True,
    "reasoning_effort": "low",
    "web_search_options": {},
}


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_ignored_chat_fields_are_accepted(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 8, **GREEDY}
    expected = chat_text(client, **kwargs)
    extra = {**kwargs, **IGNORED, "extra_body": {"some_unknown_field": {"x": 1}, "another": [1, 2]}}
    if stream:
        s = ChatStream(client, stream_options={"include_usage": True, "unknown_option": 1}, **extra)
        assert s.text == expected and s.usage is not None
    else:
        assert chat_text(client, **extra) == expected


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_ignored_completion_fields_are_accepted(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"max_tokens": 8, **GREEDY}
    expected = complete(client, **kwargs).choices[0].text
    extra = {**kwargs, "user": "u", "extra_body": {"some_unknown_field": True, "metadata": {"a": "b"}}}
    if stream:
        assert CompletionStream(client, stream_options={"include_usage": False}, **extra).text == expected
    else:
        assert complete(client, **extra).choices[0].text == expected


def test_stream_options_needs_stream(client: openai.OpenAI) -> None:
    for call in (lambda: chat(client, max_tokens=2, stream_options={"include_usage": True}),
                 lambda: complete(client, max_tokens=2, stream_options={"include_usage": True})):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert err.value.param == "stream_options"
    # include_usage false (or left out): no usage chunk, every chunk has usage null or absent.
    s = ChatStream(client, max_tokens=3, stream_options={"include_usage": False})
    assert all(c.choices and c.usage is None for c in s.chunks)


REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("functions", {"functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}]}),
    ("function_call", {"function_call": "auto"}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("prediction", {"prediction": {"type": "content", "content": "Hello"}}),
]


@pytest.mark.parametrize(("param", "kwargs"), REFUSED, ids=[p for p, _ in REFUSED])
def test_unsupported_fields_are_refused_by_name(client: openai.OpenAI, param: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, max_tokens=2, **kwargs)
    assert err.value.param == param and err.value.code == "unsupported_parameter"


def test_tools_on_completions_are_refused(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, max_tokens=2, extra_body={"tools": [tool]})
    assert err.value.param == "tools" and err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        complete(client, max_tokens=2, extra_body={"tools": [tool], "tool_choice": "required"})
    assert err.value.param in ("tools", "tool_choice")


def test_modalities_text_is_accepted(client: openai.OpenAI) -> None:
    assert chat_text(client, max_tokens=4, modalities=["text"], **GREEDY) == chat_text(client, max_tokens=4, **GREEDY)


# ---- messages ---------------------------------------------------------------------------------


def test_message_roles_and_content_forms(client: openai.OpenAI) -> None:
    def run(messages: list[dict[str, Any]]) -> tuple[str, int]:
        r = chat(client, messages=messages, max_tokens=8, **GREEDY)
        return r.choices[0].message.content, r.usage.prompt_tokens

    # Text parts are joined with a newline.
    parts = [{"type": "text", "text": "Hello world!"}, {"type": "text", "text": "How are you today?"}]
    assert run([{"role": "user", "content": parts}]) == run(
        [{"role": "user", "content": "Hello world!\nHow are you today?"}])
    # 'developer' is the new name of 'system'.
    assert run([{"role": "developer", "content": "Be brief."}, *HELLO]) == run(
        [{"role": "system", "content": "Be brief."}, *HELLO])
    # A whole conversation with every role, an assistant tool call (content null) and its result.
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]},
        {"role": "user", "content": "Thanks"},
    ]
    text, prompt_tokens = run(conversation)
    assert prompt_tokens > 20
    assert ChatStream(client, messages=conversation, max_tokens=8, **GREEDY).text == text


MESSAGE_ERRORS: list[tuple[str, list[Any]]] = [
    ("messages", []),
    ("messages[0].role", [{"role": "robot", "content": "hi"}]),
    ("messages[0].content", [{"role": "user"}]),
    ("messages[0].content[0].type", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
    ("messages[1].tool_call_id", [*HELLO, {"role": "tool", "content": "x"}]),
]


@pytest.mark.parametrize(("param", "messages"), MESSAGE_ERRORS, ids=[p for p, _ in MESSAGE_ERRORS])
def test_bad_messages_are_400_naming_param(client: openai.OpenAI, param: str, messages: list[Any]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=messages, max_tokens=2)
    assert err.value.param == param, err.value.message


# ---- per-request settings inside one batch --------------------------------------------------


def test_mixed_settings_batched_together_match_alone(client: openai.OpenAI, tokenizer: Any) -> None:
    """Seven requests with different settings run at once on the one worker (16 rows): each
    answer equals the same request run alone, so every row kept its own settings."""
    long = {"max_tokens": 64, "extra_body": NO_EOS}
    alone_greedy = chat_text(client, **long, **GREEDY)
    stop_at = next(p for p in range(30, 50) if alone_greedy.find(alone_greedy[p:p + 3]) == p)
    requests: list[dict[str, Any]] = [
        {**long, **GREEDY},
        {**long, "temperature": 1.0, "seed": 7},
        {**long, "temperature": 0.9, "extra_body": {**NO_EOS, "top_k": 1}},
        {**long, **GREEDY, "stop": [alone_greedy[stop_at:stop_at + 3]]},
        {**long, **GREEDY, "logprobs": True, "top_logprobs": 2, "messages": [{"role": "user", "content": "1 2 3"}]},
        {**long, **GREEDY, "presence_penalty": -2.0},
        {**long, "temperature": 1.0, "seed": 11, "n": 2},
    ]

    def outcome(s: ChatStream) -> tuple[Any, ...]:
        lp = [(e.token, round(e.logprob, 3), [t.token for t in e.top_logprobs]) for e in s.logprobs.get(0, [])]
        return s.texts, s.finish, lp

    alone = [outcome(ChatStream(client, **kw)) for kw in requests]
    assert alone[2][0] == alone[0][0]  # top_k=1 is greedy
    assert alone[3][0][0] == alone_greedy[:stop_at] and alone[3][1][0] == "stop"

    barrier = threading.Barrier(len(requests))
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * len(requests)

    def together(i: int) -> tuple[Any, ...]:
        barrier.wait()
        stream = client.chat.completions.create(stream=True, model=MODEL, **{"messages": HELLO, **requests[i]})
        chunks = []
        first = 0.0
        for chunk in stream:
            first = first or time.monotonic()
            chunks.append(chunk)
        spans[i] = (first, time.monotonic())
        s = ChatStream.of(chunks)
        return outcome(s)

    with ThreadPoolExecutor(len(requests)) as pool:
        batched = list(pool.map(together, range(len(requests))))
    # They overlapped: every request had its first token before any long one had finished.
    long_ends = [end for i, (_, end) in enumerate(spans) if i != 3]
    assert max(start for start, _ in spans) < min(long_ends), spans
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert a == b, f"request {i} ({requests[i]}) differs when batched"
