"""
The chat page in a real headless browser: Debian's Chromium and
chromedriver (packages chromium and chromium-driver; scripts/test.sh
installs them), driven by Selenium, against real servers on loopback
ports: twistd -n ds4tw on the demo model and on the scripted engine (the
integration tests' helpers start them), a host Klein app with ds4tw
mounted under a branch route (mounted_app.py), and a server with two
models loaded on demand (fleet_app.py).

Screenshots go to _artifacts/browser/ (the path is printed at the end of
the run).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ds4tw._server.ui import SECURITY_HEADERS
from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
PAGE_DIR = ROOT / "ds4tw" / "_server" / "ui" / "page"
JS_TESTS = Path(__file__).resolve().parent / "js"
ARTIFACTS = ROOT / "_artifacts" / "browser"

_saved: list[Path] = []


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver", "/usr/lib/chromium/chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "tests/browser needs Debian's chromium and chromium-driver: "
            "apt-get install chromium chromium-driver (scripts/test.sh does, as root)"
        )
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container: the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1000,820",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
        # Nothing but the servers under test: no update checks, no sync.
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path given: Selenium Manager (which downloads drivers) never runs.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the window as _artifacts/browser/NAME.png (listed at the end of the run)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    _saved.append(path)
    return path


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _saved:
        terminalreporter.write_line(f"browser screenshots in {ARTIFACTS}:")
        for path in _saved:
            terminalreporter.write_line(f"  {path}")


def console_problems(driver: WebDriver) -> list[str]:
    """Browser console lines that mean the page broke: CSP refusals, uncaught errors."""
    bad = ("Content Security Policy", "Trusted Type", "Uncaught", "TypeError", "SyntaxError")
    return [e["message"] for e in driver.get_log("browser") if any(b in e["message"] for b in bad)]


# -- the page's JS modules, unit-tested in the browser -----------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """/ui/... from the package's page files, /test/... from tests/browser/js."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".html": "text/html",
    }

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0]
        if path.startswith("/ui/"):
            return str(PAGE_DIR / path.removeprefix("/ui/"))
        if path.startswith("/test/"):
            return str(JS_TESTS / path.removeprefix("/test/"))
        return str(JS_TESTS / "missing")

    def end_headers(self) -> None:
        # The page's own headers: its CSP and Trusted Types apply to the tests.
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name.decode(), value.decode())
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def js_test_server() -> Iterator[str]:
    handler = functools.partial(_Handler, directory=str(JS_TESTS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- servers the page runs against ------------------------------------------


@contextlib.contextmanager
def run_app(script: str, health: str) -> Iterator[str]:
    """
    C{python tests/browser/SCRIPT PORT} on a free loopback port, until its
    C{health} path answers 200; yields its base URL.
    """
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"{script} exited"
            try:
                if httpx.get(base + health, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{script} did not start"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mounted() -> Iterator[str]:
    """A host Klein app with ds4tw (one scripted model) under C{/llm/}."""
    with run_app("mounted_app.py", "/llm/health") as base:
        yield base


# -- driving the chat page -------------------------------------------------

_WATCH = """
window.__labels = [];
const status = document.getElementById("status");
const note = () => {
  const text = status.textContent;
  if (window.__labels[window.__labels.length - 1] !== text) window.__labels.push(text);
};
new MutationObserver(note).observe(status, {childList: true, characterData: true, subtree: true});
"""

_LAST = """
const a = [...document.querySelectorAll("article.msg.assistant")].pop();
if (!a) return null;
return {
  stage: a.dataset.stage,
  label: a.querySelector(".stage-text").textContent,
  content: a.querySelector(".content").textContent,
  html: a.querySelector(".content").innerHTML,
  timeline: [...a.querySelectorAll(".life li")].map((li) => li.dataset.stage),
};
"""


class ChatPage:
    """The chat page in the browser: send, watch the status line, read the last answer."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        self.url = url

    def open(self, *, clear_key: bool = True) -> ChatPage:
        self.driver.get(self.url)
        if clear_key:
            self.driver.execute_script("sessionStorage.clear()")
            self.driver.get(self.url)
        self.wait(lambda: self.driver.execute_script(
            "return document.getElementById('server').textContent !== ''"
        ))  # fmt: skip
        self.driver.get_log("browser")  # start each test with an empty console
        self.driver.execute_script(_WATCH)
        return self

    def settings(self, **values: Any) -> None:
        for name, value in values.items():
            self.driver.execute_script(
                "document.getElementById(arguments[0]).value = arguments[1]",
                name.replace("_", "-"),
                str(value),
            )

    def type_and_send(self, text: str) -> None:
        """As a person does: type, then Enter."""
        box = self.driver.find_element(By.ID, "prompt")
        box.send_keys(text)
        box.send_keys("\n")

    def paste_and_send(self, text: str) -> None:
        """A long prompt, set at once (typing thousands of words takes a while)."""
        self.driver.execute_script("document.getElementById('prompt').value = arguments[0]", text)
        self.driver.find_element(By.ID, "send").click()

    def stop(self) -> None:
        self.driver.find_element(By.ID, "stop").click()

    def last(self) -> dict[str, Any]:
        return self.driver.execute_script(_LAST) or {}

    def labels(self) -> list[str]:
        """Every text the status line showed since open(), in order."""
        return list(self.driver.execute_script("return window.__labels"))

    def wait(self, condition: Any, timeout: float = 60) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: condition())

    def wait_stage(self, *stages: str, timeout: float = 60) -> dict[str, Any]:
        self.wait(lambda: self.last().get("stage") in stages, timeout)
        return self.last()

    def problems(self) -> list[str]:
        return console_problems(self.driver)
