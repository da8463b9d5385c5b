"""
Every id a request meets, made in one place:

  - the request's key (L{request_key}): the client's C{X-Request-Id} when
    sane, else a fresh C{req_...}; echoed on every response and named in
    every log line about the request, so an operator finds a client's
    request by the id the client saw;
  - the conversation's key (L{session_key}): the first session header the
    request carries (ds4tw's own, then the agents'), echoed as
    C{X-Session-Id}; a balancer hashes on it;
  - the ids of what a dialect answers (L{response_id}): C{chatcmpl-...},
    C{cmpl-...}, C{msg_...}, C{resp_...}, and the ids of tool calls and
    tool-use blocks (C{call_...}, C{toolu_...}), each in the shape its
    API's own server uses;
  - what a client sent, made safe to echo (L{sane}) and to log
    (L{one_line}).

Covered by tests/unit/test_app.py (request and session ids on every
response), tests/unit/test_connections.py and each dialect's route tests.
"""

from __future__ import annotations

import re
import uuid
from typing import Literal

from twisted.web.server import Request

#: The most of an error's message one log line carries (a schema a grammar
#: could not take can be long).
LOGGED_MESSAGE_CHARS = 2000
#: Characters that would break a log line or a terminal: C0 and C1
#: controls, and the two Unicode line separators.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str, limit: int = LOGGED_MESSAGE_CHARS) -> str:
    """
    C{text} for a log line: controls escaped (a path or a message may carry
    what the client sent), cut at C{limit} characters.
    """
    text = _UNPRINTABLE.sub(_escape, text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more)"


#: An id a client gives (its C{X-Request-Id}, a session key) is used only
#: when it is 1-128 of these characters: safe in a header and a log line.
SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

#: What a dialect names with an id, and how: (prefix, hex digits). The
#: shapes are OpenAI's and Anthropic's own: a client or a log parser that
#: recognises them keeps working.
IdKind = Literal["chatcmpl", "cmpl", "msg", "resp", "call", "toolu", "req"]
_SHAPES: dict[str, tuple[str, int]] = {
    "chatcmpl": ("chatcmpl-", 24),
    "cmpl": ("cmpl-", 24),
    "msg": ("msg_", 24),
    "resp": ("resp_", 32),
    "call": ("call_", 24),
    "toolu": ("toolu_", 24),
    "req": ("req_", 24),
}


def response_id(kind: IdKind) -> str:
    """A fresh id of C{kind}, e.g. C{chatcmpl-1f0c...} or C{msg_8a2e...}."""
    prefix, digits = _SHAPES[kind]
    return prefix + uuid.uuid4().hex[:digits]


def new_request_id() -> str:
    return response_id("req")


def sane(text: str) -> str | None:
    """C{text} if it is safe to echo and to log as an id, else None."""
    return text if SANE_ID.fullmatch(text) else None


def header_text(request: Request, name: bytes) -> str:
    """The request header C{name} as text (latin-1, as HTTP has it), or C{""}."""
    given = request.getHeader(name)
    return given.decode("latin-1") if isinstance(given, bytes) else (given or "")


_KEY_ATTR = "_ds4tw_request_id"


def request_key(request: Request) -> str:
    """
    This request's id, made on first use and sent back as C{X-Request-Id}:
    the client's own C{X-Request-Id} when it is sane (1-128 characters of
    C{[A-Za-z0-9._:@/+=-]}), else a fresh one. The session key, when the
    request has one, is echoed at the same time.
    """
    rid: str | None = getattr(request, _KEY_ATTR, None)
    if rid is None:
        rid = sane(header_text(request, b"x-request-id")) or new_request_id()
        setattr(request, _KEY_ATTR, rid)
        request.setHeader(b"x-request-id", rid.encode())
        session = session_key(request)
        if session is not None:
            # Under one name whichever header carried it: what a proxy's or
            # a client's log reads. An agent's own header, echoed back, would
            # tell it nothing it did not send.
            request.setHeader(b"x-session-id", session.encode())
    return rid


#: The request headers that carry a conversation's key, in precedence
#: order: ds4tw's own first (what a user or an operator sets on purpose
#: wins), then those the coding agents send unasked. The proxy templates
#: (docs/deploy/) pick in the same order, so the key ds4tw logs is the
#: one the balancer hashed.
SESSION_HEADERS: tuple[bytes, ...] = (
    b"x-session-id",  # ds4tw's; opencode sends it too
    b"x-claude-code-session-id",  # Claude Code
    b"session-id",  # Codex
    b"x-session-affinity",  # opencode (the same value as its X-Session-Id)
)


def session_key(request: Request) -> str | None:
    """
    The conversation's key: the first of L{SESSION_HEADERS} the request
    carries (an empty one counts as absent), when sane (as a request id).
    ds4tw only names it in the job's log line and echoes it back as
    C{X-Session-Id}; a balancer hashes on it for session affinity. An
    insane value is ignored, and does not fall through to the next
    header: the balancer, which cannot tell, hashed on it.
    """
    for name in SESSION_HEADERS:
        text = header_text(request, name)
        if text:
            return sane(text)
    return None


def job_label(request: Request, rid: str, what: str, stream: bool, model: str) -> str:
    """
    The job's name in its log line: the response id, what it is, the
    model that serves it, whether it streams, and the request's and
    conversation's keys.
    """
    label = f"{rid} {what} model={model} stream={stream} request={request_key(request)}"
    session = session_key(request)
    return label if session is None else f"{label} session={session}"
