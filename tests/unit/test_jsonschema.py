"""
Grammars from any JSON Schema an agent sends (L{ds4tw._formats.jsonschema} puts
the schema into the converter's terms; L{ds4tw._formats.grammar} builds the
rules): for each construct, JSON that the schema allows is accepted and
JSON it forbids is stopped, read by a GBNF recogniser (tests/unit/gbnf.py)
and checked by llama.cpp's own grammar parser; what cannot be expressed
loosens, noted with its JSON Pointer; and no schema, however odd, makes
building fail (a hypothesis fuzz).

Caveat: the recogniser reads the grammar as text; llama.cpp's sampler is
what enforces it (tests/integration/test_agent_grammars.py samples under
real agents' grammars on the demo model).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import LlamaGrammar

from ds4tw._formats.grammar import RuleSet, json_grammar
from ds4tw._formats.jsonschema import GBNF, integer_range, simplify

from .gbnf import Grammar as Recogniser

#: Claude Code 2.1's Workflow tool, as sent: C{args} has no type (any JSON
#: value). It made every Claude Code request a 400 before this module.
WORKFLOW = {
    "type": "object",
    "properties": {
        "script": {"type": "string", "description": "The workflow script."},
        "args": {"description": "Optional input value exposed to the script as the global args"},
    },
    "required": ["script"],
    "additionalProperties": False,
    "$schema": "http://json-schema.org/draft-07/schema#",
}


def recogniser(schema: Any) -> Recogniser:
    grammar = json_grammar(schema)
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)  # llama.cpp accepts it too
    return Recogniser(grammar.gbnf)


def dumps(value: Any) -> str:
    # The converter's rules allow one space after separators, as json.dumps writes.
    return json.dumps(value)


CASES: list[tuple[str, dict[str, Any], list[Any], list[Any]]] = [
    (
        "no type: any value",
        WORKFLOW,
        [
            {"script": "s"},
            {"script": "s", "args": 5},
            {"script": "s", "args": "x"},
            {"script": "s", "args": [1, None]},
            {"script": "s", "args": {"k": [True]}},
            {"script": "s", "args": None},
        ],
        [{"args": 1}, {"script": 1}, {"script": "s", "other": 1}],
    ),
    (
        "{} and true are any value",
        {"type": "object", "properties": {"a": {}, "b": True}, "required": ["a", "b"]},
        [{"a": 1, "b": "x"}, {"a": [], "b": None}],
        [{"a": 1}],
    ),
    (
        "additionalProperties: true takes any value",
        {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
        [{"a": "x", "n": 1}, {"n": [1, "2"]}, {}],
        # Not [{"a": 1}]: the converter's key rule for additional properties
        # is any string, a declared name included (a known looseness).
        ["not an object"],
    ),
    (
        "additionalProperties as a schema",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        [{"a": 1, "b": 2}, {}],
        [{"a": "x"}],
    ),
    (
        "items {} and no items: any values",
        {
            "type": "object",
            "properties": {"x": {"type": "array", "items": {}}, "y": {"type": "array"}},
        },
        [{"x": [1, "a", None, {"b": []}], "y": [True, 2]}],
        [{"x": 1}],
    ),
    (
        "$ref and $defs, recursive",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v"],
                }
            },
            "$ref": "#/$defs/node",
        },
        [{"v": 1}, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}],
        [{"v": 1, "kids": [{"w": 2}]}, {"kids": []}],
    ),
    (
        "definitions (draft 7) and a ref beside other keywords",
        {
            "definitions": {"name": {"type": "string", "minLength": 2}},
            "type": "object",
            "properties": {"n": {"$ref": "#/definitions/name", "maxLength": 3}},
            "required": ["n"],
        },
        [{"n": "ab"}, {"n": "abc"}],
        [{"n": "a"}, {"n": "abcd"}, {"n": 1}],
    ),
    (
        "anyOf with sibling properties",
        {
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
        },
        [{"a": "x"}, {"b": 1}, {"a": "x", "b": 1}],
        [{}, {"a": 1}],
    ),
    (
        "oneOf of types",
        {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "boolean"}}]},
        ["x", [True, False]],
        [1, ["x"]],
    ),
    (
        "allOf merges its parts",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
            ]
        },
        [{"a": "x", "b": 1}],
        [{"a": "x"}, {"b": 1}, {"a": 1, "b": 1}],
    ),
    (
        "enum and const",
        {
            "type": "object",
            "properties": {"e": {"enum": ["r", 2, None]}, "c": {"const": {"k": [1]}}},
            "required": ["e", "c"],
        },
        [{"e": "r", "c": {"k": [1]}}, {"e": 2, "c": {"k": [1]}}, {"e": None, "c": {"k": [1]}}],
        [{"e": "s", "c": {"k": [1]}}, {"e": 2, "c": {"k": [2]}}],
    ),
    (
        "nullable (OpenAPI) and type lists",
        {
            "type": "object",
            "properties": {
                "n": {"type": "string", "nullable": True},
                "t": {"type": ["integer", "null"], "minimum": 3},
            },
            "required": ["n", "t"],
        },
        [{"n": None, "t": None}, {"n": "x", "t": 3}],
        [{"n": 1, "t": None}, {"n": None, "t": 2}, {"n": None, "t": "3"}],
    ),
    (
        "an unanchored pattern searches",
        {"type": "string", "pattern": "ab+c"},
        ["abc", "xxabbbcyy"],
        ["ac", "xyz"],
    ),
    (
        "an anchored pattern matches whole",
        {"type": "string", "pattern": "^[a-z]{2,3}$"},
        ["ab", "abc"],
        ["a", "abcd", "ab1"],
    ),
    (
        "format date and uuid",
        {
            "type": "object",
            "properties": {"d": {"type": "string", "format": "date"}, "u": {"format": "uuid"}},
            "required": ["d", "u"],
        },
        [{"d": "2026-12-06", "u": "123e4567-e89b-12d3-a456-426614174000"}],
        [
            {"d": "yesterday", "u": "123e4567-e89b-12d3-a456-426614174000"},
            {"d": "2026-12-06", "u": "x"},
        ],
    ),
    (
        "string and array lengths",
        {
            "type": "object",
            "properties": {
                "s": {"type": "string", "minLength": 1, "maxLength": 3},
                "a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
            },
            "required": ["s", "a"],
        },
        [{"s": "x", "a": [1]}, {"s": "xyz", "a": [1, 2]}],
        [
            {"s": "", "a": [1]},
            {"s": "wxyz", "a": [1]},
            {"s": "x", "a": []},
            {"s": "x", "a": [1, 2, 3]},
        ],
    ),
    (
        "prefixItems",
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
        [["a", 1]],
        [[1, "a"], ["a"]],
    ),
    (
        "integer bounds, exclusive too",
        {
            "type": "object",
            "properties": {
                "i": {"type": "integer", "minimum": -3, "exclusiveMaximum": 12},
                "j": {"type": "integer", "exclusiveMinimum": 0},
            },
            "required": ["i", "j"],
        },
        [{"i": -3, "j": 1}, {"i": 11, "j": 123456}],
        [{"i": -4, "j": 1}, {"i": 12, "j": 1}, {"i": 0, "j": 0}, {"i": 0, "j": -1}],
    ),
    (
        "a required key with no schema is still written",
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"]},
        [{"a": "x", "b": 1}],
        [{"a": "x"}],
    ),
]


@pytest.mark.parametrize(
    ("schema", "good", "bad"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_what_the_schema_allows_is_what_the_grammar_accepts(
    schema: dict[str, Any], good: list[Any], bad: list[Any]
) -> None:
    g = recogniser(schema)
    for value in good:
        assert g.accepts(dumps(value)), value
    for value in bad:
        assert not g.accepts(dumps(value)), value


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        (0, 9),
        (1, 120),
        (-120, -7),
        (-15, 15),
        (7, None),
        (None, -3),
        (None, 42),
        (-100, None),
        (99, 100),
    ],
)
def test_integer_ranges_are_exact(lo: int | None, hi: int | None) -> None:
    g = Recogniser(f"root ::= {integer_range(lo, hi)}")
    for n in range(-1200, 1201):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert g.accepts(str(n)) == inside, n
    assert not g.accepts("-0") and not g.accepts("007") and not g.accepts("+1")
    if hi is None:
        assert g.accepts("1234567890123456") and not g.accepts("12345678901234567")


def test_what_cannot_be_expressed_loosens_and_is_named_by_its_pointer() -> None:
    schema = {
        "type": "object",
        "properties": {
            "p": {"type": "string", "pattern": "(?=x)y"},
            "q": {"type": "number", "minimum": 0.5},
            "r": {"type": "string", "maxLength": 100000},
            "s": {"not": {"type": "string"}},
            "t": {"$ref": "https://example.com/remote.json"},
        },
    }
    done = simplify(schema)
    assert [where for where, _ in done.loosened] == [
        "/properties/p",
        "/properties/q",
        "/properties/r",
        "/properties/s",
        "/properties/t",
    ]
    grammar = json_grammar(schema, label="tool 'Edit'")
    for where in ("/properties/p", "/properties/r", "/properties/t"):
        assert "tool 'Edit': " in grammar.loosened and where in grammar.loosened
    g = recogniser(schema)
    # Each loosened part takes more than the schema allows, never less.
    assert g.accepts(dumps({"p": "zzz", "q": -1, "r": "x" * 200, "s": "str", "t": [1]}))


def test_a_client_cannot_write_grammar_rules_into_a_schema() -> None:
    # The markers are ds4tw's own; a client's "x-" keys are dropped.
    schema = {"type": "object", "properties": {"a": {GBNF: '"pwned"', "type": "string"}}}
    assert GBNF not in json.dumps(simplify(schema).schema)
    assert "pwned" not in json_grammar(schema).gbnf


def test_tool_arguments_keep_their_own_refs_inside_a_call() -> None:
    # $ref points into the arguments schema, not into the call object
    # the grammar wraps around it; two tools' $defs of one name differ.
    rules = RuleSet()
    a = {
        "$defs": {"x": {"type": "integer"}},
        "type": "object",
        "properties": {"v": {"$ref": "#/$defs/x"}},
    }
    b = {
        "$defs": {"x": {"type": "string"}},
        "type": "object",
        "properties": {"v": {"$ref": "#/$defs/x"}},
    }
    calls = [rules.call("a", a, "call-0"), rules.call("b", b, "call-1")]
    grammar = rules.grammar(" | ".join(calls))
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)
    g = Recogniser(grammar.gbnf)
    assert g.accepts(dumps({"name": "a", "arguments": {"v": 1}}))
    assert g.accepts(dumps({"name": "b", "arguments": {"v": "s"}}))
    assert not g.accepts(dumps({"name": "a", "arguments": {"v": "s"}}))
    assert not g.accepts(dumps({"name": "b", "arguments": {"v": 1}}))
    assert grammar.loosened == ""


_KEYS = st.sampled_from(
    [
        "type", "properties", "items", "prefixItems", "anyOf", "oneOf", "allOf", "not",
        "enum", "const", "pattern", "format", "minimum", "maximum", "minLength", "maxLength",
        "minItems", "maxItems", "required", "additionalProperties", "$ref", "nullable",
        "description", "if", "exclusiveMinimum",
    ]
)  # fmt: skip
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["string", "integer", "number", "object", "array", "null", "boolean"]),
    st.sampled_from(
        ["#", "#/$defs/a", "#/properties/x", "#/nope", "other.json", "^a+$", "(", "date"]
    ),
    st.text(max_size=5),
)
_SCHEMAS = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(_KEYS, st.text(max_size=3)), inner, max_size=5),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=st.dictionaries(_KEYS, _SCHEMAS, max_size=5))
def test_no_schema_makes_building_fail(schema: dict[str, Any]) -> None:
    rules = RuleSet()
    top = rules.call("f", {**schema, "$defs": {"a": schema}}, "call-0")
    grammar = rules.grammar(top)
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)
