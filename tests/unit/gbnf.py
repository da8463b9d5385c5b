"""
A GBNF recogniser for tests: does a grammar accept a whole string?

llama.cpp checks a grammar only while sampling, with a model; these tests
want to know, without one, which JSON texts a grammar built from a schema
lets through and which it stops. This reads the subset of GBNF that
llama-cpp-python's converter and ds4tw's parsers write (rules on one line
each; literals, character classes, groups, alternatives, rule references,
C{? * +} and C{{m}}, C{{m,}}, C{{m,n}}) and answers by the set of end
positions each part can reach from a start (memoised, so ambiguity costs
nothing). Grammars are also fed to llama.cpp's own parser in the tests,
so a rule this reader misreads cannot hide a grammar llama.cpp refuses.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Lit:
    text: str


@dataclass(frozen=True)
class Cls:
    ranges: tuple[tuple[str, str], ...]
    negated: bool


@dataclass(frozen=True)
class Ref:
    name: str


@dataclass(frozen=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Rep:
    item: Node
    low: int
    high: int | None


Node = Union[Lit, Cls, Ref, Seq, Alt, Rep]  # noqa: UP007 (a runtime alias)

_ESC = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "[": "[", "]": "]", "-": "-"}


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def char(self) -> str:
        c = self.s[self.i]
        if c != "\\":
            self.i += 1
            return c
        e = self.s[self.i + 1]
        if e == "x":
            self.i += 4
            return chr(int(self.s[self.i - 2 : self.i], 16))
        if e == "u":
            self.i += 6
            return chr(int(self.s[self.i - 4 : self.i], 16))
        self.i += 2
        return _ESC.get(e, e)

    def alt(self) -> Node:
        options = [self.seq()]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            options.append(self.seq())
        return options[0] if len(options) == 1 else Alt(tuple(options))

    def seq(self) -> Node:
        items: list[Node] = []
        while True:
            self.ws()
            if self.i >= len(self.s) or self.s[self.i] in "|)":
                return items[0] if len(items) == 1 else Seq(tuple(items))
            items.append(self.postfix(self.atom()))

    def atom(self) -> Node:
        c = self.s[self.i]
        if c == '"':
            self.i += 1
            out = []
            while self.s[self.i] != '"':
                out.append(self.char())
            self.i += 1
            return Lit("".join(out))
        if c == "[":
            self.i += 1
            negated = self.s[self.i] == "^"
            self.i += negated
            ranges = []
            while self.s[self.i] != "]":
                lo = self.char()
                hi = lo
                if self.s[self.i] == "-" and self.s[self.i + 1] != "]":
                    self.i += 1
                    hi = self.char()
                ranges.append((lo, hi))
            self.i += 1
            return Cls(tuple(ranges), negated)
        if c == "(":
            self.i += 1
            node = self.alt()
            assert self.s[self.i] == ")", self.s[self.i :]
            self.i += 1
            return node
        if c == ".":
            self.i += 1
            return Cls((("\n", "\n"),), True)
        m = re.compile(r"[a-zA-Z0-9-]+").match(self.s, self.i)
        assert m, f"cannot read {self.s[self.i :]!r}"
        self.i = m.end()
        return Ref(m.group())

    def postfix(self, node: Node) -> Node:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in "?*+":
                self.i += 1
                node = Rep(node, 1 if c == "+" else 0, 1 if c == "?" else None)
            elif c == "{":
                end = self.s.index("}", self.i)
                low, _, high = self.s[self.i + 1 : end].partition(",")
                n = int(low)
                node = Rep(node, n, n if not _ else (int(high) if high.strip() else None))
                self.i = end + 1
            else:
                return node
        return node


class Grammar:
    def __init__(self, gbnf: str, root: str = "root") -> None:
        self.rules: dict[str, Node] = {}
        for line in gbnf.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, body = line.partition("::=")
            self.rules[name.strip()] = _Parser(body.strip()).alt()
        self.root = root

    def accepts(self, text: str) -> bool:
        @functools.cache
        def ends(node: Node, i: int) -> frozenset[int]:
            match node:
                case Lit(t):
                    return frozenset({i + len(t)}) if text.startswith(t, i) else frozenset()
                case Cls(ranges, negated):
                    if i >= len(text):
                        return frozenset()
                    inside = any(lo <= text[i] <= hi for lo, hi in ranges)
                    return frozenset({i + 1}) if inside != negated else frozenset()
                case Ref(name):
                    return ends(self.rules[name], i)
                case Seq(items):
                    at = frozenset({i})
                    for item in items:
                        at = frozenset(e for p in at for e in ends(item, p))
                    return at
                case Alt(options):
                    return frozenset(e for o in options for e in ends(o, i))
                case Rep(item, low, high):
                    reached: set[int] = set()
                    at, count = frozenset({i}), 0
                    while True:
                        if count >= low:
                            reached |= at
                        if high is not None and count >= high:
                            break
                        # An unbounded repeat of an empty match adds nothing.
                        nxt = frozenset(
                            e for p in at for e in ends(item, p) if high is not None or e != p
                        )
                        count += 1
                        if not nxt or (high is None and count >= low and nxt <= reached):
                            break
                        at = nxt
                    return frozenset(reached)
            raise AssertionError(node)

        return len(text) in ends(self.rules[self.root], 0)
