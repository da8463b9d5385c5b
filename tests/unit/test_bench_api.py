"""
The benchmark measures ds4tw through its public API: no module of
ds4tw.bench imports a private ds4tw module (a name with a leading
underscore under ds4tw, other than the bench's own modules), except the
few listed below, each with what it still needs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ds4tw.bench

BENCH = Path(ds4tw.bench.__file__).parent

# What is left, and why: each entry names what a public API would have to
# offer instead. The test fails on any private import not listed here, and
# on an entry no longer needed (so the list only shrinks).
STILL_PRIVATE = {
    # The output parsers' and grammars' own costs, measured on the parser
    # objects themselves (no public parser or tool-list type yet).
    ("_parsers.py", "ds4tw._formats.reasoning"),
    ("_parsers.py", "ds4tw._formats.tools.parsers"),
    ("_parsers.py", "ds4tw._formats.tools.parsers.base"),
    ("_parsers.py", "ds4tw._formats.tools.spec"),
    ("_parsers.py", "ds4tw._types"),
    ("_grammars.py", "ds4tw._formats.tools.spec"),
    ("_grammars.py", "ds4tw._api.anthropic.schema"),
    ("_grammars.py", "ds4tw._api.responses.schema"),
    ("_grammars.py", "ds4tw._api.openai.schema"),
    ("_grammars.py", "ds4tw._formats.normalise"),
    ("_grammars.py", "ds4tw._engine.template"),
    ("_grammars.py", "ds4tw._formats.tools.parsers"),
    ("_grammars.py", "ds4tw._formats.tools.prompt"),
    ("_constrained.py", "ds4tw._formats.tools.parsers"),
    ("_constrained.py", "ds4tw._formats.tools.spec"),
    # The reactor's per-token work, profiled on the renderers themselves.
    ("_profile.py", "ds4tw._engine.interface"),
    ("_profile.py", "ds4tw._api.openai.render"),
    ("_profile.py", "ds4tw._formats.pipeline"),
    ("_profile.py", "ds4tw._api.sse"),
    ("_profile.py", "ds4tw._types"),
    # The RPC workers' side: starting them, checking them (no public RPC
    # API: --rpc and ds4tw-rpc-worker are the interface).
    ("_rpc.py", "ds4tw._engine.rpc"),
}


def _private(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "ds4tw" and parts[1:2] != ["bench"] and any(p.startswith("_") for p in parts)


def private_imports(path: Path) -> set[tuple[str, str]]:
    """(file name, private module) for every import in C{path}, relative ones resolved."""
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["ds4tw", "bench"][: 2 - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # "from ds4tw import _llama" imports a private module too.
            names = [module, *(f"{module}.{a.name}" for a in node.names if a.name.startswith("_"))]
        else:
            continue
        found.update((path.name, n) for n in names if _private(n))
    return found


def test_private_imports_are_found() -> None:
    assert _private("ds4tw._engine.llama") and _private("ds4tw._formats.tools.spec")
    assert not _private("ds4tw") and not _private("ds4tw.testing")
    assert not _private("ds4tw.bench._report") and not _private("llama_cpp._internals")


def test_the_bench_imports_only_public_ds4tw_names() -> None:
    found: set[tuple[str, str]] = set()
    for path in sorted(BENCH.glob("*.py")):
        found |= private_imports(path)
    assert found - STILL_PRIVATE == set()
    assert STILL_PRIVATE - found == set()


def test_the_in_step_abort_is_an_engine_option_not_an_environment_variable() -> None:
    from ds4tw.bench._serve import parse

    _, options = parse(["--log", "x.log", "--no-abort-in-step", "--", "--model", __file__])
    assert options.engine_options().abort_in_step is False
    _, options = parse(["--log", "x.log", "--", "--model", __file__])
    assert options.engine_options().abort_in_step is True
    for path in BENCH.glob("*.py"):
        assert "DS4TW_ABORT_IN_STEP" not in path.read_text(encoding="utf-8"), path.name
