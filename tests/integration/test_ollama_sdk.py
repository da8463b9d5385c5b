"""
The official C{ollama} Python library (and LangChain's C{ChatOllama}, which
drives it) against C{twistd -n ds4tw} on a real loopback port: Ollama's
C{/api/chat}, C{/api/generate}, C{/api/embed}, C{/api/embeddings},
C{/api/tags}, C{/api/show}, C{/api/ps} and C{/api/version}.

Two servers. The demo model, named C{demo} in a models file with no
default (so that an unknown name is Ollama's 404, not the only model),
with C{embeddings = true}: text, counters, options, structured output and
embeddings, checked against what the OpenAI routes of the same server
report for the same request. And the scripted engine, for what the
135M model cannot be relied on to do and Ollama gives no way to force
(it has no C{tool_choice}): a tool call in Hermes syntax after a
C{<think>} block, so the library's tool calls (arguments as a dict) and
C{think} are checked on every run.

Caveats: the tool call and the reasoning are the scripted engine's, so
they prove the wire and the library's parsing, not that a real model
calls tools through Ollama's route (tests/integration/test_tools_sdk.py
samples calls under grammars); what the library hides (the bytes, the
keepalive lines) is checked with raw httpx in tests/unit/test_ollama.py
and tests/integration/test_ollama_keepalive.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import ollama
import openai
import pytest
from jsonschema import validate
from pydantic import BaseModel

from ds4tw._engine.llama import demo_model_path

from .conftest import WEATHER_SCHEMA, Twistd, start_twistd, stop_twistd

#: The demo model's one name: no default, no aliases, so any other is a 404.
MODELS = """
[models.demo]
path = "{path}"
embeddings = true
ctx = 2048
"""
ASK = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 24}

#: The scripted engine's answers: a Hermes tool call when the weather tool
#: is offered (its description is in the system prompt), the answer to
#: the tool's result once it is in the conversation (listed first: that
#: prompt still holds the tool's description), and REPLY otherwise; each
#: after a reasoning block of THINK tokens.
THINK = 2
REPLY = "Hello from the scripted engine."
TOOL_RESULT = "18 degrees and sunny"
FINAL = "It is 18 degrees and sunny in Paris."
CALL_ARGS = {"city": "Paris", "unit": "celsius"}
TOOL_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(CALL_ARGS) + "}\n</tool_call>"
)
SPEC = {
    "think": THINK,
    "reply": REPLY,
    "when": {TOOL_RESULT: FINAL, "Get the current weather": TOOL_CALL},
}
#: The engine's tokens for the reasoning block: "<think>", THINK times
#: " thinking", "</think>\n\n" (ds4tw._engine.scripted.ScriptedSpec).
THINK_TOKENS = THINK + 2
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": WEATHER_SCHEMA,
    },
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    tmp = tmp_path_factory.mktemp("ollama-demo")
    models = tmp / "models.toml"
    models.write_text(MODELS.format(path=demo_model_path()))
    server = start_twistd(tmp, "--models", str(models), "--threads", "2", "--parallel", "2")
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    tmp = tmp_path_factory.mktemp("ollama-scripted")
    spec = tmp / "spec.json"
    spec.write_text(json.dumps(SPEC))
    server = start_twistd(tmp, "--model", f"scripted:{spec}", "--model-id", "scripted")
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture
def client(demo: Twistd) -> ollama.Client:
    demo.wait_idle()
    return ollama.Client(host=demo.url, timeout=120)


def openai_usage(server: Twistd, **body: Any) -> tuple[str, Any]:
    """The same request through the OpenAI route: its text and usage, for reference."""
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = oa.chat.completions.create(model="demo", temperature=0, **body)
    return r.choices[0].message.content or "", r.usage


def check_counters(final: Any, wall_s: float) -> None:
    """Ollama's counters on a final chunk: present, integers, in nanoseconds."""
    assert final.done is True
    for name in (
        "total_duration", "load_duration", "prompt_eval_count",
        "prompt_eval_duration", "eval_count", "eval_duration",
    ):  # fmt: skip
        value = getattr(final, name)
        assert isinstance(value, int) and value >= 0, (name, value)
    assert final.prompt_eval_count > 0 and final.eval_count > 0
    assert final.prompt_eval_duration > 0 and final.eval_duration > 0
    # Nanoseconds: the whole request took less than the wall time around it,
    # and a token of the demo model takes 0.1 ms to 10 s (milliseconds or
    # seconds would be a million times off either bound).
    assert final.eval_duration + final.prompt_eval_duration <= final.total_duration
    assert final.total_duration <= wall_s * 1e9
    assert 1e5 <= final.eval_duration / final.eval_count <= 1e10
    datetime.fromisoformat(final.created_at.replace("Z", "+00:00"))


# -- chat and generate on the demo model ---------------------------------------


def test_chat_streamed_equals_plain_and_counts_match(client: ollama.Client, demo: Twistd) -> None:
    t0 = time.monotonic()
    plain = client.chat(model="demo", messages=ASK, options=GREEDY)
    wall = time.monotonic() - t0
    assert plain.model == "demo"
    assert plain.message.role == "assistant" and plain.message.content
    assert plain.done_reason in ("stop", "length")
    check_counters(plain, wall)

    t0 = time.monotonic()
    chunks = list(client.chat(model="demo", messages=ASK, options=GREEDY, stream=True))
    wall = time.monotonic() - t0
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    final = chunks[-1]
    assert final.message.content == "" and final.done_reason == plain.done_reason
    check_counters(final, wall)
    # Greedy decoding: the same text and the same counts, streamed or not.
    assert "".join(c.message.content or "" for c in chunks) == plain.message.content
    assert (final.prompt_eval_count, final.eval_count) == (
        plain.prompt_eval_count,
        plain.eval_count,
    )
    # The counts are the tokens: the OpenAI route's usage for the same turn.
    text, usage = openai_usage(demo, messages=ASK, max_tokens=24)
    assert text == plain.message.content
    assert plain.prompt_eval_count == usage.prompt_tokens
    assert plain.eval_count == usage.completion_tokens


def test_generate_streamed_equals_plain(client: ollama.Client, demo: Twistd) -> None:
    prompt = "Why is the sky blue?"
    t0 = time.monotonic()
    plain = client.generate(model="demo", prompt=prompt, options=GREEDY)
    wall = time.monotonic() - t0
    assert plain.response and plain.done_reason in ("stop", "length")
    check_counters(plain, wall)
    chunks = list(client.generate(model="demo", prompt=prompt, options=GREEDY, stream=True))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.response or "" for c in chunks) == plain.response
    assert chunks[-1].eval_count == plain.eval_count
    # /api/generate's prompt is a user turn under the model's template.
    text, usage = openai_usage(demo, messages=[{"role": "user", "content": prompt}], max_tokens=24)
    assert text == plain.response
    assert plain.prompt_eval_count == usage.prompt_tokens


def test_async_client_streams_two_chats_at_once(demo: Twistd) -> None:
    demo.wait_idle()

    async def one(c: ollama.AsyncClient, question: str) -> tuple[str, Any]:
        text, last = "", None
        async for chunk in await c.chat(
            model="demo",
            messages=[{"role": "user", "content": question}],
            options={"temperature": 0, "num_predict": 12},
            stream=True,
        ):
            text += chunk.message.content or ""
            last = chunk
        return text, last

    async def main() -> list[tuple[str, Any]]:
        c = ollama.AsyncClient(host=demo.url, timeout=120)
        return list(await asyncio.gather(one(c, "Name a colour."), one(c, "Name a fruit.")))

    for text, last in asyncio.run(main()):
        assert text and last.done and last.eval_count <= 12


def test_num_predict_caps_eval_count(client: ollama.Client) -> None:
    r = client.chat(
        model="demo",
        messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
        options={"temperature": 0, "num_predict": 5},
    )
    assert r.eval_count == 5 and r.done_reason == "length"


def test_stop_sequence_stops_and_is_not_sent(client: ollama.Client) -> None:
    # raw: the prompt as written, no template (so the model continues the list).
    r = client.generate(
        model="demo",
        prompt="1, 2, 3, 4,",
        raw=True,
        options={"temperature": 0, "num_predict": 30, "stop": [" 7"]},
    )
    assert r.response and " 7" not in r.response
    assert r.done_reason == "stop"
    assert r.eval_count is not None and r.eval_count < 30


def test_seed_makes_sampling_repeatable(client: ollama.Client) -> None:
    def sample() -> str | None:
        r = client.chat(
            model="demo",
            messages=[{"role": "user", "content": "Write a short poem about tea."}],
            options={"temperature": 1.0, "seed": 1234, "num_predict": 24},
        )
        return r.message.content

    assert sample() == sample()


def test_format_json(client: ollama.Client) -> None:
    r = client.chat(
        model="demo",
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        format="json",
        options={"temperature": 0, "num_predict": 60},
    )
    content = r.message.content or ""
    if r.done_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by num_predict: still a prefix of an object
        assert content.lstrip().startswith("{")


class Capital(BaseModel):
    country: str
    capital: str
    population_millions: float


def test_format_json_schema(client: ollama.Client) -> None:
    schema = Capital.model_json_schema()
    r = client.chat(
        model="demo",
        messages=[{"role": "user", "content": "Tell me about France as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 80},
    )
    assert r.done_reason == "stop"
    validate(json.loads(r.message.content or ""), schema)
    Capital.model_validate_json(r.message.content or "")


# -- embeddings and the model routes -------------------------------------------


def cosine(a: Any, b: Any) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def test_embed_and_embeddings(client: ollama.Client) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    r = client.embed(model="demo", input=texts)
    assert r.model == "demo"
    assert len(r.embeddings) == 2 and all(len(v) == 576 for v in r.embeddings)
    # /api/embed's vectors are unit length, as Ollama's are.
    for v in r.embeddings:
        assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4)
    assert r.prompt_eval_count is not None and r.prompt_eval_count > 0
    one = client.embed(model="demo", input=texts[0])
    assert len(one.embeddings) == 1
    assert cosine(one.embeddings[0], r.embeddings[0]) >= 0.999
    # The old route: one vector for one prompt, the same direction.
    old = client.embeddings(model="demo", prompt=texts[0])
    assert len(old.embedding) == 576
    assert cosine(old.embedding, r.embeddings[0]) >= 0.999


def test_list_show_ps_version(client: ollama.Client, demo: Twistd) -> None:
    listed = client.list()
    names = [m.model for m in listed.models]
    assert len(names) == 1 and names[0] is not None
    assert names[0] == "demo" or names[0].startswith("demo:"), names
    shown = client.show("demo")
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.capabilities and "completion" in shown.capabilities
    assert shown.modelinfo
    # No prompt: Ollama's load request, answered once the model is in.
    loaded = client.generate(model="demo")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    ps = client.ps()
    assert [m.model for m in ps.models] == names
    assert ps.models[0].size_vram is not None
    # keep_alive 0 and no messages: unload it.
    unloaded = client.chat(model="demo", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    deadline = time.monotonic() + 30
    while client.ps().models:
        assert time.monotonic() < deadline, client.ps()
        time.sleep(0.1)
    # The library has no call for /api/version; its shape is Ollama's.
    version = httpx.get(demo.url + "/api/version").json()
    assert isinstance(version["version"], str) and version["version"]


# -- errors --------------------------------------------------------------------


def test_unknown_model_is_a_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=ASK)
    assert e.value.status_code == 404
    assert "no-such-model" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.generate(model="no-such-model", prompt="hi", stream=True))
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.show("no-such-model")
    assert e.value.status_code == 404


def test_bad_request_is_a_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="demo", messages=[{"role": "robot", "content": "Hi"}])
    assert e.value.status_code == 400
    assert "robot" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat(model="demo", messages=ASK, options={"temperature": -1}, stream=True))
    assert e.value.status_code == 400


# -- tools and thinking on the scripted engine ---------------------------------


def get_weather(city: str, unit: str) -> str:
    """
    Get the current weather in a city.

    Args:
      city: The city's name
      unit: celsius or fahrenheit

    Returns:
      str: The weather
    """
    return TOOL_RESULT


def test_tool_call_arrives_as_a_dict_and_the_loop_completes(scripted: Twistd) -> None:
    client = ollama.Client(host=scripted.url, timeout=60)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    # A Python function: the library writes its schema from the docstring.
    first = client.chat(model="scripted", messages=ask, tools=[get_weather], think=True)
    calls = first.message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == CALL_ARGS  # a dict, not a JSON string
    assert first.message.content == ""
    assert first.message.thinking == " thinking" * THINK
    assert first.done_reason == "stop"
    # Streamed: the call comes whole, in a chunk of its own.
    chunks = list(client.chat(model="scripted", messages=ask, tools=[WEATHER_TOOL], stream=True))
    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    (call,) = with_calls[0].message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == CALL_ARGS
    assert "".join(c.message.content or "" for c in chunks) == ""
    # The library's own message goes back with the tool's result.
    result = get_weather(**call.function.arguments)
    final = client.chat(
        model="scripted",
        messages=[
            *ask,
            first.message,
            {"role": "tool", "content": result, "tool_name": "get_weather"},
        ],
        tools=[get_weather],
        think=False,
    )
    assert final.message.content == FINAL and not final.message.tool_calls
    assert not final.message.thinking


def test_think_true_false_and_default(scripted: Twistd) -> None:
    client = ollama.Client(host=scripted.url, timeout=60)
    ask = [{"role": "user", "content": "Say hello."}]
    words = len(REPLY.split(" "))
    on = client.chat(model="scripted", messages=ask, think=True)
    assert on.message.thinking == " thinking" * THINK and on.message.content == REPLY
    assert on.eval_count == words + THINK_TOKENS
    off = client.chat(model="scripted", messages=ask, think=False)
    assert not off.message.thinking and off.message.content == REPLY
    default = client.chat(model="scripted", messages=ask)
    assert default.message.thinking == on.message.thinking
    # Streamed: reasoning in message.thinking with empty content, then the text.
    chunks = list(client.chat(model="scripted", messages=ask, think=True, stream=True))
    assert "".join(c.message.thinking or "" for c in chunks) == " thinking" * THINK
    assert "".join(c.message.content or "" for c in chunks) == REPLY
    assert all(not (c.message.thinking and c.message.content) for c in chunks)
    assert chunks[-1].eval_count == words + THINK_TOKENS
    # /api/generate: thinking beside the response.
    gen = client.generate(model="scripted", prompt="Say hello.", think=True)
    assert gen.thinking == " thinking" * THINK and gen.response == REPLY
    streamed = list(
        client.generate(model="scripted", prompt="Say hello.", think=False, stream=True)
    )
    assert "".join(c.response or "" for c in streamed) == REPLY
    assert not any(c.thinking for c in streamed)


# -- LangChain -----------------------------------------------------------------


def test_langchain_chat_ollama(demo: Twistd) -> None:
    from langchain_ollama import ChatOllama

    demo.wait_idle()
    # validate_model_on_init: LangChain looks the name up in /api/tags first.
    llm = ChatOllama(
        base_url=demo.url, model="demo", temperature=0, num_predict=16,
        validate_model_on_init=True,
    )  # fmt: skip
    reply = llm.invoke("What is the capital of France?")
    assert isinstance(reply.content, str) and reply.content
    usage = reply.usage_metadata
    assert usage is not None and 0 < usage["output_tokens"] <= 16 and usage["input_tokens"] > 0
    streamed = "".join(str(chunk.content) for chunk in llm.stream("What is the capital of France?"))
    assert streamed == reply.content


def test_langchain_bind_tools_and_reasoning(scripted: Twistd) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(base_url=scripted.url, model="scripted", reasoning=True)
    reply = llm.bind_tools([WEATHER_TOOL]).invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", CALL_ARGS)]
    assert reply.additional_kwargs["reasoning_content"] == " thinking" * THINK
    plain = llm.invoke("Say hello.")
    assert plain.content == REPLY
