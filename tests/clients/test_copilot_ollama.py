"""
VS Code Copilot Chat's Ollama provider ("bring your own key"), call by
call, as its source makes them: it cannot run headless here (it is a VS
Code extension, driven through VS Code's UI), so the calls are rebuilt
from microsoft/vscode-copilot-chat at 31acd00a86424e2ee6e980e54919cf31fbf88030
(2026-03-29, package 0.42.0), src/extension/byok/vscode-node/ollamaProvider.ts
(last changed in 95f306473ac51fb8e4a5052f80c34fcae02475b1):

1. GET {url}/api/version (_checkOllamaVersion, :203): `version` compared
   part by part with parseInt against MINIMUM_OLLAMA_VERSION "0.6.4"
   (:34; _isVersionSupported :163; "0.0.0" passes as a dev build). A
   failure hides every model ("Unable to verify Ollama server version").
2. GET {url}/api/tags (getAllModels, :94): `models[].model`.
3. POST {url}/api/show {"model": MODEL}, Content-Type application/json
   (_fetchOllamaModelInformation, :188): `capabilities` must be a list
   (.includes("tools"), .includes("vision"); a model whose show fails is
   skipped, :100-107); the context window is
   model_info[model_info["general.architecture"] + ".context_length"]
   (default 32768), of which 4096 (half, below 4096) is kept for output
   and the rest is the prompt's budget (:145-150); the display name is
   model_info["general.basename"], else the model's name.
4. The chat goes to POST {url}/v1/chat/completions (createOpenAIEndPoint,
   :137), OpenAI's API, through OpenAIEndpoint
   (src/extension/byok/node/openAIEndpoint.ts): "Authorization: Bearer "
   with an empty key (no key is configured for Ollama, :140; getExtraHeaders
   :301-309), which fetch() sends as "Bearer"; no max_tokens (deleted,
   :290); stream_options include_usage when streaming (:291-293). Its SSE
   reader (src/platform/networking/node/stream.ts, processSSEInner) drops
   lines starting with ":" (comments, ds4tw's keepalives) and lines that
   are not JSON.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.integration.conftest import Twistd

from .conftest import CTX, REPLY

MINIMUM_OLLAMA_VERSION = "0.6.4"


def parse_int(part: str) -> int:
    """JavaScript's parseInt(part, 10) || 0: the leading digits, else 0."""
    digits = ""
    for ch in part.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


def version_supported(version: str) -> bool:
    """ollamaProvider.ts _isVersionSupported."""
    if version == "0.0.0":
        return True
    current = [parse_int(p) for p in version.split(".")]
    minimum = [parse_int(p) for p in MINIMUM_OLLAMA_VERSION.split(".")]
    for i in range(max(len(current), len(minimum))):
        c = current[i] if i < len(current) else 0
        m = minimum[i] if i < len(minimum) else 0
        if c != m:
            return c > m
    return True


def test_version_gate() -> None:
    assert version_supported("0.6.4") and version_supported("0.13.0")
    assert not version_supported("0.6.3") and not version_supported("0.5.12")


def model_info(server: Twistd) -> dict[str, dict[str, Any]]:
    """What the provider learns of each model before a chat (steps 1-3)."""
    version = httpx.get(server.url + "/api/version").json()["version"]
    assert version_supported(version), version
    tags = httpx.get(server.url + "/api/tags")
    assert tags.status_code == 200
    known = {}
    for model in tags.json()["models"]:
        show = httpx.post(
            server.url + "/api/show",
            content=json.dumps({"model": model["model"]}),
            headers={"Content-Type": "application/json"},
        )
        assert show.status_code == 200, show.text
        info = show.json()
        assert isinstance(info["capabilities"], list)
        arch = info["model_info"]["general.architecture"]
        window = info["model_info"].get(f"{arch}.context_length", 32768)
        output = window // 2 if window < 4096 else 4096
        known[model["model"]] = {
            "name": info["model_info"].get("general.basename", model["model"]),
            "context_window": window,
            "max_input_tokens": window - output,
            "max_output_tokens": output,
            "tool_calling": "tools" in info["capabilities"],
            "vision": "vision" in info["capabilities"],
        }
    return known


def test_the_model_list_and_its_limits(fast: Twistd) -> None:
    (info,) = model_info(fast).values()
    # The window Copilot budgets for is the one ds4tw serves, not a trained
    # length it would overrun (ds4tw reports n_ctx as context_length).
    assert info["context_window"] == CTX
    assert info["max_input_tokens"] + info["max_output_tokens"] == CTX
    # The scripted engine's template takes no tools: no agent mode offered.
    assert info["tool_calling"] is False and info["vision"] is False


def test_a_chat_as_the_provider_sends_it(fast: Twistd) -> None:
    (model,) = model_info(fast)
    body = {
        "messages": [
            {"role": "system", "content": "You are an AI programming assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        "model": model,
        "temperature": 0.1,
        "top_p": 1,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # "Bearer " + an empty key; fetch() strips a header value's trailing
    # whitespace (the Fetch standard's normalize), so "Bearer" is what is sent.
    headers = {"Content-Type": "application/json", "Authorization": "Bearer"}
    text, usage = "", None
    with httpx.stream(
        "POST", fast.url + "/v1/chat/completions", content=json.dumps(body), headers=headers
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line or line.startswith(":"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or ""
    assert text == REPLY
    assert usage is not None and usage["completion_tokens"] == len(REPLY.split())
