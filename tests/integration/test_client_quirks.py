"""
The small things a client trips on, against a real `twistd -n ds4tw` on
the scripted engine (the server's own HTTP stack; no model needed): a base
URL that ends in a slash.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from .conftest import Twistd, start_twistd, stop_twistd

REPLY = "Hello from the scripted engine, friend."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    server = start_twistd(
        tmp_path_factory.mktemp("quirks"), "--model", f"scripted:tps=0,reply={REPLY}"
    )
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


# -- a base URL that ends in a slash ---------------------------------------------


def test_the_openai_sdk_with_a_base_url_ending_in_a_slash(server: Twistd) -> None:
    """
    The SDK itself joins C{/v1/} and C{/chat/completions} with one slash
    (this passes without the server's collapsing too); it pins that such a
    base URL keeps working, streaming and not.
    """
    client = openai.OpenAI(base_url=server.url + "/v1/", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["scripted"]
    stream = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == REPLY


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/completions"), ("POST", "/messages"), ("GET", "/models")],
)
def test_a_client_that_joins_base_url_and_path_as_strings(
    server: Twistd, method: str, path: str
) -> None:
    """
    C{base + "/chat/completions"} with C{base} ending in a slash asks for
    C{/v1//chat/completions}: served as the path it means, the body
    intact, with no redirect (a 500 before).
    """
    base = server.url + "/v1/"
    payload = {"model": "any", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.request(method, base + path, json=payload if method == "POST" else None)
    assert r.status_code == 200, r.text
    assert not r.history  # not redirected
    if path == "/chat/completions":
        assert r.json()["choices"][0]["message"]["content"] == REPLY
    elif path == "/messages":
        assert r.json()["content"][0]["text"] == REPLY
    else:
        assert r.json()["data"][0]["id"] == "scripted"
    page = httpx.get(server.url + "/ui//app.js")
    assert page.status_code == 200 and "javascript" in page.headers["content-type"]
