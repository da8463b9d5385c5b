"""
The API from a page on another origin, in headless Chromium: what
C{--cors} promises a web app that calls ds4tw with the headers the
OpenAI and Anthropic JS SDKs send (their own C{x-stainless-*} and
C{anthropic-dangerous-direct-browser-access}, the key, ds4tw's progress
opt-in). The browser's own preflight decides; a page from an origin not
in C{--cors} is refused by the same browser.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver import Chrome as WebDriver

from tests.integration.conftest import Twistd, start_twistd, stop_twistd

KEY = "sesame-for-the-cors-test"

#: Headers as the JS SDKs send them (a subset: each one not CORS-safelisted).
OPENAI_SDK = {
    "Authorization": f"Bearer {KEY}",
    "Content-Type": "application/json",
    "X-Stainless-Lang": "js",
    "X-Stainless-OS": "Linux",
    "X-Stainless-Retry-Count": "0",
    "X-Stainless-Timeout": "600",
    "X-DS4TW-Progress": "1",
}
ANTHROPIC_SDK = {
    "x-api-key": KEY,
    "anthropic-version": "2023-06-01",
    "anthropic-dangerous-direct-browser-access": "true",
    "anthropic-beta": "fine-grained-tool-streaming-2025-05-14",
    "content-type": "application/json",
    "X-Stainless-Package-Version": "0.60.0",
}

_FETCH = """
const [url, headers, body, done] = arguments;
fetch(url, {method: "POST", headers, body: JSON.stringify(body)})
  .then(async (r) => done({
    status: r.status,
    requestId: r.headers.get("x-request-id"),
    text: await r.text(),
  }))
  .catch((e) => done({error: String(e)}));
"""


class _Blank(http.server.BaseHTTPRequestHandler):
    """An empty page, no CSP: a stand-in for someone's web app."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>an app</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    """Two web apps' origins: the first is allowed by --cors, the second is not."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blank) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        allowed, other = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
        yield allowed, other
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, origins: tuple[str, str]) -> Iterator[Twistd]:
    server = start_twistd(
        tmp_path_factory.mktemp("cors"),
        "--model",
        "scripted:tps=200,reply=Hello from ds4tw.",
        "--api-key",
        KEY,
        "--cors",
        origins[0],
    )
    yield server
    stop_twistd(server)


def call(browser: WebDriver, page: str, url: str, headers: dict[str, str], body: Any) -> Any:
    browser.get(page + "/")
    return browser.execute_async_script(_FETCH, url, headers, body)


def test_an_allowed_origin_streams_with_the_openai_sdks_headers(
    api: Twistd, origins: tuple[str, str], browser: WebDriver
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    got = call(browser, origins[0], api.url + "/v1/chat/completions", OPENAI_SDK, body)
    assert got.get("status") == 200, got
    chunks = [json.loads(line[6:]) for line in got["text"].splitlines() if line[:7] == "data: {"]
    said = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert said == "Hello from ds4tw."
    assert got["text"].rstrip().endswith("data: [DONE]")
    # The progress opt-in crossed the preflight: the numbered comment came back.
    assert ": prefill " in got["text"] or ": decode" in got["text"], got["text"][:300]
    # The script can read the request id (exposed), as the SDKs do for their errors.
    assert got["requestId"]


def test_an_allowed_origin_calls_messages_with_the_anthropic_sdks_headers(
    api: Twistd, origins: tuple[str, str], browser: WebDriver
) -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "hi"}],
    }
    got = call(browser, origins[0], api.url + "/v1/messages", ANTHROPIC_SDK, body)
    assert got.get("status") == 200, got
    message = json.loads(got["text"])
    assert message["type"] == "message"
    assert message["content"][0]["text"] == "Hello from ds4tw."
    assert got["requestId"]


def test_another_origin_is_refused_by_the_browser(
    api: Twistd, origins: tuple[str, str], browser: WebDriver
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    got = call(browser, origins[1], api.url + "/v1/chat/completions", OPENAI_SDK, body)
    assert got == {"error": "TypeError: Failed to fetch"}
