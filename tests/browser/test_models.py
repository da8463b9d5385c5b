"""
The chat page's model picker, in headless Chromium, against a ds4tw
server with two scripted chat models loaded on demand (fleet_app.py:
C{big}, with aliases, and C{small}, each answering with its own name,
each load taking a couple of seconds), and against a single-model server
(mounted_app.py, ds4tw under C{/llm/}).

What the page shows is read from the DOM; every status text it showed is
recorded in the page (conftest's ChatPage), so a loading report that
lasted a second is not missed between two polls.

Caveat: the picker is driven with the keyboard through Chromium's
customizable select (C{appearance: base-select}, which chat.css asks for
where the browser has it); a browser with only the native select takes
the same keys, but this does not run one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from .conftest import ChatPage, run_app, screenshot

LOADING = re.compile(r"^loading the model (\d+)%$")

#: Every chat request's body the page sends, recorded in the page. The
#: page's streamChat reads globalThis.fetch when it is called, so a
#: wrapper put in after the page loaded sees every request.
_RECORD = """
window.__sent = [];
const real = window.fetch;
window.fetch = (url, init) => {
  if (String(url).endsWith("v1/chat/completions")) window.__sent.push(JSON.parse(init.body));
  return real(url, init);
};
"""


@pytest.fixture(scope="module")
def fleet() -> Iterator[str]:
    with run_app("fleet_app.py", "/health") as base:
        yield base


def options(driver: WebDriver) -> list[list[str]]:
    script = "return [...document.querySelectorAll('#model-select option')]"
    return driver.execute_script(script + ".map((o) => [o.value, o.textContent])")  # type: ignore[no-any-return]


def picker_open(driver: WebDriver) -> bool:
    return bool(
        driver.execute_script("return document.getElementById('model-select').matches(':open')")
    )


def sent(driver: WebDriver) -> list[dict[str, Any]]:
    return list(driver.execute_script("return window.__sent"))


def open_fresh(driver: WebDriver, url: str) -> ChatPage:
    """The page as a first visit sees it: nothing remembered."""
    driver.get(url)
    driver.execute_script("localStorage.clear()")
    page = ChatPage(driver, url).open()
    driver.execute_script(_RECORD)
    return page


def test_pick_the_second_model_see_its_reply_and_keep_the_choice(
    fleet: str, browser: WebDriver
) -> None:
    page = open_fresh(browser, fleet + "/")
    select = browser.find_element(By.ID, "model-select")
    page.wait(lambda: len(options(browser)) == 2, timeout=10)
    # The chat models, by name, neither loaded yet; the exact alias
    # gpt-big is another name of big, not a third choice.
    assert options(browser) == [
        ["big", "big · loads on first use"],
        ["small", "small · loads on first use"],
    ]
    assert select.is_displayed() and not browser.find_element(By.ID, "model").is_displayed()
    assert select.accessible_name == "Model"
    assert select.get_attribute("value") == "big"  # the server's first, nothing remembered

    # By keyboard: focus, Enter opens the list, ArrowDown, Enter picks.
    browser.execute_script("document.getElementById('model-select').focus()")
    select.send_keys(Keys.ENTER)
    page.wait(lambda: picker_open(browser), timeout=5)
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    page.wait(lambda: browser.switch_to.active_element.get_attribute("value") == "small", 5)
    shot = screenshot(browser, "model-picker")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    page.wait(lambda: not picker_open(browser), timeout=5)
    assert select.get_attribute("value") == "small"
    assert browser.execute_script("return localStorage.getItem('ds4tw.model:/')") == "small"

    page.type_and_send("Who are you?")
    page.wait(lambda: LOADING.match(page.last().get("label", "")) is not None, timeout=10)
    screenshot(browser, "model-loading")
    # The picker, listed again as the turn waits, says so too.
    page.wait(lambda: ["small", "small · loading now"] in options(browser), timeout=5)
    done = page.wait_stage("done", "error", "cancelled", timeout=30)
    assert done["stage"] == "done", done
    assert done["content"].strip() == "Reply from small."
    assert sent(browser)[0]["model"] == "small"
    # It waited for the load, and said how far it was.
    percents = [int(m[1]) for m in map(LOADING.match, page.labels()) if m]
    assert percents and percents == sorted(percents) and percents[-1] <= 100, page.labels()
    assert done["timeline"][0] == "loading", done
    # Under the answer, which model wrote it (the server has several).
    stats = browser.find_element(By.CSS_SELECTOR, "article.assistant .stats").text
    assert stats.split(" · ")[0] == "small", stats
    # Listed again after the reply: small is loaded now, big still is not.
    page.wait(lambda: ["small", "small · loaded"] in options(browser), timeout=10)
    assert ["big", "big · loads on first use"] in options(browser)
    screenshot(browser, "model-reply")

    # A reload keeps the choice, and the turn goes to the same model, loaded.
    page.open(clear_key=False)
    browser.execute_script(_RECORD)
    page.wait(lambda: len(options(browser)) == 2, timeout=10)
    assert browser.find_element(By.ID, "model-select").get_attribute("value") == "small"
    assert ["small", "small · loaded"] in options(browser)
    page.type_and_send("And again?")
    done = page.wait_stage("done", "error", "cancelled", timeout=30)
    assert done["content"].strip() == "Reply from small.", done
    assert [body["model"] for body in sent(browser)] == ["small"]
    assert not any(LOADING.match(label) for label in page.labels()), page.labels()
    assert shot.stat().st_size > 10_000
    assert page.problems() == []


def test_the_list_is_asked_again_when_the_picker_is_focused(fleet: str, browser: WebDriver) -> None:
    page = open_fresh(browser, fleet + "/")
    page.wait(lambda: len(options(browser)) == 2, timeout=10)
    before = len(_models_requests(browser))
    browser.execute_script("document.getElementById('model-select').focus()")
    page.wait(lambda: len(_models_requests(browser)) > before, timeout=5)
    assert page.problems() == []


def _models_requests(driver: WebDriver) -> list[str]:
    script = "return performance.getEntriesByType('resource').map((e) => e.name)"
    return [u for u in driver.execute_script(script) if u.endswith("/v1/models")]


def test_one_model_no_picker_but_its_name_is_sent(mounted: str, browser: WebDriver) -> None:
    page = open_fresh(browser, mounted + "/llm/")
    page.wait(lambda: browser.find_element(By.ID, "model").text == "scripted", timeout=10)
    assert not browser.find_element(By.ID, "model-picker").is_displayed()
    page.type_and_send("hi")
    done = page.wait_stage("done", "error")
    assert done["stage"] == "done", done
    assert [body["model"] for body in sent(browser)] == ["scripted"]
    # Nothing to choose, nothing remembered.
    assert json.loads(browser.execute_script("return JSON.stringify(localStorage)")) == {}
    assert page.problems() == []
