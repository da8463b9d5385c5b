"""
GBNF grammars built from JSON Schemas: structured output and the tool
calls of each tool-call syntax (L{ds4tw._formats.tools.parsers} says how its
calls are framed; this module turns schemas into rules).

The schema-to-rules conversion is llama-cpp-python's (a port of
llama.cpp's own C{json-schema-to-grammar}), fed each schema as
L{ds4tw._formats.jsonschema} rewrote it and taught that module's markers (any
value, references, raw integer ranges); rules from several schemas share
one converter, so a grammar for a dozen tools has one set of primitives.
Building is pure Python (2-4 ms for Claude Code's, Codex's or opencode's
tools, docs/performance.md), so it runs off the reactor (with the chat
template) and is cached by the tool set's key: agents send the same tools
every turn.

Covered by tests/unit/test_tool_parsers.py (every grammar parses),
tests/unit/test_jsonschema.py (what each construct's grammar accepts)
and, with the real sampler, tests/integration/test_tools_sdk.py and
tests/integration/test_agent_grammars.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._engine.interface import Grammar
from .jsonschema import ANY, GBNF, REF, loosened_text, simplify


def literal(text: str) -> str:
    """A GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


def char_class(chars: str) -> str:
    """A GBNF character class body for C{chars}."""
    out = []
    for c in chars:
        if c == "\n":
            out.append("\\n")
        elif c in "]\\^-[":
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def text_until(rule: Callable[[str, str], object], name: str, end: str) -> str:
    """
    A rule (made with C{rule(name, body)}) for any text that does not
    contain C{end} (the tag that follows it): one rule per prefix of
    C{end} matched so far. C{end}'s first character must not recur in it,
    so that a mismatch restarts the match at that character or from nothing.
    """
    first = end[0]
    if first in end[1:]:
        raise ValueError(f"{end!r}: its first character recurs in it")
    for i in range(len(end)):
        alts = [f"[^{char_class(first if i == 0 else first + end[i])}] {name}-0"]
        if i > 0:
            alts.append(f"{literal(first)} {name}-1")
        if i + 1 < len(end):
            alts.append(f"{literal(end[i])} {name}-{i + 1}")
        rule(f"{name}-{i}", f"({' | '.join(alts)})?")
    return f"{name}-0"


class Prefix:
    """
    Rules put before a built grammar's root: room for what a model writes
    before what the grammar constrains (its reasoning, L{ds4tw._formats.reasoning}).
    """

    def __init__(self, name: str = "ds4tw-reasoning") -> None:
        self.name = name
        self._lines: list[str] = []

    def rule(self, name: str, body: str) -> str:
        self._lines.append(f"{name} ::= {body}")
        return name

    def text_until(self, end: str) -> str:
        """A rule for any text without C{end} (L{text_until}; ValueError if it cannot be one)."""
        return text_until(self.rule, f"{self.name}-text", end)

    def before(self, grammar: Grammar, prefix: str) -> Grammar:
        """C{grammar}, its root now after C{prefix} (GBNF over these rules)."""
        lines = [*self._lines, f"{self.name} ::= {prefix} {grammar.root}"]
        gbnf = grammar.gbnf.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
        return dataclasses.replace(grammar, gbnf=gbnf, root=self.name)


@functools.cache
def _converter_class() -> type[Any]:
    """
    llama-cpp-python's converter, taught the markers of L{ds4tw._formats.jsonschema}
    (imported late: llama_cpp loads its shared library on import).
    """
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):
        def __init__(self) -> None:
            super().__init__(
                prop_order={"name": 0, "arguments": 1, "parameters": 1},
                allow_fetch=False,
                dotall=False,
                raw_pattern=False,
            )
            self.defs: dict[str, dict[str, Any]] = {}
            self._visiting: set[str] = set()
            #: C{(rule name, error)} for subschemas the converter refused.
            self.failed: list[tuple[str, str]] = []

        def _any(self, rule_name: str) -> str:
            return str(
                self._add_rule(rule_name, self._add_primitive("value", PRIMITIVE_RULES["value"]))
            )

        def visit(self, schema: dict[str, Any], name: str) -> str:
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            if ANY in schema:
                return self._any(rule_name)
            if GBNF in schema:
                return str(self._add_rule(rule_name, f"({schema[GBNF]}) space"))
            if REF in schema:
                ref = schema[REF]
                if ref not in self._rules and ref not in self._visiting:
                    # Named before it is visited: recursion finds the name.
                    self._visiting.add(ref)
                    self._add_rule(ref, self.visit(self.defs[ref], f"{ref}-body"))
                    self._visiting.discard(ref)
                return str(ref)
            try:
                return str(super().visit(schema, name))
            except Exception as e:  # the converter raises assertions and plain errors
                # Its children were visited through here, so this is the
                # innermost part it refused: only that part loosens.
                self.failed.append((rule_name, str(e) or type(e).__name__))
                return self._any(rule_name)

    return Converter


class RuleSet:
    """
    Rules from one or more JSON Schemas, plus hand-written ones. Every
    schema is first put into the converter's terms (L{simplify}); what
    that loosened is kept in L{loosened}, by the label each schema came
    with, for one log line per grammar.
    """

    def __init__(self) -> None:
        self._converter = _converter_class()()
        self._documents = 0
        #: C{(label, pointer, why)} for each place a schema was loosened.
        self.loosened: list[tuple[str, str, str]] = []

    def _simplified(self, schema: Mapping[str, Any], label: str) -> dict[str, Any]:
        self._documents += 1
        done = simplify(json.loads(json.dumps(schema)), prefix=f"ref{self._documents}")
        self._converter.defs.update(done.defs)
        self.loosened += [(label, where, why) for where, why in done.loosened]
        return done.schema

    def schema(self, schema: Mapping[str, Any], name: str, label: str = "") -> str:
        """Add the rules of C{schema}; return the name of its top rule."""
        return str(self._converter.visit(self._simplified(schema, label or name), name))

    def call(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        name: str,
        args_key: str = "arguments",
        label: str = "",
    ) -> str:
        """
        The rules of one call object, the tool's name then its arguments;
        the arguments schema is its own document (its C{$ref}s point into
        it, not into the call object around it).
        """
        call = {
            "type": "object",
            "properties": {
                "name": {"const": tool},
                args_key: self._simplified(arguments, label or f"tool {tool!r}"),
            },
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        return str(self._converter.visit(call, name))

    def rule(self, name: str, body: str) -> str:
        return str(self._converter._add_rule(name, body))

    def grammar(self, root_body: str, triggers: Sequence[str] = ()) -> Grammar:
        self.rule("root", root_body)
        return Grammar(
            self._converter.format_grammar(), "root", tuple(triggers), loosened=self._loosened()
        )

    def _loosened(self) -> str:
        """What was loosened, one clause per schema: for the log."""
        by_label: dict[str, list[tuple[str, str]]] = {}
        for label, where, why in self.loosened:
            by_label.setdefault(label, []).append((where, why))
        clauses = [f"{label}: {loosened_text(notes)}" for label, notes in by_label.items()]
        clauses += [f"rule {rule}: {error} (any value)" for rule, error in self._converter.failed]
        return "; ".join(clauses)


def json_grammar(schema: Mapping[str, Any] | None, label: str = "response_format") -> Grammar:
    """Any JSON object (C{None}), or JSON valid against C{schema}."""
    rules = RuleSet()
    top = rules.schema(schema if schema is not None else {"type": "object"}, "value", label)
    # Leading whitespace is allowed (models like a newline first); the
    # grammar ends with the value, so the model can only stop after it.
    return rules.grammar(f"[ \\t\\n]* {top}")
