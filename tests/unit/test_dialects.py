"""
What every chat dialect promises alike, once, run over the table of
dialects in tests/unit/dialects.py (OpenAI chat completions, Anthropic
messages, OpenAI Responses, Ollama's chat and generate): a loading model
or a full queue is a 503 in the dialect's shape; a client that goes away
stops its work at every stage; hidden thinking is covered by the
keepalive (an SSE comment, or Ollama's empty chunk); a stop sequence or
a character split across tokens is never sent in part; tool-call markup
split anywhere gives the same stream; a malformed call under C{auto} is
text; one call only stops the model at that call's end; a call cut by a
disconnect stops the model at once; arguments that must be decoded are
held under the keepalive; each C{tool_choice} builds its grammar. A
dialect that cannot say what a test asks (Ollama has no C{tool_choice},
C{/api/generate} no tools) is skipped there with its reason
(L{Dialect.lacks}), never left out silently.

Each dialect's wire shapes (golden event sequences, bodies, its own
fields and its 400s) stay in its own files: test_openai_routes.py,
test_anthropic.py, test_responses.py, test_ollama.py and their C{_tools}
companions.

Caveat: the scripted engine's template is ChatML with no tool support,
so every call is written in the Hermes syntax, and the engine ignores
the grammar it is given (the tests assert which grammar was built).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ds4tw._api.registry import DIALECTS as REGISTERED
from ds4tw._runtime.worker import ModelState
from ds4tw.testing import Exchange, Reply

from .conftest import Rig, make_rig
from .dialects import DIALECTS, Dialect
from .tools import CALL, TIME, WEATHER, chars

ALL = pytest.mark.parametrize("d", DIALECTS.values(), ids=DIALECTS.keys())
WITH_STOP = [d for d in DIALECTS.values() if d.stop is not None]
STOPS = pytest.mark.parametrize("d", WITH_STOP, ids=[d.name for d in WITH_STOP])
BOTH = pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])


def needs(*features: str) -> pytest.MarkDecorator:
    """Every dialect, each that lacks one of C{features} skipped with its reason."""
    return pytest.mark.parametrize(
        "d",
        [
            pytest.param(
                d,
                id=d.name,
                marks=[pytest.mark.skip(reason=d.lacks[f]) for f in features if f in d.lacks],
            )
            for d in DIALECTS.values()
        ],
    )


#: Registered turns this suite leaves out, and why.
NOT_NEUTRAL = {"/v1/completions": "a raw text prompt: no messages, tools or reasoning"}


def test_every_registered_chat_turn_is_in_the_table() -> None:
    """
    A dialect added to the registry (ds4tw._api.registry) without a row
    here fails: this suite is what every chat dialect must pass.
    """
    registered = {e.path for d in REGISTERED for e in d.endpoints}
    assert registered - NOT_NEUTRAL.keys() == {d.route for d in DIALECTS.values()}


def post(rig: Rig, d: Dialect, text: str = "hi", **kw: Any) -> Exchange:
    return rig.http.post(d.route, d.request(text, **kw))


def with_tools(rig: Rig, d: Dialect, text: str = "weather?", **kw: Any) -> Exchange:
    kw.setdefault("tools", [d.tool(WEATHER), d.tool(TIME)])
    return post(rig, d, text, **kw)


def tokens(rig: Rig) -> list[int | None]:
    return [i for kind, i in rig.engine.computed if kind == "token"]


def stop(d: Dialect, *sequences: str) -> dict[str, Any]:
    assert d.stop is not None
    return {d.stop: list(sequences)}


def prompt_text(rig: Rig, call: int = 0) -> str:
    return "".join(chr(t) for t in rig.engine.calls[call][0])


def cancelled(rig: Rig, stage: str) -> bool:
    line = f'ds4tw_cancelled_jobs_total{{stage="{stage}"}} 1.0'
    return line in rig.http.get("/metrics").body.decode()


# -- refused before anything is queued -----------------------------------------


@ALL
@BOTH
def test_503_while_the_model_loads(d: Dialect, stream: bool) -> None:
    rig = make_rig()
    rig.server.worker.state = ModelState.LOADING
    ex = post(rig, d, stream=stream)
    assert ex.status == 503 and ex.header("retry-after") == "5"
    assert d.error(ex) == d.errors["loading"]
    assert d.message(ex) == "the model is still loading; retry shortly"
    assert rig.engine.calls == [] and rig.engine.template_kwargs == []
    health = rig.http.get("/health")
    assert health.status == 503 and health.json()["status"] == "loading"


@ALL
def test_a_full_queue_is_a_503_with_retry_after(d: Dialect) -> None:
    rig = make_rig(max_queue=1)
    post(rig, d)
    rig.threads.step()
    post(rig, d)
    full = post(rig, d)
    assert full.status == 503 and full.header("retry-after") == "1"
    assert d.error(full) == d.errors["busy"]
    assert rig.server.worker.queue_depth == 1 and len(rig.engine.calls) == 1


# -- a client that goes away ---------------------------------------------------


@ALL
def test_disconnect_while_queued_never_reaches_the_engine(d: Dialect) -> None:
    rig = make_rig(["one two three", "second", "never"])
    first = post(rig, d)
    rig.threads.step()
    queued = post(rig, d, "queued prompt")
    third = post(rig, d, "third prompt")
    assert rig.server.worker.queue_depth == 2
    queued.disconnect()
    assert rig.server.worker.queue_depth == 1
    rig.threads.run_until_idle()
    assert len(rig.engine.calls) == 2
    assert "third prompt" in prompt_text(rig, 1)
    assert "queued prompt" not in prompt_text(rig, 0) + prompt_text(rig, 1)
    assert first.finished and third.finished
    assert d.said(first).finish == d.said(third).finish == d.finish["stop"]
    assert d.said(third).content == "second"
    assert cancelled(rig, "queued")


@ALL
def test_disconnect_during_prefill_stops_at_the_next_batch(d: Dialect) -> None:
    rig = make_rig(["never sent", "next"], n_batch=8)
    ex = post(rig, d, "a prompt that needs many prefill batches to get through")
    rig.threads.step(2)
    assert rig.engine.computed == [("prefill", 8), ("prefill", 16)]
    ex.disconnect()
    rig.threads.step()  # the model thread's next check sees the flag
    assert rig.engine.computed == [("prefill", 8), ("prefill", 16), ("closed", None)]
    assert not rig.threads.busy
    assert cancelled(rig, "prefill")
    # The worker is free: the next request runs to completion.
    nxt = post(rig, d)
    rig.threads.run_until_idle()
    assert nxt.finished
    assert (d.said(nxt).content, d.said(nxt).finish) == ("next", d.finish["stop"])


@ALL
def test_disconnect_during_decode_stops_before_the_next_token(d: Dialect) -> None:
    rig = make_rig(["a b c d e f g h i j", "next"])
    ex = post(rig, d)
    rig.threads.step(3)  # prefill and token 0, tokens 1 and 2
    assert d.said(ex).content == "a b c"
    ex.disconnect()
    rig.threads.step()
    assert tokens(rig) == [0, 1, 2]
    assert rig.engine.computed[-1] == ("closed", None)
    assert not rig.threads.busy
    assert cancelled(rig, "decode")
    nxt = post(rig, d, stream=False)
    rig.threads.run_until_idle()
    assert d.said(nxt, stream=False).content == "next"


@ALL
def test_disconnect_of_a_non_streaming_request_cancels_it(d: Dialect) -> None:
    rig = make_rig(["a b c d e f g h i j", "next"])
    ex = post(rig, d, stream=False)
    rig.threads.step(2)  # prefill and token 0, token 1
    assert not ex.headers_sent
    ex.disconnect()
    rig.threads.step()
    assert [k for k, _ in rig.engine.computed] == ["prefill", "token", "token", "closed"]
    assert not rig.threads.busy
    assert cancelled(rig, "decode")
    nxt = post(rig, d, stream=False)
    rig.threads.run_until_idle()
    assert d.said(nxt, stream=False).content == "next"


# -- what is held back ---------------------------------------------------------


@ALL
def test_hidden_thinking_is_covered_by_decode_keepalives(d: Dialect) -> None:
    """A long hidden think: tokens are computed but nothing is sendable."""
    rig = make_rig([Reply.of("<think>", *["hmm "] * 8, "</think>", "Done.")], keepalive=15)
    ex = post(rig, d, **d.hidden)
    rig.threads.step(2)  # prefill, "<think>"
    opened = d.frames(ex)
    for _ in range(8):  # eight reasoning tokens, 10 s apart
        rig.threads.step()
        rig.clock.advance(10)
    assert d.frames(ex) == opened  # nothing of the thinking was sent
    assert d.keepalives(ex) == [d.keepalive("decode")] * 5  # 80 s of silence, one per 15 s
    rig.threads.run_until_idle()
    said = d.said(ex)
    assert (said.reasoning, said.content, said.finish) == ("", "Done.", d.finish["stop"])
    # The hidden thinking was still computed, and is still counted.
    if "reasoning_tokens" in d.lacks:
        assert said.output_tokens == 11  # with "Done."
    else:
        assert said.reasoning_tokens == 10


@ALL
def test_think_tags_split_token_by_token(d: Dialect) -> None:
    rig = make_rig([Reply.of("<th", "ink>", "Let", " me", "</th", "ink>", "\n\nIt", " is 4.")])
    ex = post(rig, d, **d.thinking)
    seen = []
    for _ in range(8):  # one token a step, the first with the prefill
        rig.threads.step()
        seen.append((d.said(ex).reasoning, d.said(ex).content))
    assert seen == [
        ("", ""),  # "<th" could be the tag: held back
        ("", ""),  # "<think>": the block opens, nothing to say yet
        ("Let", ""),
        ("Let me", ""),
        ("Let me", ""),  # "</th" held back
        ("Let me", ""),  # the block closes
        ("Let me", "It"),  # the newlines after the tag are dropped
        ("Let me", "It is 4."),
    ]
    rig.threads.run_until_idle()
    assert d.said(ex).finish == d.finish["stop"]
    assert "<" not in ex.body.decode()


@ALL
def test_split_multibyte_characters_are_never_sent_in_halves(d: Dialect) -> None:
    e_acute, euro = "é".encode(), "€".encode()
    pieces: tuple[bytes, ...] = (b"<think>caf", e_acute[:1], e_acute[1:], b"</think>", b"price: ")
    pieces += (euro[:1], euro[1:2], euro[2:], b"5")
    rig = make_rig([Reply(pieces)])
    ex = post(rig, d, **d.thinking)
    seen = []
    for _ in range(len(pieces)):  # one piece a step, the first with the prefill
        rig.threads.step()
        seen.append((d.said(ex).reasoning, d.said(ex).content))
    assert seen == [
        ("caf", ""),
        ("caf", ""),
        ("café", ""),
        ("café", ""),
        ("café", "price: "),
        ("café", "price: "),
        ("café", "price: "),
        ("café", "price: €"),
        ("café", "price: €5"),
    ]
    rig.threads.run_until_idle()
    assert "\\ufffd" not in ex.body.decode() and "\ufffd" not in ex.body.decode()


@STOPS
@BOTH
def test_a_stop_sequence_split_across_tokens_is_never_sent(d: Dialect, stream: bool) -> None:
    rig = make_rig([Reply.of("The answer", " is 4", "2. ST", "O", "P and more", "never computed")])
    ex = post(rig, d, stream=stream, **stop(d, "STOP", "HALT"))
    rig.threads.run_until_idle()
    said = d.said(ex, stream)
    assert (said.content, said.finish) == ("The answer is 42. ", d.finish["stop_sequence"])
    # Decoding stopped at the match: the piece after it was never computed.
    assert len(tokens(rig)) == 5


@STOPS
def test_a_stop_sequence_is_held_back_while_it_may_match(d: Dialect) -> None:
    rig = make_rig([Reply.of("Hello ST", "O", "P never", "not computed")])
    ex = post(rig, d, **stop(d, "STOP"))
    rig.threads.step(2)
    assert d.said(ex).content == "Hello "
    rig.threads.step()
    assert d.said(ex).content == "Hello "
    rig.threads.run_until_idle()
    assert (d.said(ex).content, d.said(ex).finish) == ("Hello ", d.finish["stop_sequence"])


@STOPS
def test_a_stop_sequence_prefix_that_does_not_match_is_released(d: Dialect) -> None:
    rig = make_rig([Reply.of("ST", "ART", " end")])
    ex = post(rig, d, **stop(d, "STOP"))
    rig.threads.step()  # prefill and "ST": a prefix of STOP, held back
    assert d.said(ex).content == ""
    rig.threads.step()
    assert d.said(ex).content == "START"
    rig.threads.run_until_idle()
    assert (d.said(ex).content, d.said(ex).finish) == ("START end", d.finish["stop"])


# -- tool calls ----------------------------------------------------------------

ZURICH = "Sure.<tool_call>\n" + json.dumps(
    {"name": "get_weather", "arguments": {"city": "Zürich"}}, ensure_ascii=False
)
TWO_CALLS = f"{ZURICH}\n</tool_call>\n{CALL}"


@needs("tools")
def test_markup_split_anywhere_gives_the_same_stream(d: Dialect) -> None:
    splits: list[tuple[str, ...]] = [tuple(TWO_CALLS)]
    splits += [(TWO_CALLS[:i], TWO_CALLS[i:]) for i in range(1, len(TWO_CALLS))]
    # Byte boundaries too: the ü split between two tokens.
    raw = TWO_CALLS.encode()
    cut = raw.index("ü".encode()) + 1
    replies = [Reply.of(TWO_CALLS), *(Reply.of(*s) for s in splits), Reply((raw[:cut], raw[cut:]))]
    rig = make_rig(replies)
    whole = with_tools(rig, d, max_tokens=len(TWO_CALLS) + 1)
    rig.threads.run_until_idle()
    said = d.said(whole)
    assert said.content == "Sure."
    assert [(n, json.loads(a)) for n, a in said.calls] == [
        ("get_weather", {"city": "Zürich"}),
        ("get_weather", {"city": "Paris"}),
    ]
    assert said.finish == d.finish["tools"]
    expected = d.folded(whole)
    for pieces in [*splits, "bytes"]:
        ex = with_tools(rig, d, max_tokens=len(TWO_CALLS) + 1)
        rig.threads.run_until_idle()
        assert d.folded(ex) == expected, pieces
        assert "tool_call>" not in ex.body.decode(), pieces


@needs("tools")
@BOTH
@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
        "<tool_call>not json</tool_call> ok",
    ],
    ids=["unknown-tool", "not-json"],
)
def test_a_malformed_call_under_auto_is_text(d: Dialect, stream: bool, bad: str) -> None:
    rig = make_rig([chars(bad)])
    ex = with_tools(rig, d, stream=stream, max_tokens=len(bad) + 1)
    rig.threads.run_until_idle()
    said = d.said(ex, stream)
    assert (said.calls, said.content, said.finish) == ([], bad, d.finish["stop"])


@needs("tools", "one_call")
def test_one_call_only_stops_decoding_after_the_first(d: Dialect) -> None:
    rig = make_rig([chars(CALL + "\n" + CALL + " and more text", eos=False)])
    ex = with_tools(rig, d, max_tokens=500, **d.one_call)
    rig.threads.run_until_idle()
    said = d.said(ex)
    assert said.calls == [["get_weather", '{"city": "Paris"}']]
    assert said.finish == d.finish["tools"]
    # The model thread stopped at the first call's closing brace: the end
    # marker, the second call and the text after it were never computed.
    assert len(tokens(rig)) == CALL.index("}}") + 2
    assert rig.engine.computed[-1] == ("closed", None)
    assert rig.engine.calls[0][1].grammar is not None


@needs("tools")
def test_disconnect_mid_call_cancels_the_decode(d: Dialect) -> None:
    rig = make_rig([chars(CALL, eos=False), "next"], n_batch=100_000)
    ex = with_tools(rig, d, max_tokens=500)
    into_arguments = CALL.index('{"city') + 3
    # Prefill in one batch (which samples the first token), then into the arguments.
    rig.threads.step(into_arguments)
    # A dialect that sends calls whole has sent nothing of this one yet.
    assert d.said(ex).calls == ([] if d.whole_calls else [["get_weather", '{"c']])
    sent = ex.body
    ex.disconnect()
    rig.threads.run_until_idle()
    assert ex.body == sent  # nothing more, not even the call's end
    assert rig.engine.computed[-1] == ("closed", None)
    assert len(tokens(rig)) == into_arguments
    assert not rig.threads.busy
    nxt = post(rig, d, stream=False)
    rig.threads.run_until_idle()
    assert d.said(nxt, stream=False).content == "next"


@needs("tools")
def test_string_encoded_arguments_are_held_under_the_decode_keepalive(d: Dialect) -> None:
    """
    The model writes the arguments as a JSON string: they must be decoded
    before the client may see them, so nothing of the call goes out until
    it ends, and the keepalive fills the silence.
    """
    pieces = ("<tool_call>", '{"name": "get_weather", ', '"arguments": "', '{\\"city\\": ',
              '\\"Paris', '\\"}', '"}', "</tool_call>")  # fmt: skip
    rig = make_rig([Reply.of(*pieces)], keepalive=15, n_batch=100_000)
    ex = with_tools(rig, d)
    rig.threads.step(3)  # the opening tag, the name, the string opens
    opened = d.frames(ex)
    for _ in range(3):  # the string's three pieces, 10 s apart
        rig.threads.step()
        rig.clock.advance(10)
    assert d.keepalives(ex) == [d.keepalive("decode")] * 2
    assert d.frames(ex) == opened and d.said(ex).calls == []
    rig.threads.run_until_idle()  # the string and the object close: the call ends
    said = d.said(ex)
    assert said.calls == [["get_weather", '{"city": "Paris"}']]
    assert said.finish == d.finish["tools"]


def _choices() -> list[Any]:
    """
    Each dialect with each C{tool_choice} (None: the field left out, which
    a dialect with tools but no C{tool_choice} still runs), or why not.
    """
    out = []
    for d in DIALECTS.values():
        for choice in [None, "auto", "required", "named", "none"]:
            needed = ["tools"] if choice is None else ["tools", "tool_choice"]
            why = [d.lacks[f] for f in needed if f in d.lacks][:1]
            marks = [pytest.mark.skip(reason=r) for r in why]
            out.append(pytest.param(d, choice, id=f"{d.name}-{choice}", marks=marks))
    return out


@pytest.mark.parametrize(("d", "choice"), _choices())
def test_tool_choice_builds_the_grammar_it_needs(d: Dialect, choice: str | None) -> None:
    name = "get_time" if choice == "named" else "get_weather"
    rig = make_rig([Reply.of(CALL.replace("get_weather", name))])
    extra = {} if choice is None else {"tool_choice": d.choices[choice]}
    ex = with_tools(rig, d, **extra)
    rig.threads.run_until_idle()
    grammar = rig.engine.calls[0][1].grammar
    said = d.said(ex)
    if choice == "none":
        # No tools offered, no grammar, and nothing parses calls: the markup is text.
        assert grammar is None
        assert "get_weather" not in json.dumps(rig.engine.template_messages[0])
        assert (said.calls, said.content, said.finish) == ([], CALL, d.finish["stop"])
        return
    assert grammar is not None
    if choice in ("required", "named"):
        assert grammar.triggers == ()  # forced from the first token
    else:
        # Constrained only once the model opens a call.
        assert grammar.triggers and "<tool_call>" in grammar.triggers[0]
    if choice == "named":
        assert '\\"get_time\\"' in grammar.gbnf and "get_weather" not in grammar.gbnf
    else:
        assert "get_weather" in grammar.gbnf and "get_time" in grammar.gbnf
    assert said.calls == [[name, '{"city": "Paris"}']]
    assert said.finish == d.finish["tools"]
