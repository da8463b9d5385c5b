"""
The page's own logic, unit-tested in Chromium: tests/browser/js/index.html
imports the page's modules (sse.js, stage.js, markdown.js, chat.js,
models.js) and runs the assertions in tests/browser/js/test_*.js; this
reads the results.
The test page is served with the chat page's own security headers, so the
modules run under its Content-Security-Policy and Trusted Types.

Caveat: a scripted fetch stands in for the server in test_chat.js and
test_models.js; the real servers are in test_page.py and test_models.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import console_problems

SUITES = ["sse", "stage", "markdown", "chat", "models"]


@pytest.fixture(scope="module")
def results(browser: WebDriver, js_test_server: str) -> list[dict[str, Any]]:
    browser.get(js_test_server + "/test/index.html")
    got: list[dict[str, Any]] = WebDriverWait(browser, 30, poll_frequency=0.05).until(
        lambda d: d.execute_script("return window.__results")
    )
    problems = console_problems(browser)
    assert problems == [], problems
    return got


@pytest.mark.parametrize("suite", SUITES)
def test_suite_passes_in_the_browser(results: list[dict[str, Any]], suite: str) -> None:
    mine = [r for r in results if r["suite"] == suite]
    assert len(mine) >= 5, f"{suite}: only {len(mine)} tests ran"
    failed = [f"{r['name']}: {r['error']}" for r in mine if not r["ok"]]
    assert failed == [], "\n".join(failed)


def test_every_suite_is_reported(results: list[dict[str, Any]]) -> None:
    assert {r["suite"] for r in results} == set(SUITES)
