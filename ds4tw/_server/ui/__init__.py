"""
The chat page: C{GET /} and its files under C{GET /ui/...}, served from
the package (C{page/}, read with importlib.resources), for a person
trying the server in a browser. docs/ui.md says what it shows.

The page is static: plain JS modules, no build step, no external request;
it talks to the server it came from with relative URLs only
(C{v1/chat/completions}, C{v1/models} for its model picker, C{health}),
so it works wherever the server is mounted. Every response carries a
strict Content-Security-Policy (no inline script or style, nothing from
another origin, Trusted Types for the one HTML sink),
C{X-Content-Type-Options: nosniff}, and C{Cache-Control: no-cache} with an
ETag: a browser revalidates each time (a 304 is a few bytes) and never
runs an old page against a new server.
No CORS header is added: the page is same-origin, and C{--cors} stays
what it was. No auth either: the page holds no secret, and the API
behind it asks for the key (the page prompts on a 401).

Off with C{--no-ui} (L{ds4tw.ServerConfig.ui}): then C{/} is the JSON 404
it always was.

Covered by tests/unit/test_ui.py and, in a real browser, tests/browser/.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING

from twisted.web.http import CACHED
from werkzeug.exceptions import NotFound

if TYPE_CHECKING:
    from twisted.web.server import Request

    from ..._api.host import Host

#: Where the page's files are, inside this package.
PAGE_DIR = "page"

CONTENT_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

#: Nothing but this origin's own files; no inline script or style (so an
#: injected attribute or tag cannot run or restyle); innerHTML only with
#: DOMPurify's TrustedHTML; no plugins, no <base>, no form posts, framed
#: only by the same origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'self'",
        "require-trusted-types-for 'script'",
        "trusted-types dompurify",
    ]
)

SECURITY_HEADERS: dict[bytes, bytes] = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: bytes


def _walk(folder: Traversable, prefix: str = "") -> dict[str, Asset]:
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            assets.update(_walk(entry, name + "/"))
            continue
        suffix = "." + entry.name.rpartition(".")[2] if "." in entry.name else ""
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is None:
            continue  # licenses and notes ship with the package, but are not served
        body = entry.read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        assets[name] = Asset(body, content_type, etag)
    return assets


def load_assets() -> dict[str, Asset]:
    """Every servable file of the page, by its path under C{page/}."""
    return _walk(resources.files(__package__).joinpath(PAGE_DIR))


class Page:
    """The page's files, read from the package on first use, then from memory."""

    def __init__(self) -> None:
        self._assets: dict[str, Asset] | None = None

    @property
    def assets(self) -> dict[str, Asset]:
        if self._assets is None:
            self._assets = load_assets()
        return self._assets

    def serve(self, request: Request, name: str) -> bytes:
        """C{name}'s bytes with its headers, a 304, or a 404 (a lookup: no path reaches disk)."""
        asset = self.assets.get(name)
        if asset is None:
            raise NotFound()
        for header, value in SECURITY_HEADERS.items():
            request.setHeader(header, value)
        request.setHeader(b"content-type", asset.content_type.encode())
        if request.setETag(asset.etag) is CACHED:
            return b""
        return asset.body


def add_routes(server: Host) -> None:
    """C{GET /} (the page) and C{GET /ui/<file>} (its scripts, styles, icon)."""
    app = server.app
    page = Page()

    @app.route("/", methods=["GET"])
    def index(request: Request) -> bytes:
        return page.serve(request, "index.html")

    @app.route("/ui/<path:name>", methods=["GET"])
    def asset(request: Request, name: str) -> bytes:
        return page.serve(request, name)
