"""
GBNF grammars built from JSON Schemas: structured output and the tool
calls of each tool-call syntax (L{ds4tw._tools.parsers} says how its
calls are framed; this module turns schemas into rules).

The schema-to-rules conversion is llama-cpp-python's (a port of
llama.cpp's own C{json-schema-to-grammar}); rules from several schemas
share one converter, so a grammar for a dozen tools has one set of
primitives. Building is pure Python and can take tens of milliseconds for
an agent's tool set, so it runs off the reactor (with the chat template)
and is cached by the tool set's key: agents send the same tools every
turn.

Covered by tests/unit/test_tool_parsers.py (every grammar parses) and, with the real sampler,
tests/integration/test_tools_sdk.py.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._engine import Grammar


class GrammarError(ValueError):
    """A schema that cannot be turned into a grammar."""


def literal(text: str) -> str:
    """A GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


class RuleSet:
    """Rules from one or more JSON Schemas, plus hand-written ones."""

    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter

        self._converter = SchemaConverter(
            prop_order={"name": 0, "arguments": 1, "parameters": 1},
            allow_fetch=False,
            dotall=False,
            raw_pattern=False,
        )

    def schema(self, schema: Mapping[str, Any], name: str) -> str:
        """Add the rules of C{schema}; return the name of its top rule."""
        try:
            resolved = self._converter.resolve_refs(json.loads(json.dumps(schema)), name)
            return str(self._converter.visit(resolved, name))
        except Exception as e:  # the converter raises plain errors
            raise GrammarError(f"cannot build a grammar from this schema: {e}") from e

    def rule(self, name: str, body: str) -> str:
        return str(self._converter._add_rule(name, body))

    def grammar(self, root_body: str, triggers: Sequence[str] = ()) -> Grammar:
        self.rule("root", root_body)
        return Grammar(self._converter.format_grammar(), "root", tuple(triggers))


def call_schema(
    name: str, arguments: Mapping[str, Any], args_key: str = "arguments"
) -> dict[str, Any]:
    """The JSON Schema of one call object: the tool's name, then its arguments."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, args_key: dict(arguments)},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


@functools.lru_cache(maxsize=64)
def _json_grammar(schema_json: str | None) -> Grammar:
    rules = RuleSet()
    schema = json.loads(schema_json) if schema_json is not None else {"type": "object"}
    top = rules.schema(schema, "value")
    # Leading whitespace is allowed (models like a newline first); the
    # grammar ends with the value, so the model can only stop after it.
    return rules.grammar(f"[ \\t\\n]* {top}")


def json_grammar(schema: Mapping[str, Any] | None) -> Grammar:
    """Any JSON object (C{None}), or JSON valid against C{schema}."""
    key = None if schema is None else json.dumps(schema, sort_keys=True)
    return _json_grammar(key)
