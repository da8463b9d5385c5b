"""
The dialects this server speaks, in the order their routes are added and
their error shapes are looked up (L{ds4tw._api.dialect.dialect_for}): a
new dialect is one package with a C{DIALECT} and one line here.

Covered by tests/unit/test_dialects.py and tests/unit/test_openapi.py.
"""

from __future__ import annotations

from .anthropic.dialect import DIALECT as ANTHROPIC
from .dialect import Dialect
from .ollama.dialect import DIALECT as OLLAMA
from .openai.dialect import DIALECT as OPENAI
from .responses.dialect import DIALECT as RESPONSES

DIALECTS: tuple[Dialect, ...] = (OPENAI, RESPONSES, ANTHROPIC, OLLAMA)
