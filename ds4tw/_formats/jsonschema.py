"""
Any JSON Schema, rewritten into the forms that llama-cpp-python's grammar
converter (a port of llama.cpp's C{json-schema-to-grammar}) turns into
correct rules.

Agents send whatever JSON Schema their tools were written with, and the
converter knows a subset: it refuses a subschema with no C{type} (Claude
Code's C{Workflow} tool has one), reads C{{}} and C{true} as "any object"
where JSON Schema means "any value", builds an empty object from an
C{allOf} of non-object parts, drops C{anyOf} siblings, fails on
unanchored patterns, resolves C{$ref} only against the root it is given
(a tool's parameters sit inside a call object), and unrolls
C{maxLength: 10000} into ten thousand nested rules. L{simplify} walks the
schema once, knowing where it is, and hands the converter only what it
gets right:

  - any value (C{{}}, C{true}, a subschema with no type and nothing to
    infer one from, C{additionalProperties}/C{items} left open) becomes
    the L{ANY} marker, which L{ds4tw._formats.grammar} maps to the JSON value
    rule;
  - C{$ref} (local pointers, C{$defs}, C{definitions}, recursion) becomes
    the L{REF} marker naming a definition in L{Simplified.defs}, so
    references work wherever the schema is placed;
  - C{allOf} is merged, C{anyOf}/C{oneOf} siblings are distributed into
    each branch, type lists and OpenAPI's C{nullable} become branches;
  - integer bounds become exact digit rules (the L{GBNF} marker);
    C{enum}, C{const}, C{pattern}, C{format}, string and array lengths,
    C{prefixItems} go through as the converter knows them.

What cannot be expressed loosens to what can (a bound dropped, a
C{not} ignored, any value), and each such place is noted with its JSON
Pointer, so the caller can say once in the log which tool lost what.
Nothing here refuses a schema: a request is never turned away because a
grammar could not be built.

Covered by tests/unit/test_jsonschema.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Marker keys; never valid JSON Schema keywords, so never confused with one.
ANY = "x-ds4tw-any"
REF = "x-ds4tw-ref"
GBNF = "x-ds4tw-gbnf"

#: Keywords that only describe: dropped without a note.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "example",
        "$comment",
        "$schema",
        "$id",
        "$anchor",
        "$dynamicAnchor",
        "$vocabulary",
        "readOnly",
        "writeOnly",
        "deprecated",
        "contentMediaType",
        "contentEncoding",
        "contentSchema",
        "discriminator",
        "xml",
        "externalDocs",
        "markdownDescription",
        "$defs",
        "definitions",
        "strict",
    }
)
#: Keywords that constrain, which the grammar cannot express: loosened, noted.
_UNEXPRESSED = (
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "patternProperties",
    "propertyNames",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "$dynamicRef",
)
_OBJECT_KEYS = ("properties", "additionalProperties", "required")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems")
_STRING_KEYS = ("pattern", "minLength", "maxLength", "format")
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
#: String formats the converter has rules for; any other is a plain string.
_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
#: Longest length or item count unrolled into rules; past it the bound is
#: dropped (the converter writes one nested rule per unit).
MAX_UNROLLED = 256
#: Any run of characters inside a JSON string, short of its closing quote
#: (a bare C{.*} could write the quote and end the string mid-pattern).
_FREE = '[^"\\\\]*'
#: Digits an unbounded integer may have (llama.cpp's integer rule allows 16).
_MAX_DIGITS = 16


@dataclass
class Simplified:
    #: The schema, in the converter's subset plus the markers above.
    schema: dict[str, Any]
    #: Definitions the L{REF} markers name, simplified the same way.
    defs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: C{(pointer, what was loosened)} for every place that lost a constraint.
    loosened: list[tuple[str, str]] = field(default_factory=list)


def simplify(schema: Any, prefix: str = "def") -> Simplified:
    """
    C{schema} (a JSON Schema document) rewritten for the grammar converter.

    @param prefix: what the definitions' names start with; schemas whose
        rules share one converter need distinct prefixes.
    """
    walk = _Walk(schema, prefix)
    return Simplified(walk.node(schema, ""), walk.defs, walk.loosened)


def _any() -> dict[str, Any]:
    return {ANY: True}


def _pointer(path: str, *keys: str | int) -> str:
    for key in keys:
        path += "/" + str(key).replace("~", "~0").replace("/", "~1")
    return path


class _Walk:
    def __init__(self, root: Any, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.defs: dict[str, dict[str, Any]] = {}
        self.loosened: list[tuple[str, str]] = []
        self._ref_names: dict[str, str] = {}

    def loosen(self, path: str, why: str) -> None:
        self.loosened.append((path or "/", why))

    # -- references ---------------------------------------------------------

    def _target(self, ref: str) -> Any:
        """The subschema a local C{$ref} points at; KeyError if none."""
        if not ref.startswith("#"):
            raise KeyError(ref)
        node = self.root
        for raw in ref[1:].split("/")[1:] if ref != "#" else ():
            key = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list):
                node = node[int(key)]
            elif isinstance(node, dict):
                node = node[key]
            else:
                raise KeyError(ref)
        return node

    def _ref(self, ref: str, path: str) -> dict[str, Any]:
        if ref in self._ref_names:
            return {REF: self._ref_names[ref]}
        try:
            target = self._target(ref)
        except (KeyError, IndexError, ValueError):
            self.loosen(path, f"$ref {ref!r} cannot be resolved here (any value)")
            return _any()
        name = f"{self.prefix}-{len(self._ref_names)}"
        # Named before it is walked: a recursive reference finds the name.
        self._ref_names[ref] = name
        self.defs[name] = self.node(target, ref.lstrip("#") or "/")
        return {REF: name}

    def _deref(self, schema: Any) -> Any:
        """C{schema}, or what its C{$ref} points at (for merging C{allOf})."""
        seen = set()
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
            ref = schema["$ref"]
            if ref in seen:
                break
            seen.add(ref)
            try:
                target = self._target(ref)
            except (KeyError, IndexError, ValueError):
                break
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = _merge(target, rest) if rest else target
        return schema

    # -- the walk -------------------------------------------------------------

    def node(self, schema: Any, path: str) -> dict[str, Any]:
        try:
            return self._node(schema, path)
        except Exception as e:  # a malformed part: it loosens, the rest stands
            self.loosen(path, f"cannot be read ({type(e).__name__}: {e}); any value")
            return _any()

    def _node(self, schema: Any, path: str) -> dict[str, Any]:
        if schema is True:
            return _any()
        if schema is False:
            self.loosen(path, "a false schema (nothing is valid) cannot be expressed (any value)")
            return _any()
        if not isinstance(schema, Mapping):
            self.loosen(path, "not a schema object (any value)")
            return _any()
        s = {k: v for k, v in schema.items() if k not in _ANNOTATIONS and not k.startswith("x-")}
        for key in _UNEXPRESSED:
            if key in s:
                del s[key]
                self.loosen(path, f"{key!r} is not enforced")
        if s.pop("nullable", False) is True:
            return {"anyOf": [self.node(s, path), {"type": "null"}]}
        if isinstance(s.get("$ref"), str):
            ref = s.pop("$ref")
            if not s:
                return self._ref(ref, path)
            # Siblings of $ref apply too (2019-09 on): both must hold.
            s = {"allOf": [{"$ref": ref}, *s.pop("allOf", [])], **s}
        if "allOf" in s:
            return self.node(self._all_of(s, path), path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self._union(s, key, path)
        if "const" in s:
            return {"const": s["const"]}
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                self.loosen(path, "an empty or malformed enum (any value)")
                return _any()
            return {"enum": list(s["enum"])}
        kind = s.get("type", _infer(s))
        if isinstance(kind, list):
            kinds = [k for k in kind if k in _TYPES]
            if not kinds:
                return _any()
            if len(kinds) == 1:
                kind = kinds[0]
            else:
                return {"anyOf": [self.node({**s, "type": k}, path) for k in kinds]}
        if kind is None:
            return _any()
        if kind == "object":
            return self._object(s, path)
        if kind == "array":
            return self._array(s, path)
        if kind == "string":
            return self._string(s, path)
        if kind == "integer":
            return self._integer(s, path)
        if kind == "number":
            if any(k in s for k in _NUMBER_KEYS):
                self.loosen(path, "bounds on a non-integer number are not enforced")
            return {"type": "number"}
        if kind in ("boolean", "null"):
            return {"type": kind}
        self.loosen(path, f"unknown type {kind!r} (any value)")
        return _any()

    def _all_of(self, s: dict[str, Any], path: str) -> dict[str, Any]:
        merged = {k: v for k, v in s.items() if k != "allOf"}
        parts = s["allOf"] if isinstance(s["allOf"], list) else []
        for part in parts:
            part = self._deref(part)
            if not isinstance(part, Mapping):
                continue
            if "allOf" in part:
                part = self._all_of(dict(part), path)
            merged = _merge(merged, part)
        if "$ref" in merged:  # a reference that could not be followed
            self.loosen(path, f"$ref {merged.pop('$ref')!r} in allOf cannot be resolved")
        return merged

    def _union(self, s: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        branches = s[key] if isinstance(s[key], list) else []
        rest = {k: v for k, v in s.items() if k != key}
        if key == "anyOf" and "oneOf" in rest:
            # Both must hold; only one union can be a grammar alternation.
            del rest["oneOf"]
            self.loosen(path, "'oneOf' beside 'anyOf' is not enforced")
        out = []
        for i, branch in enumerate(branches):
            branch = self._deref(branch) if rest else branch
            merged = _merge(rest, branch) if rest and isinstance(branch, Mapping) else branch
            out.append(self.node(merged, _pointer(path, key, i)))
        if not out:
            return _any()
        return out[0] if len(out) == 1 else {"anyOf": out}

    def _object(self, s: dict[str, Any], path: str) -> dict[str, Any]:
        props: dict[str, Any] = {}
        raw = s.get("properties")
        for name, sub in (raw if isinstance(raw, Mapping) else {}).items():
            if sub is False:
                continue  # the property must not appear: leaving it out does that
            props[name] = self.node(sub, _pointer(path, "properties", name))
        listed = s.get("required")
        required = [r for r in listed if isinstance(r, str)] if isinstance(listed, list) else []
        for name in required:
            # Required but undescribed: the converter would leave it out.
            props.setdefault(name, _any())
        extra = s.get("additionalProperties")
        if not props and extra in (None, True):
            return {"type": "object"}
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = list(dict.fromkeys(required))
        if extra is True:
            out["additionalProperties"] = _any()
        elif isinstance(extra, Mapping):
            out["additionalProperties"] = self.node(extra, _pointer(path, "additionalProperties"))
        # Left out, additional properties are allowed by JSON Schema; the
        # converter (like llama.cpp) allows none, which is still valid output
        # and keeps the model to the declared keys.
        elif extra is False or extra is None:
            out["additionalProperties"] = False
        return out

    def _array(self, s: dict[str, Any], path: str) -> dict[str, Any]:
        prefix = s.get("prefixItems")
        items = s.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, s.get("additionalItems")
        if isinstance(prefix, list) and prefix:
            if items not in (None, False):
                self.loosen(path, "items after prefixItems are not generated")
            return {
                "type": "array",
                "prefixItems": [
                    self.node(p, _pointer(path, "prefixItems", i)) for i, p in enumerate(prefix)
                ],
            }
        out: dict[str, Any] = {
            "type": "array",
            "items": self.node(items if items is not None else True, _pointer(path, "items")),
        }
        return self._lengths(s, out, "minItems", "maxItems", path)

    def _string(self, s: dict[str, Any], path: str) -> dict[str, Any]:
        pattern = s.get("pattern")
        if isinstance(pattern, str) and pattern:
            # JSON Schema patterns search; the converter's match whole strings.
            # What pads an unanchored one cannot end the string early.
            body = pattern[1:] if pattern.startswith("^") else _FREE + pattern
            body = body[:-1] if _ends_anchored(body) else body + _FREE
            if _convertible(f"^{body}$"):
                return {"type": "string", "pattern": f"^{body}$"}
            self.loosen(path, f"pattern {pattern!r} is not enforced")
        fmt = s.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return {"type": "string", "format": fmt}
        out: dict[str, Any] = {"type": "string"}
        return self._lengths(s, out, "minLength", "maxLength", path)

    def _lengths(
        self, s: dict[str, Any], out: dict[str, Any], low_key: str, high_key: str, path: str
    ) -> dict[str, Any]:
        """C{out} with the length bounds of C{s} the converter can unroll."""
        low, high = _bound(s, low_key), _bound(s, high_key)
        if low is not None and high is not None and low > high:
            self.loosen(path, f"{low_key} > {high_key} (bounds dropped)")
            return out
        if low:
            if low > MAX_UNROLLED:
                self.loosen(path, f"{low_key} {low} is not enforced (over {MAX_UNROLLED})")
            else:
                out[low_key] = low
        if high is not None:
            if high - out.get(low_key, 0) > MAX_UNROLLED:
                self.loosen(path, f"{high_key} {high} is not enforced (over {MAX_UNROLLED})")
            else:
                out[high_key] = high
        return out

    def _integer(self, s: dict[str, Any], path: str) -> dict[str, Any]:
        low = _number(s.get("minimum"))
        high = _number(s.get("maximum"))
        ex_low = _number(s.get("exclusiveMinimum"))
        ex_high = _number(s.get("exclusiveMaximum"))
        # Draft 4's boolean exclusive bounds modify minimum/maximum.
        if s.get("exclusiveMinimum") is True and low is not None:
            ex_low, low = low, None
        if s.get("exclusiveMaximum") is True and high is not None:
            ex_high, high = high, None
        lo = _ceil_bound(low, ex_low)
        hi = _floor_bound(high, ex_high)
        if lo is None and hi is None:
            return {"type": "integer"}
        if lo is not None and hi is not None and lo > hi:
            self.loosen(path, "minimum > maximum (bounds dropped)")
            return {"type": "integer"}
        return {GBNF: integer_range(lo, hi)}


def _infer(s: Mapping[str, Any]) -> str | None:
    """The type that a subschema's keywords imply, when it names none."""
    for kind, keys in (
        ("object", _OBJECT_KEYS),
        ("array", _ARRAY_KEYS),
        ("string", _STRING_KEYS),
        ("number", _NUMBER_KEYS),
    ):
        if any(k in s for k in keys):
            return kind
    return None


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Both schemas at once, as far as a plain merge can say it."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "properties" and isinstance(value, Mapping):
            props = dict(out[key]) if isinstance(out[key], Mapping) else {}
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required" and isinstance(value, list):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key == "type":
            out[key] = _meet(out[key], value)
        elif key in ("minimum", "minLength", "minItems", "exclusiveMinimum"):
            out[key] = _pick(max, out[key], value)
        elif key in ("maximum", "maxLength", "maxItems", "exclusiveMaximum"):
            out[key] = _pick(min, out[key], value)
        else:
            out[key] = value
    return out


def _meet(a: Any, b: Any) -> Any:
    """The types both allow (an integer is a number)."""
    left = set(a) if isinstance(a, list) else {a}
    right = set(b) if isinstance(b, list) else {b}
    for x, y in ((left, right), (right, left)):
        if "number" in x and "integer" in y:
            x.add("integer")
    both = [t for t in _TYPES if t in left and t in right]
    if not both:
        return b
    return both[0] if len(both) == 1 else both


def _pick(f: Any, a: Any, b: Any) -> Any:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return f(a, b)
    return b


def _bound(s: Mapping[str, Any], key: str) -> int | None:
    v = s.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _number(v: Any) -> float | int | None:
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _ceil_bound(inclusive: float | None, exclusive: float | None) -> int | None:
    candidates = []
    if inclusive is not None:
        candidates.append(math.ceil(inclusive))
    if exclusive is not None:
        candidates.append(math.floor(exclusive) + 1)
    return max(candidates) if candidates else None


def _floor_bound(inclusive: float | None, exclusive: float | None) -> int | None:
    candidates = []
    if inclusive is not None:
        candidates.append(math.floor(inclusive))
    if exclusive is not None:
        candidates.append(math.ceil(exclusive) - 1)
    return min(candidates) if candidates else None


def _ends_anchored(pattern: str) -> bool:
    if not pattern.endswith("$"):
        return False
    backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    return backslashes % 2 == 0


def _convertible(pattern: str) -> bool:
    """Whether the converter's regex subset can take C{pattern} (C{^...$})."""
    from llama_cpp.llama_grammar import SchemaConverter

    try:
        re.compile(pattern)
        probe = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        probe._visit_pattern(pattern, "probe")
    except Exception:  # the converter raises assertions and plain errors
        return False
    return True


# -- integer ranges ----------------------------------------------------------------


def integer_range(lo: int | None, hi: int | None) -> str:
    """
    A GBNF expression for the decimal integers in C{[lo, hi]} (either end
    open when C{None}), written as JSON writes them: no leading zeros, no
    plus sign, C{-0} not produced.
    """
    alts: list[str] = []
    # The negative part: -(|hi'|..|lo'|) over magnitudes.
    if lo is None or lo < 0:
        top = None if lo is None else -lo
        bottom = 1 if hi is None or hi >= 0 else -hi
        alts.append(f'"-" ({_naturals(bottom, top)})')
    if hi is None or hi >= 0:
        alts.append(_naturals(max(lo or 0, 0), hi))
    return " | ".join(f"({a})" for a in alts)


def _naturals(lo: int, hi: int | None) -> str:
    """Non-negative integers in C{[lo, hi]}."""
    a = str(lo)
    if hi is not None:
        b = str(hi)
        if len(a) == len(b):
            return _same_length(a, b)
        parts = [_same_length(a, "9" * len(a))]
        parts += [_digits(n) for n in range(len(a) + 1, len(b))]
        parts.append(_same_length("1" + "0" * (len(b) - 1), b))
        return " | ".join(parts)
    parts = [_same_length(a, "9" * len(a))]
    if len(a) < _MAX_DIGITS:
        # Nested optionals, not a run of C{x?}: one parse per digit string,
        # where a run would leave the sampler a stack per way to match.
        optional = ""
        for _ in range(_MAX_DIGITS - len(a) - 1):
            optional = f"([0-9] {optional})?".replace(" )", ")")
        parts.append(" ".join(["[1-9]", *["[0-9]"] * len(a), optional]).strip())
    return " | ".join(parts)


def _digits(n: int) -> str:
    """Every n-digit number (no leading zero)."""
    return " ".join(["[1-9]", *["[0-9]"] * (n - 1)])


def _same_length(a: str, b: str) -> str:
    """Digit strings of one length from C{a} to C{b}, as one expression."""
    if not a:
        return '""'
    if a == b:
        return f'"{a}"'
    if a[0] == b[0]:
        return f'"{a[0]}" ({_same_length(a[1:], b[1:])})'
    rest = len(a) - 1
    free = " ".join(["[0-9]"] * rest)
    first, last = int(a[0]), int(b[0])
    parts = []
    if set(a[1:]) <= {"0"}:
        first -= 1  # a's first digit takes every tail: join the middle range
    else:
        parts.append(f'"{a[0]}" ({_same_length(a[1:], "9" * rest)})')
    upper = set(b[1:]) <= {"9"}
    middle_high = last if upper else last - 1
    if first + 1 <= middle_high:
        digit = f"[{first + 1}-{middle_high}]" if first + 1 < middle_high else f'"{first + 1}"'
        parts.append(f"{digit} {free}".strip())
    if not upper:
        parts.append(f'"{b[0]}" ({_same_length("0" * rest, b[1:])})')
    return " | ".join(parts)


def loosened_text(notes: Sequence[tuple[str, str]]) -> str:
    """The notes as one line's worth: C{/a/b: why; /c: why}."""
    return "; ".join(f"{where}: {why}" for where, why in notes)
