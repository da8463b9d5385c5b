"""
How model families write: reasoning and tool-call parsers (one module per syntax),
the grammars that constrain sampling, and the output pipeline that splits a reply.

Covered by tests/unit/test_exports.py.
"""
