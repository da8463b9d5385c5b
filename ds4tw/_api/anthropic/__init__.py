"""
The Anthropic Messages dialect: C{schema.py} (pydantic requests and their
engine terms), C{render.py} (wire shapes), C{routes.py} (the Klein
binding). Covered by tests/unit/test_anthropic.py and
tests/integration/test_anthropic_sdk.py.
"""
