"""
The chat page end to end, in headless Chromium, against real servers:
twistd -n ds4tw on the demo model (one slot, so a second request waits),
twistd -n ds4tw on the scripted engine behind --api-key (deterministic
output: HTML the model "writes", reasoning), and a host Klein app with
ds4tw mounted under /llm/.

What the page shows is read from the DOM; every status text it showed is
recorded in the page by a MutationObserver, so a stage that lasted a
moment is not missed between two polls.

Caveat: the demo model's speed on a shared 2-core machine varies; the
prompts are long enough that prefill lasts more than the one-second
progress interval on an idle machine, and the waits are generous.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.common.by import By

from tests.integration.conftest import Twistd, start_twistd, stop_twistd, unique_words

from .conftest import ChatPage, screenshot

KEY = "sesame-for-the-browser-test"
#: What the scripted model "writes": HTML that must stay text, and Markdown.
REPLY = (
    "Here you are: <script>window.__pwned = 1</script> and "
    '<img src=x onerror="window.__pwned = 2"> in **bold**.'
)
PREFILL = re.compile(r"^prefill (\d+)/(\d+) \(\d+%\)$")


def _stop(server: Twistd) -> None:
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    # One slot: a second request waits in the queue. Steps of 64 tokens:
    # a long prompt's prefill reports progress in small steps. One thread:
    # Chromium and pytest need the other core, and two model threads on a
    # busy machine measured 3x slower than one (they wait for each other).
    server = start_twistd(
        tmp_path_factory.mktemp("demo"), "--parallel", "1", "--batch", "64", "--threads", "1"
    )
    yield server
    _stop(server)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    spec = f"scripted:tps=40,think=4,reply={REPLY}"
    server = start_twistd(tmp_path_factory.mktemp("scripted"), "--model", spec, "--api-key", KEY)
    yield server
    _stop(server)


def long_prompt(seed: int) -> str:
    # ~1,500 tokens of words the server has not seen (no cached prefix):
    # seconds of prefill on one thread (7 s measured on a busy machine),
    # so a progress report falls inside.
    return unique_words(1500, seed) + "\n\nWhich word above comes first?"


def first(labels: list[str], match: str | Callable[[str], bool]) -> int:
    """The index of the first label that is C{match} (or satisfies it)."""
    for i, label in enumerate(labels):
        if match(label) if callable(match) else label == match:
            return i
    raise AssertionError(f"no {match!r} in {labels}")


def test_a_prompt_streams_into_the_page(demo: Twistd, browser: WebDriver) -> None:
    page = ChatPage(browser, demo.url + "/").open()
    # Greedy: the same answer each run (docs/img/chat.png is this test's chat.png).
    page.settings(max_tokens=160, temperature=0)
    page.type_and_send("Write a Python function that reverses a string.")
    page.wait(lambda: page.last().get("stage") == "writing" and len(page.last()["content"]) > 20)
    mid = page.last()
    shot = screenshot(browser, "mid-stream")
    done = page.wait_stage("done", "error", "cancelled")
    assert done["stage"] == "done", done
    # It grew while we watched: streamed, not delivered at the end.
    assert len(done["content"]) > len(mid["content"])
    labels = page.labels()
    assert first(labels, lambda s: s.startswith("prefill")) < first(labels, "writing")
    assert labels[-1] == "done"
    # An idle server: no wait worth a mention, then the prefill and the text.
    assert done["timeline"][0] == "prefill" and "writing" in done["timeline"]
    # The user's turn and the answer stay on the page, ready for the next turn.
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.msg")) == 2
    assert browser.find_element(By.ID, "send").is_enabled()
    assert not browser.find_element(By.ID, "stop").is_displayed()
    screenshot(browser, "chat")
    assert shot.stat().st_size > 10_000
    assert page.problems() == []


def test_queued_then_prefilling_then_text(demo: Twistd, browser: WebDriver) -> None:
    """With one slot taken, the page says it waits, then shows the prefill's progress."""
    streaming, release = threading.Event(), threading.Event()

    def blocker() -> None:
        payload = {
            "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 3000,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream(
            "POST", demo.url + "/v1/chat/completions", json=payload, timeout=120
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    streaming.set()
                if release.is_set():
                    break  # hang up: the server frees the slot at once

    thread = threading.Thread(target=blocker, daemon=True)
    thread.start()
    try:
        assert streaming.wait(60), "the blocking request never started"
        page = ChatPage(browser, demo.url + "/").open()
        page.settings(max_tokens=16, temperature=0)
        page.paste_and_send(long_prompt(seed=1))
        # Held until the page counts the wait as one (its timeline leaves out
        # waits under 100 ms): the slot is freed at once on release, and the
        # prefill is announced as soon as the request holds it.
        page.wait(
            lambda: (
                page.last().get("label") == "queued: 1st in line"
                and "queued" in (page.last().get("timeline") or [])
            )
        )
        screenshot(browser, "queued")
    finally:
        release.set()
        thread.join(30)

    def progressing() -> bool:
        m = PREFILL.match(page.last().get("label", ""))
        return m is not None and 0 < int(m[1]) < int(m[2])

    page.wait(lambda: progressing() or page.last().get("stage") not in ("queued", "prefill"))
    screenshot(browser, "prefill")
    done = page.wait_stage("done", "error", "cancelled", timeout=120)
    screenshot(browser, "queued-prefill-done")
    assert done["stage"] == "done", done
    assert done["content"].strip(), "no text arrived"
    labels = page.labels()
    queued = first(labels, "queued: 1st in line")
    prefills = [(i, PREFILL.match(s)) for i, s in enumerate(labels) if PREFILL.match(s)]
    # Progress, not just the stage: a count between none and all of the prompt.
    progress = [i for i, m in prefills if m and 0 < int(m[1]) < int(m[2])]
    assert progress, labels
    assert queued < progress[0] < first(labels, "writing"), labels
    assert done["timeline"][:2] == ["queued", "prefill"]
    assert page.problems() == []


def test_stop_during_prefill_cancels_on_the_server(demo: Twistd, browser: WebDriver) -> None:
    demo.wait_idle()
    before = demo.metric("ds4tw_cancelled_jobs_total", stage="prefill")
    page = ChatPage(browser, demo.url + "/").open()
    page.paste_and_send(long_prompt(seed=2))
    page.wait(lambda: page.last().get("stage") == "prefill")
    page.stop()
    stopped = page.wait_stage("stopped", timeout=10)
    assert stopped["label"] == "stopped during prefill"
    deadline = time.monotonic() + 10
    while demo.metric("ds4tw_cancelled_jobs_total", stage="prefill") < before + 1:
        assert time.monotonic() < deadline, "the server did not count the cancel"
        time.sleep(0.05)
    demo.wait_idle(timeout=10)
    assert "cancelled at prefill (client disconnected)" in demo.log_text()
    assert browser.find_element(By.ID, "send").is_enabled()
    assert page.problems() == []


def test_api_key_is_asked_for_and_kept_in_the_session_only(
    scripted: Twistd, browser: WebDriver
) -> None:
    page = ChatPage(browser, scripted.url + "/").open()

    def dialog_open() -> bool:
        return bool(browser.execute_script("return document.getElementById('key-dialog').open"))

    page.type_and_send("hello")
    page.wait(dialog_open, timeout=10)
    assert not browser.find_element(By.ID, "key-error").is_displayed()
    browser.find_element(By.ID, "api-key").send_keys("wrong key\n")
    # Asked again, saying the first was refused.
    page.wait(lambda: dialog_open() and browser.find_element(By.ID, "key-error").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(KEY + "\n")
    done = page.wait_stage("done", "error")
    assert done["stage"] == "done", done
    stored = browser.execute_script(
        "return [sessionStorage.getItem('ds4tw.apiKey'), localStorage.length, document.cookie]"
    )
    assert stored == [KEY, 0, ""]
    # A reload in the same tab keeps it: no second prompt.
    page.open(clear_key=False)
    page.type_and_send("again")
    assert page.wait_stage("done", "error")["stage"] == "done"
    assert not dialog_open()
    assert page.problems() == []


def test_html_the_model_writes_is_shown_as_text(scripted: Twistd, browser: WebDriver) -> None:
    page = ChatPage(browser, scripted.url + "/").open()
    browser.execute_script("sessionStorage.setItem('ds4tw.apiKey', arguments[0])", KEY)
    page.type_and_send("Show me some HTML.")
    done = page.wait_stage("done", "error")
    assert done["stage"] == "done", done
    assert "<script>window.__pwned = 1</script>" in done["content"]
    assert '<img src=x onerror="window.__pwned = 2">' in done["content"]
    assert "<strong>bold</strong>" in done["html"]  # Markdown still renders
    assert (
        browser.execute_script(
            "return document.querySelectorAll('.content script, .content img, [onerror]').length"
        )
        == 0
    )
    assert browser.execute_script("return window.__pwned") is None
    # The scripted reasoning arrived as reasoning_content: shown folded.
    folded = browser.execute_script(
        "const d = document.querySelector('article.assistant details.reasoning');"
        "return d && [d.open, d.textContent]"
    )
    assert folded is not None and folded[0] is False and "thinking" in folded[1]
    assert "thinking" in done["timeline"] and "writing" in done["timeline"]
    screenshot(browser, "html-as-text")
    assert page.problems() == []


def test_mounted_under_a_klein_branch_route(mounted: str, browser: WebDriver) -> None:
    page = ChatPage(browser, mounted + "/llm").open()  # no slash: redirected to /llm/
    assert browser.current_url == mounted + "/llm/"
    page.type_and_send("hi")
    done = page.wait_stage("done", "error")
    assert done["stage"] == "done", done
    assert done["content"].strip() == "Hello from under /llm/."
    assert "<strong>under /llm/</strong>" in done["html"]
    page.type_and_send("and again")  # a second turn, the first one in its messages
    page.wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "article.msg")) == 4)
    assert page.wait_stage("done", "error")["stage"] == "done"
    # Every request the page made stayed under the mount point.
    urls = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    assert any(u.endswith("/llm/v1/chat/completions") for u in urls), urls
    assert all(u.startswith(mounted + "/llm/") for u in urls), urls
    assert page.problems() == []
