"""
The HTTP APIs: what a dialect is (L{ds4tw._api.dialect}), the registry of
those served (L{ds4tw._api.registry}), and the one handler every turn runs
through (L{ds4tw._api.serve}).

Covered by tests/unit/test_dialects.py.
"""
