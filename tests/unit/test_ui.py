"""
The chat page as HTTP serves it (ds4tw/_server/ui): routes, content types,
headers, caching, --no-ui, mounting, and the package data that ships it.

Caveat: no browser here; tests/browser runs the page in Chromium (its CSP
actually enforced, its scripts actually running).
"""

from __future__ import annotations

import configparser
import glob
import re
from pathlib import Path

import pytest
from klein import Klein
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from ds4tw._server.ui import CONTENT_SECURITY_POLICY, load_assets
from ds4tw.testing import HTTPHarness

from .conftest import make_rig

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "ds4tw" / "_server" / "ui" / "page"


def test_root_serves_the_page_with_strict_headers() -> None:
    rig = make_rig()
    page = rig.http.get("/")
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    assert b'<script type="module" src="ui/app.js"></script>' in page.body
    csp = page.header("content-security-policy") or ""
    assert csp == CONTENT_SECURITY_POLICY
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no other origin
    assert "unsafe" not in csp
    assert page.header("x-content-type-options") == "nosniff"
    assert page.header("cache-control") == "no-cache"


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/sse.js", "text/javascript; charset=utf-8"),
        ("/ui/chat.css", "text/css; charset=utf-8"),
        ("/ui/icon.svg", "image/svg+xml"),
        ("/ui/vendor/marked.esm.js", "text/javascript; charset=utf-8"),
        ("/ui/vendor/purify.es.mjs", "text/javascript; charset=utf-8"),
    ],
)
def test_assets_have_their_content_types(path: str, content_type: str) -> None:
    rig = make_rig()
    asset = rig.http.get(path)
    assert asset.status == 200
    assert asset.header("content-type") == content_type
    assert asset.header("x-content-type-options") == "nosniff"
    assert asset.body == (PAGE / path.removeprefix("/ui/")).read_bytes()


def test_a_revalidation_is_a_304_until_the_file_changes() -> None:
    rig = make_rig()
    first = rig.http.get("/ui/app.js")
    etag = first.header("etag")
    assert etag and etag.startswith('"')
    again = rig.http.get("/ui/app.js", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    other = rig.http.get("/ui/app.js", headers={"If-None-Match": '"something-else"'})
    assert other.status == 200 and other.body == first.body


@pytest.mark.parametrize(
    "path",
    [
        "/ui/nope.js",
        "/ui/vendor/marked.LICENSE",  # shipped, not served
        "/ui/vendor/VERSIONS",
        "/ui/../__init__.py",
        "/ui/%2e%2e/__init__.py",
        "/ui/..%2f__init__.py",
        "/ui/",
    ],
)
def test_only_the_page_files_are_served(path: str) -> None:
    rig = make_rig()
    miss = rig.http.get(path)
    assert miss.status == 404
    assert miss.json()["error"]["code"] == "not_found"


def test_head_answers_without_a_body() -> None:
    rig = make_rig()
    head = rig.http.request("HEAD", "/")
    assert head.status == 200
    assert head.header("content-type") == "text/html; charset=utf-8"
    assert head.body == b""


def test_no_ui_is_the_json_404_of_before() -> None:
    rig = make_rig(ui=False)
    for path in ("/", "/ui/app.js"):
        miss = rig.http.get(path)
        assert miss.status == 404
        assert miss.json()["error"]["code"] == "not_found"


def test_the_page_adds_no_cors_header() -> None:
    rig = make_rig(cors_origins=("https://allowed.example",))
    for origin in ("https://allowed.example", "https://other.example"):
        page = rig.http.get("/", headers={"Origin": origin})
        assert page.status == 200
        assert page.header("access-control-allow-origin") is None
    # The API keeps its own CORS, unchanged.
    api = rig.http.get("/v1/models", headers={"Origin": "https://allowed.example"})
    assert api.header("access-control-allow-origin") == "https://allowed.example"


def test_the_page_needs_no_key_but_the_api_does() -> None:
    rig = make_rig(api_key="sesame")
    assert rig.http.get("/").status == 200
    assert rig.http.get("/ui/app.js").status == 200
    # The 401 the page answers with its key prompt.
    assert rig.stream().status == 401


def test_every_url_in_the_page_is_relative() -> None:
    """Absolute URLs would escape the mount point (and could leave the machine)."""
    html = (PAGE / "index.html").read_text()
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert not url.startswith(("/", "http:", "https:", "//")), url
    for name in ("app.js", "chat.js", "markdown.js", "sse.js", "stage.js"):
        code = (PAGE / name).read_text()
        for target in re.findall(r'(?:fetch\(|import .* from |_URL = )"([^"]+)"', code):
            assert not target.startswith(("/", "http:", "https:", "//")), (name, target)
        assert "http://" not in code and "https://" not in code, name


def test_mounted_under_twisted_web_the_bare_mount_point_redirects_relatively() -> None:
    rig = make_rig()
    root = Resource()
    root.putChild(b"llm", rig.server.resource())
    http = HTTPHarness(root, rig.clock)
    bare = http.get("/llm?x=1")
    assert bare.status == 308
    # Relative: the scheme and host the browser used (maybe a proxy's) stay.
    assert bare.header("location") == "llm/?x=1"
    page = http.get("/llm/")
    assert page.status == 200 and b'src="ui/app.js"' in page.body
    assert http.get("/llm/ui/app.js").status == 200


def test_mounted_under_a_klein_branch_route() -> None:
    rig = make_rig()
    host = Klein()

    @host.route("/llm/", branch=True)
    def mount(request: Request) -> IResource:
        return rig.server.resource()

    http = HTTPHarness(host.resource(), rig.clock)
    assert http.get("/llm").status in (301, 308)  # Klein's own redirect, before ds4tw
    page = http.get("/llm/")
    assert page.status == 200 and page.header("content-security-policy")
    assert http.get("/llm/ui/stage.js").status == 200


def test_the_package_data_ships_every_page_file() -> None:
    """A page file that setup.cfg's patterns miss would be absent from the wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = cfg["options.package_data"]["ds4tw._server.ui"].split()
    # setuptools expands the patterns as glob does: "*" stops at a "/".
    shipped = {f for p in patterns for f in glob.glob(p, root_dir=PAGE.parent)}
    files = {p.relative_to(PAGE.parent).as_posix() for p in PAGE.rglob("*") if p.is_file()}
    assert files and files - shipped == set()
    # And everything servable is found through importlib.resources.
    assert set(load_assets()) >= {"index.html", "app.js", "vendor/marked.esm.js"}
